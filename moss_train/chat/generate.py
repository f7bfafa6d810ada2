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

One decoding loop, :class:`DecodingBatch`, serves both callers: ``generate_batch`` (a fixed set
of prompts, one generator for the batch) and moss-serve (continuous batching: a request's row
joins the running batch between two steps, is prefilled on its own and appended to the cache,
and leaves when it stops or its client goes away; each request samples from its own generator).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
            _LayerKV(
                self,
                torch.empty(shape, dtype=param.dtype, device=param.device),
                torch.empty(shape, dtype=param.dtype, device=param.device),
            )
            for _ in range(cfg.n_layer)
        ]
        self.segments = torch.empty((batch, capacity), dtype=torch.long, device=param.device)
        self.capacity = capacity
        self.length = 0
        self.span = (0, 0)
        self.one_segment: int | bool | None = None  # the only segment id so far; False: several

    def attention_mask(self, segment_ids: torch.Tensor | None) -> torch.Tensor | None:
        """(B, 1, T, length + T) bool: a new token sees each cached or new token of its own
        segment at or before it. Padding (its own segment) never mixes with a prompt.

        None (plain causal attention, no mask to build or apply) while every cached and new
        token is of one segment and the new tokens are the first ones or a single one: the
        common case of unpadded prompts, where a decoding step then builds no mask at all.
        """
        if segment_ids is None:
            raise ValueError("generation with a KV cache needs segment_ids")
        start, end = self.length, self.length + segment_ids.shape[1]
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} tokens is full")
        self.segments[:, start:end] = segment_ids
        self.length, self.span = end, (start, end)
        if self.one_segment is None:  # the first tokens set the segment the rest are compared with
            self.one_segment = int(segment_ids[0, 0])
        if self.one_segment is not False and bool((segment_ids == self.one_segment).all()):
            if start == 0 or end - start == 1:
                return None
        else:
            self.one_segment = False
        same = self.segments[:, None, :end] == segment_ids[:, :, None]  # (B, T, end)
        if end - start > 1:  # a single new token comes after every cached one: causal already
            same &= (
                torch.arange(end, device=same.device)[None, :] <= torch.arange(start, end, device=same.device)[:, None]
            )
        return same[:, None]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` of the batch (finished rows leave)."""
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
        self.segments = self.segments[rows]

    def join(self, other: KVCache, room: int) -> None:
        """Append the rows of `other` (new rows, prefilled), both right-aligned to a common
        length with `room` free columns after it. The leading columns that are padding in every
        row of this cache (left by rows that have left) are dropped on the way."""
        used = (self.segments[:, : self.length] != 0).any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self.length
        mine, theirs = self.length - start, other.length
        length = max(mine, theirs)
        rows = self.segments.shape[0] + other.segments.shape[0]
        segments = torch.zeros((rows, length + room), dtype=self.segments.dtype, device=self.segments.device)
        segments[: -other.segments.shape[0], length - mine : length] = self.segments[:, start : self.length]
        segments[-other.segments.shape[0] :, length - theirs : length] = other.segments[:, :theirs]
        for layer, new in zip(self.layers, other.layers):
            for name in ("keys", "values"):
                old, add = getattr(layer, name), getattr(new, name)
                merged = old.new_zeros((rows, old.shape[1], length + room, old.shape[3]))
                merged[: old.shape[0], :, length - mine : length] = old[:, :, start : self.length]
                merged[old.shape[0] :, :, length - theirs : length] = add[:, :, :theirs]
                setattr(layer, name, merged)
        self.segments, self.capacity, self.length, self.span = segments, length + room, length, (length, length)
        self.one_segment = False  # rows right-aligned to a common length: padding before the shorter


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
            raise ValueError(
                f"invalid sampling settings {self}: "
                "temperature >= 0, top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0"
            )

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
        logits = logits.masked_fill(~nucleus(logits, sampling.top_p), float("-inf"))
    return logits


# top_p: the nucleus is looked for among this many most likely tokens before sorting a whole row.
NUCLEUS_CANDIDATES = 64


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) bool, the tokens top_p keeps. HF drops the least likely tokens whose cumulative
    probability is <= 1 - top_p, never the most likely one: it keeps a token iff the tokens more
    likely than it hold less than top_p.

    A full sort of 32 x 8000 logits takes 11.7 ms on one CPU thread, half of a sampled decoding
    step; the nucleus mostly lies among the first few dozen tokens, which topk finds in 0.8 ms.
    Rows whose nucleus reaches past the candidates are sorted whole."""
    probs = logits.softmax(dim=-1)
    top, index = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)  # most likely first
    kept = top.cumsum(dim=-1) - top < top_p
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, index, kept)
    spill = kept[:, -1] & (top.shape[-1] < probs.shape[-1])
    if spill.any():
        ascending, order = torch.sort(logits[spill], descending=False)
        remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[:, -1] = False
        keep[spill] = ~remove.scatter(1, order, remove)
    return keep


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    if sampling.greedy:
        return greedy_choice(logits)
    # One uniform draw per row through the inverse of its cumulative distribution. torch.multinomial
    # draws an exponential per vocabulary entry: 4.4 ms for 32 x 8000 on one CPU thread, half of a
    # sampled decoding step; this takes 0.5 ms. The draw is scaled below the row's total so that it
    # always lands on a token of probability > 0 (never one that top_k / top_p removed).
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    if not bool(torch.isfinite(cdf[:, -1]).all()):  # as torch.multinomial refuses to draw from them
        raise ValueError("cannot sample: the logits of a row are NaN or all -inf")
    draw = torch.rand((logits.shape[0], 1), generator=generator, device=logits.device)
    return torch.searchsorted(cdf, draw * (cdf[:, -1:] * _BELOW_ONE), right=True)[:, 0]


_BELOW_ONE = 1 - 2**-23  # x * _BELOW_ONE < x for every positive fp32 x


def greedy_choice(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax: the first maximum, a NaN counting as the maximum (torch's and numpy's
    rule alike). On a CPU, numpy's vectorised argmax: for 32 x 8000 fp32 logits, 1 thread, it
    takes 0.03 ms where torch's max / argmax along a row take 0.25 ms (an AVX2 AMD EPYC; 0.10
    ms on an AVX-512 one), a tenth of a decoding step of the 2.5M-parameter model."""
    if logits.device.type != "cpu":
        return logits.argmax(dim=-1)
    return torch.from_numpy(logits.numpy().argmax(axis=-1))


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

    def __init__(self, model, ids, positions, segments, room: int):
        self.model, self.positions = model, positions[:, -1:]
        self.cache = KVCache(model, ids.shape[0], ids.shape[1] + room)
        last = torch.zeros_like(ids, dtype=torch.bool)
        last[:, -1] = True  # only the last prompt token's logits are needed
        self.logits = model(ids, position_ids=positions, segment_ids=segments, cache=self.cache, logits_at=last)

    def join(self, ids, positions, segments, room: int) -> torch.Tensor:
        """Prefill new rows on their own, append them to the batch; their next-token logits."""
        new = _CachedDecoder(self.model, ids, positions, segments, 0)
        self.cache.join(new.cache, room)
        self.positions = torch.cat([self.positions, new.positions])
        return new.logits

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

    def __init__(self, model, ids, positions, segments, room: int):
        self.model, self.ids, self.positions, self.segments = model, ids, positions, segments
        self.logits = self._run()

    def _run(self) -> torch.Tensor:
        return self.model(self.ids, position_ids=self.positions, segment_ids=self.segments)[:, -1]

    def join(self, ids, positions, segments, room: int) -> torch.Tensor:
        width = max(self.ids.shape[1], ids.shape[1])
        old, new = (
            (_pad_left(t, width) for t in (self.ids, self.positions, self.segments)),
            (_pad_left(t, width) for t in (ids, positions, segments)),
        )
        (self.ids, self.positions, self.segments) = (torch.cat(pair) for pair in zip(old, new))
        return self._run()[-ids.shape[0] :]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.segments = torch.cat([self.segments, self.segments[:, -1:]], dim=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)
        return self._run()

    def keep(self, rows: torch.Tensor) -> None:
        self.ids, self.positions, self.segments = self.ids[rows], self.positions[rows], self.segments[rows]


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (width - t.shape[1], 0))  # zeros: segment 0, padding


@dataclass(eq=False)
class Row:
    """One prompt being continued: how it is sampled, when it stops, what it has generated.

    `cancelled` may be set from any thread (a client went away): the row leaves the batch at
    the next step without another token. Rows sharing one `generator` and one `sampling` draw
    their tokens together, in row order (``generate_batch``'s batches); a row with a generator
    of its own gets the tokens it would get alone, whoever it is batched with.
    """

    prompt: Sequence[int]
    max_new_tokens: int
    stop_ids: frozenset[int] = frozenset()
    sampling: Sampling = Sampling()
    generator: torch.Generator | None = None  # None: seeded with 0
    tokens: list[int] = field(default_factory=list)
    stopped: bool = False  # by a stop id or max_new_tokens
    cancelled: bool = False

    def __post_init__(self):
        if len(self.prompt) == 0:
            raise ValueError("every prompt needs at least one token")
        self.stop_ids = frozenset(self.stop_ids)
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(0)

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.tokens)

    @property
    def done(self) -> bool:
        return self.stopped or self.cancelled


class DecodingBatch:
    """Rows decoded together, one token per row per :meth:`step`, with continuous batching:
    rows join with :meth:`add` between any two steps and leave as soon as they stop.

    Rows are left-padded to a common length and kept apart by segment ids (see the module
    docstring), so a row's tokens do not depend on the other rows. A joining row is prefilled
    on its own and appended to the cache; the columns that no row uses any more are dropped then.
    """

    def __init__(self, model, pad_id: int = 0, vocab_size: int | None = None, use_cache: bool = True):
        self.model, self.pad_id, self.use_cache = model, pad_id, use_cache
        self.vocab = model.lm_head.out_features
        self.vocab_size = vocab_size if vocab_size is not None and vocab_size < self.vocab else None
        self.rows: list[Row] = []
        self.groups: list | None = None  # _sampling_groups() of the rows, until the rows change
        self.decoder = None
        self.logits: torch.Tensor | None = None  # (rows, vocab): each row's next-token logits
        self.seen: torch.Tensor | None = None  # (rows, vocab) bool: prompt + generated, for the penalty

    @torch.inference_mode()
    def add(self, rows: Sequence[Row]) -> None:
        for row in rows:
            row.stopped = row.stopped or row.remaining <= 0
        rows = [row for row in rows if not row.done]
        if not rows:
            return
        ids, positions, segments = left_pad([row.prompt for row in rows], self.pad_id)
        if self.decoder is None:
            decoder = _CachedDecoder if self.use_cache else _FullDecoder
            self.decoder = decoder(self.model, ids, positions, segments, max(row.remaining for row in rows))
            self.rows, self.logits = list(rows), self.decoder.logits
        else:
            room = max(row.remaining for row in [*self.rows, *rows])
            logits = self.decoder.join(ids, positions, segments, room)
            self.rows += rows
            self.logits = torch.cat([self.logits, logits])
        self.seen = self._seen(rows)
        self.groups = None

    def _seen(self, new_rows: Sequence[Row]) -> torch.Tensor | None:
        """The penalty's (rows, vocab) bool table of tokens seen, only while some row has a
        penalty (built from the rows' tokens when the first such row joins)."""
        if all(row.sampling.repetition_penalty == 1.0 for row in self.rows):
            return None
        missing = self.rows if self.seen is None else new_rows
        seen = torch.zeros((len(missing), self.vocab), dtype=torch.bool)
        for r, row in enumerate(missing):
            seen[r, torch.as_tensor([*row.prompt, *row.tokens], dtype=torch.long)] = True
        return seen if self.seen is None else torch.cat([self.seen, seen])

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, int]]:
        """One token for every row, as (row, token); rows that stop (or were cancelled) leave."""
        self._leave([row.cancelled for row in self.rows])
        if not self.rows:
            return []
        chosen = self._choose(self.logits.float())
        tokens = chosen.tolist()
        for row, token in zip(self.rows, tokens):
            row.tokens.append(token)
            row.stopped = token in row.stop_ids or row.remaining <= 0
        if self.seen is not None:
            self.seen[torch.arange(len(tokens)), chosen] = True
        events = list(zip(self.rows, tokens))
        stopped = [row.stopped for row in self.rows]
        if any(stopped):
            chosen = chosen[torch.tensor([not gone for gone in stopped])]
            self._leave(stopped)
        if self.rows:
            self.logits = self.decoder.step(chosen)
        return events

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token from its (rows, vocab) logits, by its sampling group."""
        if self.vocab_size is not None:
            logits[:, self.vocab_size :] = float("-inf")
        if self.groups is None:
            self.groups = self._sampling_groups()
        groups = self.groups
        if len(groups) == 1:  # the whole batch draws together: no gathering of its rows
            (sampling, generator), _ = groups[0]
            return choose(process_logits(logits, self.seen, sampling), sampling, generator)
        chosen = torch.empty(len(self.rows), dtype=torch.long)
        for (sampling, generator), index in groups:
            seen = None if self.seen is None else self.seen[index]
            chosen[index] = choose(process_logits(logits[index], seen, sampling), sampling, generator)
        return chosen

    def _sampling_groups(self):
        """Rows that draw together: same settings and generator (greedy rows need no generator)."""
        groups: dict = {}
        for r, row in enumerate(self.rows):
            key = (row.sampling, None if row.sampling.greedy else id(row.generator))
            groups.setdefault(key, ((row.sampling, row.generator), []))[1].append(r)
        return [(settings, torch.tensor(index)) for settings, index in groups.values()]

    def _leave(self, leaving: list[bool]) -> None:
        if not any(leaving):
            return
        self.rows = [row for row, gone in zip(self.rows, leaving) if not gone]
        self.groups = None
        if not self.rows:  # the next add() starts a fresh cache
            self.decoder = self.logits = self.seen = None
            return
        keep = torch.tensor([not gone for gone in leaving]).nonzero()[:, 0]
        self.decoder.keep(keep)
        self.logits = self.logits[keep]
        if self.seen is not None:
            self.seen = self.seen[keep]


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

    temperature 0: greedy; else sampling (see the module docstring), from one generator seeded
    with `seed` for the whole batch. use_cache=False recomputes the whole sequence each step
    (same tokens, slower). vocab_size: the tokenizer's; ids at or beyond it (the rows that
    padding the embedding to a multiple of 64 adds, which no tokenizer can decode) are never
    chosen.
    """
    if not prompts:
        raise ValueError("every prompt needs at least one token")
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
    generator = torch.Generator().manual_seed(seed)
    rows = [Row(prompt, max_new_tokens, frozenset(stop_ids), sampling, generator) for prompt in prompts]
    batch = DecodingBatch(model, pad_id, vocab_size, use_cache)
    batch.add(rows)
    while batch.rows:
        batch.step()
    return [row.tokens for row in rows]
