"""Minimal generation: greedy or sampled decoding of a batch of prompts, and loading a trained model.

No KV cache yet (each step runs the whole sequence), which is fine for tiny models and short
answers — the quickstart's held-out tool-use figure. Prompts of different lengths are batched
with left padding kept out of attention by ``segment_ids`` (padding is segment 0, the prompt
segment 1) and positions counted from each prompt's first token, so a row's tokens are exactly
what the model would compute for that prompt alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from moss_train.model.codegen import CodeGenForCausalLM


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
) -> list[list[int]]:
    """New token ids per prompt, up to and including the first stop id (or max_new_tokens).

    temperature 0: greedy; else sampling from softmax(logits / temperature), restricted to the
    `top_k` most likely tokens when top_k > 0, from a generator seeded with `seed`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    rows, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((rows, longest), pad_id, dtype=torch.long)
    segments = torch.zeros((rows, longest), dtype=torch.long)
    positions = torch.zeros((rows, longest), dtype=torch.long)
    for r, prompt in enumerate(prompts):
        start = longest - len(prompt)
        ids[r, start:] = torch.as_tensor(list(prompt), dtype=torch.long)
        segments[r, start:] = 1
        positions[r, start:] = torch.arange(len(prompt))
    generator = torch.Generator().manual_seed(seed)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
    outputs: list[list[int]] = [[] for _ in range(rows)]
    active = torch.arange(rows)  # rows still generating; finished rows leave the batch
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, position_ids=positions, segment_ids=segments)[:, -1].float()
        chosen = _pick(logits, temperature, top_k, generator)
        for r, token in zip(active.tolist(), chosen.tolist()):
            outputs[r].append(token)
        going = ~torch.isin(chosen, stops)
        if not bool(going.any()):
            break
        active, chosen = active[going], chosen[going]
        ids = torch.cat([ids[going], chosen[:, None]], dim=1)
        segments = torch.cat([segments[going], segments[going, -1:]], dim=1)
        positions = torch.cat([positions[going], positions[going, -1:] + 1], dim=1)
    return outputs


def _pick(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


def load_model(path: str | Path) -> CodeGenForCausalLM:
    """An fp32 model in eval mode from a moss-train checkpoint (a step, checkpoints or run
    directory; ZeRO shards consolidated) or an HF CodeGen / MOSS directory, through the same
    weight sources as ``stage.init_from`` (moss_train/checkpoint/sources.py)."""
    from moss_train.checkpoint.sources import open_source

    source = open_source(path)
    source.verify()  # a moss-train checkpoint's checksums, before its weights are used
    model = CodeGenForCausalLM(source.model_config)
    model.load_state_dict({name: source.tensor(name) for name in source.names})
    return model.eval()
