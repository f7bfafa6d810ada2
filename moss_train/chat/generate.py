"""Generation: batched greedy or sampled decoding with a KV cache, and loading a trained model.

Semantics are those of Hugging Face ``generate`` (``do_sample`` = temperature > 0): each step's
last-token logits go through, in HF's order,

    repetition_penalty  (also when greedy; HF's RepetitionPenaltyLogitsProcessor)
    temperature, top_k, top_p                  (sampling only; HF's logits warpers)

then argmax (greedy) or one draw from the softmax. A row stops after it emits a stop id or
``max_new_tokens`` tokens, and leaves the batch (its cache rows are dropped).

Prompts of different lengths are batched with left padding, kept out of attention by
``segment_ids`` (padding is segment 0, the prompt segment 1) and positions counted from each
prompt's first token, so a row's tokens are what the model computes for that prompt alone —
as HF does with an attention mask. Differences from HF: ``top_k`` defaults to 0 here (off;
HF's GenerationConfig defaults to 50 when sampling), and the repetition penalty never counts
left padding (HF counts the pad id as a seen token).

The KV cache (:class:`KVCache`) is preallocated for prompt + max_new_tokens; the model takes it
as ``forward(..., cache=...)``: each layer writes its new keys / values at the cache's current
span and attends to everything cached so far.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moss_train.model.codegen import CodeGenForCausalLM


# ----------------------------------------------------------------------------- the KV cache
class _LayerKV:
    """One layer's keys and values, (B, H, capacity, D), filled up to the cache's span end."""

    def __init__(self, cache: KVCache, keys: torch.Tensor, values: torch.Tensor):
        self.cache, self.keys, self.values = cache, keys, values

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.cache.span
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Keys / values of every layer and the segment id of every cached token.

    The model calls :meth:`attention_mask` once per forward (it records the new tokens' segments
    and advances the span) and ``layers[i].update`` in each layer.
    """

    def __init__(self, model: CodeGenForCausalLM, batch: int, capacity: int):
        cfg = model.config
        param = next(model.parameters())
        shape = (batch, cfg.n_head, capacity, cfg.n_embd // cfg.n_head)
        self.layers = [
            _LayerKV(self, torch.empty(shape, dtype=param.dtype, device=param.device), torch.empty(shape, dtype=param.dtype, device=param.device))
            for _ in range(cfg.n_layer)
        ]
        self.segments = torch.empty((batch, capacity), dtype=torch.long, device=param.device)
        self.capacity = capacity
        self.length = 0
        self.span = (0, 0)

    def attention_mask(self, segment_ids: torch.Tensor | None) -> torch.Tensor:
        """(B, 1, T, length + T) bool: a new token sees each cached or new token of its own
        segment at or before it. Padding (its own segment) never mixes with a prompt."""
        if segment_ids is None:
            raise ValueError("generation with a KV cache needs segment_ids")
        start, end = self.length, self.length + segment_ids.shape[1]
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} tokens is full")
        self.segments[:, start:end] = segment_ids
        self.length, self.span = end, (start, end)
        same = self.segments[:, None, :end] == segment_ids[:, :, None]  # (B, T, end)
        causal = torch.arange(end, device=same.device)[None, :] <= torch.arange(start, end, device=same.device)[:, None]
        return (same & causal)[:, None]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` of the batch (finished rows leave)."""
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
        self.segments = self.segments[rows]


# ----------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen (HF generate's meaning of each knob)."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError(f"invalid sampling settings {self}: temperature >= 0, top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, sampling: Sampling) -> torch.Tensor:
    """(B, V) fp32 logits -> what the token is chosen from, in HF's order (see module docstring).

    seen: (B, V) bool, the tokens already in each row (prompt + generated), for the penalty.
    """
    if sampling.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits < 0, logits * sampling.repetition_penalty, logits / sampling.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if sampling.greedy:
        return logits
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        # HF: drop the least likely tokens whose cumulative probability is <= 1 - top_p, never
        # the most likely one.
        ascending, order = torch.sort(logits, descending=False)
        remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - sampling.top_p)
        remove[:, -1] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    if sampling.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------- decoding
def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, positions, segments), each (B, longest): prompts right-aligned, padding segment 0."""
    rows, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((rows, longest), pad_id, dtype=torch.long)
    segments = torch.zeros((rows, longest), dtype=torch.long)
    positions = torch.zeros((rows, longest), dtype=torch.long)
    for r, prompt in enumerate(prompts):
        start = longest - len(prompt)
        ids[r, start:] = torch.as_tensor(list(prompt), dtype=torch.long)
        segments[r, start:] = 1
        positions[r, start:] = torch.arange(len(prompt))
    return ids, positions, segments


class _CachedDecoder:
    """Prefill the prompts once, then one token per row per step against the KV cache."""

    def __init__(self, model, ids, positions, segments, max_new_tokens: int):
        self.model, self.positions = model, positions[:, -1:]
        self.cache = KVCache(model, ids.shape[0], ids.shape[1] + max_new_tokens)
        last = torch.zeros_like(ids, dtype=torch.bool)
        last[:, -1] = True  # only the last prompt token's logits are needed
        self.logits = model(ids, position_ids=positions, segment_ids=segments, cache=self.cache, logits_at=last)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.positions = self.positions + 1
        ones = torch.ones_like(tokens)[:, None]
        return self.model(tokens[:, None], position_ids=self.positions, segment_ids=ones, cache=self.cache)[:, -1]

    def keep(self, rows: torch.Tensor) -> None:
        self.positions = self.positions[rows]
        self.cache.keep(rows)


class _FullDecoder:
    """No cache: every step runs the whole sequence again (the baseline the cache is checked
    and benchmarked against)."""

    def __init__(self, model, ids, positions, segments, max_new_tokens: int):
        self.model, self.ids, self.positions, self.segments = model, ids, positions, segments
        self.logits = self._run()

    def _run(self) -> torch.Tensor:
        return self.model(self.ids, position_ids=self.positions, segment_ids=self.segments)[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.segments = torch.cat([self.segments, self.segments[:, -1:]], dim=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)
        return self._run()

    def keep(self, rows: torch.Tensor) -> None:
        self.ids, self.positions, self.segments = self.ids[rows], self.positions[rows], self.segments[rows]


@torch.no_grad()
def generate_batch(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    *,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    use_cache: bool = True,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """New token ids per prompt, up to and including the first stop id (or max_new_tokens).

    temperature 0: greedy; else sampling (see the module docstring), from a generator seeded
    with `seed`. use_cache=False recomputes the whole sequence each step (same tokens, slower).
    vocab_size: the tokenizer's; ids at or beyond it (the rows that padding the embedding to a
    multiple of 64 adds, which no tokenizer can decode) are never chosen.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
    outputs: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0:
        return outputs
    ids, positions, segments = left_pad(prompts, pad_id)
    vocab = model.lm_head.out_features
    seen = None
    if sampling.repetition_penalty != 1.0:  # which tokens each row holds (padding excluded)
        seen = torch.zeros((len(prompts), vocab), dtype=torch.bool).scatter_(1, ids, segments.bool())
    generator = torch.Generator().manual_seed(seed)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
    decoder = (_CachedDecoder if use_cache else _FullDecoder)(model, ids, positions, segments, max_new_tokens)
    logits = decoder.logits
    active = torch.arange(len(prompts))  # rows still generating
    for step in range(max_new_tokens):
        logits = logits.float()
        if vocab_size is not None and vocab_size < vocab:
            logits[:, vocab_size:] = float("-inf")
        chosen = choose(process_logits(logits, seen, sampling), sampling, generator)
        for r, token in zip(active.tolist(), chosen.tolist()):
            outputs[r].append(token)
        going = ~torch.isin(chosen, stops)
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        if seen is not None:
            seen[torch.arange(len(chosen)), chosen] = True
        if not bool(going.all()):
            active, chosen = active[going], chosen[going]
            decoder.keep(going.nonzero()[:, 0])
            seen = None if seen is None else seen[going]
        logits = decoder.step(chosen)
    return outputs


def load_model(path: str | Path) -> CodeGenForCausalLM:
    """An fp32 model in eval mode from a moss-train checkpoint (a step, checkpoints or run
    directory; ZeRO shards consolidated) or an HF CodeGen / MOSS directory, through the same
    weight sources as ``stage.init_from`` (moss_train/checkpoint/sources.py)."""
    from moss_train.checkpoint.sources import open_source

    source = open_source(path)
    source.verify()  # a moss-train checkpoint's checksums, before its weights are used
    model = CodeGenForCausalLM(source.model_config)
    model.load_state_dict({name: source.tensor(name).float() for name in source.names})
    return model.eval()
