"""Generation speed: moss-chat's KV-cache decoding vs recomputing the whole sequence each step.

Both sides are `generate_batch` on the same model and prompts (greedy, no stop id, so every
row generates exactly --new-tokens); the only difference is ``use_cache``. The baseline
(``use_cache=False``) is what generation did before the cache. Models: the `model=tiny` and
`model=small` recipes with random weights and a 32k vocabulary; runs alternate cache / no
cache so machine noise hits both alike; the figure is the median run.

    python bench/generate_speed.py                       # tiny and small, batch 1 and 4, 1 thread
    python bench/generate_speed.py --write               # also append the table to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from dataclasses import replace

import torch

from moss_train.chat.generate import generate_batch
from moss_train.config import compose, to_object
from moss_train.model.codegen import CodeGenForCausalLM
from moss_train.model.config import num_parameters

from bench_report import publish

VOCAB = 32000


def recipe_model(name: str) -> CodeGenForCausalLM:
    cfg = replace(to_object(compose([f"model={name}"])).model, vocab_size=VOCAB)
    torch.manual_seed(0)
    return CodeGenForCausalLM(cfg).eval()


def tokens_per_second(model, batch: int, prompt_len: int, new_tokens: int, use_cache: bool) -> float:
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.randint(4, VOCAB, (batch, prompt_len), generator=generator).tolist()
    start = time.perf_counter()
    out = generate_batch(model, prompts, new_tokens, use_cache=use_cache)
    elapsed = time.perf_counter() - start
    assert all(len(row) == new_tokens for row in out)
    return batch * new_tokens / elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,small")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    p.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        model = recipe_model(name)
        params = num_parameters(model.config)
        for batch in [int(b) for b in args.batches.split(",")]:
            tokens_per_second(model, batch, 16, 4, True)  # warm-up (allocator, kernels)
            runs = {True: [], False: []}
            for _ in range(args.repeats):
                for use_cache in (True, False):
                    runs[use_cache].append(tokens_per_second(model, batch, args.prompt_len, args.new_tokens, use_cache))
            cached, full = statistics.median(runs[True]), statistics.median(runs[False])
            rows.append((name, params, batch, cached, full))
            print(f"{name} ({params / 1e6:.1f}M) batch {batch}: KV cache {cached:.1f} tok/s, no cache {full:.1f} tok/s, {cached / full:.2f}x", flush=True)
    publish(render(rows, args), args.write)
    return 0


def render(rows, args) -> list[str]:
    command = "python bench/generate_speed.py " + " ".join(sys.argv[1:])
    lines = [
        f"### generate_speed — greedy decoding, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens per row, fp32, "
        f"{torch.get_num_threads()} threads",
        "",
        f"`{command.strip()}` ({datetime.date.today()}, torch {torch.__version__}); random weights, vocabulary {VOCAB}; "
        f"median of {args.repeats} alternating runs",
        "",
        "| model | parameters | batch | KV cache tokens/s | no cache tokens/s (baseline) | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for name, params, batch, cached, full in rows:
        lines.append(f"| {name} | {params / 1e6:.1f}M | {batch} | {cached:.1f} | {full:.1f} | {cached / full:.2f}x |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
