"""Activation checkpointing (model.gradient_checkpointing): what it costs in step time and what
it saves in peak memory, on moss-train's own step (DeepSpeed engine, the recipe's optimizer).

Each variant runs in its own subprocess (peak memory is per process: ru_maxrss on a CPU,
max_memory_allocated on a GPU), alternating round by round; the figure is the median step.

    python bench/activation_checkpointing.py                         # small, batch 4 x seq 512, fp32
    python bench/activation_checkpointing.py --seq-len 1024 --write  # also append the table to RESULTS.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import train_throughput as tt
from bench_report import publish


def main(argv=None) -> int:
    args = tt.parser(__doc__).parse_args(argv)
    if args.worker:
        return tt.run_worker(args, tt.SIDES)
    script = Path(__file__).resolve()
    load_before = tt.load_line()
    config = args.configs.split(",")[0]
    precision = (args.precisions or ("bf16" if torch.cuda.is_available() else "fp32")).split(",")[0]
    variants = {
        "no checkpointing": ("moss-train", []),
        "activation checkpointing": ("moss-train", ["--gradient-checkpointing"]),
    }
    pooled = tt.alternate(script, variants, config, precision, args)
    batch_size, seq_len = tt.shape(args, config)
    base = pooled["no checkpointing"]
    base_memory = max(base["peak_memory_gb"])
    lines = [
        f"### activation_checkpointing — {config} ({tt.num_parameters(tt.CONFIGS[config]) / 1e6:.0f}M), {precision}, "
        f"batch {batch_size} x seq {seq_len}, ZeRO-{args.zero_stage}, {base['device']}, "
        "each variant in its own subprocess, alternating",
        "",
        tt.run_line(argv, load_before),
        "",
        "| variant | median step s | step time vs none | peak memory GB | memory vs none | first loss |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in pooled.items():
        memory = max(entry["peak_memory_gb"])
        lines.append(
            f"| {name} | {entry['median_s']:.2f} | {entry['median_s'] / base['median_s'] - 1:+.1%} | "
            f"{memory:.2f} | {memory - base_memory:+.2f} GB | {entry['losses'][0][0]:.6f} |"
        )
    publish(lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
