"""Where moss-train's step spends its time: torch.profiler over `Trainer.train_step`, the
operators grouped into matmuls, attention, the loss, the optimizer and the rest, and the step's
time outside every operator (Python, DeepSpeed's hooks, dispatch): what a tiny model's step is
mostly made of (`--config tiny --batch-size 1 --seq-len 64`).

    python bench/profile_step.py                       # small config, fp32, ZeRO-3, 2 profiled steps
    python bench/profile_step.py --zero-stage 0 --precision bf16-autocast --write
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import train_throughput as tt
from bench_report import cpu_line, publish

# Operator name (prefix) -> category; the first match wins, the rest is "other".
CATEGORIES = [
    ("matmul (linear layers, lm_head)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")),
    ("attention (SDPA)", ("aten::_scaled_dot_product", "aten::scaled_dot_product")),
    (
        "loss (log-sum-exp, softmax, gather, scatter)",
        (
            "aten::amax",
            "aten::exp",
            "aten::log",
            "aten::_log_softmax",
            "aten::_softmax",
            "aten::log_softmax",
            "aten::softmax",
            "aten::argmax",
            "aten::scatter_add",
            "aten::gather",
        ),
    ),
    ("optimizer (fused AdamW)", ("aten::_fused_adamw", "aten::_fused_adam")),
    ("grad norm, clipping", ("aten::linalg_vector_norm", "aten::norm", "aten::_foreach_norm")),
    ("copies (ZeRO buffers, casts)", ("aten::copy_", "aten::cat", "aten::fill_", "aten::zero_")),
    (
        "gelu, layer norm, rotary, residual",
        ("aten::gelu", "aten::native_layer_norm", "aten::mul", "aten::add", "aten::sub", "aten::neg", "aten::stack"),
    ),
]


def category(name: str) -> str:
    for label, prefixes in CATEGORIES:
        if name.startswith(prefixes):
            return label
    return "other"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", choices=list(tt.CONFIGS))
    p.add_argument("--precision", default="fp32")
    p.add_argument("--zero-stage", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's bench shape")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args(argv)

    from moss_train.distributed import init_distributed

    device = init_distributed().device
    batch_size, seq_len = tt.shape(args, args.config)
    model_cfg = tt.CONFIGS[args.config]
    trainer = tt.moss_trainer(
        model_cfg, args.precision, args.zero_stage, tt.make_batch(model_cfg, batch_size, seq_len, device)
    )
    for _ in range(2):  # warm-up: oneDNN kernel choice, allocator, DeepSpeed buffers
        trainer.train_step()
    load_before = tt.load_line()
    start = time.perf_counter()
    with profile(
        activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ) as prof:
        for _ in range(args.steps):
            trainer.train_step()
    wall = (time.perf_counter() - start) / args.steps
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))

    per_category = defaultdict(float)
    for event in events:
        per_category[category(event.key)] += event.self_cpu_time_total / 1e6 / args.steps
    # What no operator accounts for: Python, DeepSpeed's module hooks, dispatch (and the profiler's own cost).
    per_category["outside the operators (Python, hooks, dispatch)"] = max(wall - sum(per_category.values()), 0.0)
    lines = [
        "### profile_step — moss-train step, "
        f"{args.config} ({tt.num_parameters(model_cfg) / 1e6:.0f}M), {args.precision}, "
        f"batch {batch_size} x seq {seq_len}, {tt.zero_label(args.zero_stage, args.precision)}, "
        f"{torch.get_num_threads()} threads",
        "",
        f"`{tt.command_line(argv).strip()}` ({time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
        f"{load_before} before / {tt.load_line()[len('1-min load average ') :]} after; {cpu_line()}; "
        f"{wall * 1e3:.1f} ms per profiled step)",
        "",
        "| where | ms per step | share of the step |",
        "|---|---|---|",
    ]
    for label, seconds in sorted(per_category.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {label} | {seconds * 1e3:.1f} | {seconds / wall:.1%} |")
    publish(lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
