"""LoRA against full fine-tuning: the same SFT data, the same base, the same recipe otherwise.

Each side is a real `moss-train stage=sft` run from `stage.init_from` (one process, the recipe's
ZeRO stage), in its own subprocess, alternating (full, LoRA, LoRA, full, ...) so the machine's
load hits both alike. Per side: trainable parameters, peak resident memory of the process (the
trainer's mem_rss_peak_gb), training tokens/s (median over each run's steps after the first),
the checkpoint's size on disk, and the held-out loss at the end.

    python bench/lora_vs_full.py --base runs/small-pretrain --data data/sft-demo-32k \\
        --tokenizer data/pretrain-demo-32k/tokenizer --model small --steps 12 --write
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_report import cpu_line, publish
from train_throughput import load_line, run_line

REPO = Path(__file__).resolve().parents[1]
TRAINED = re.compile(r"LoRA r=\d+ alpha=[\d.]+ on [\w, ]+: ([\d,]+) trainable parameters of ([\d,]+)")


def run_side(out: Path, lora_r: int, args) -> dict:
    overrides = [
        "stage=sft",
        "data=sft_demo",
        f"data.root={args.data}",
        f"data.tokenizer={args.tokenizer}",
        f"data.seq_len={args.seq_len}",
        f"model={args.model}",
        f"stage.init_from={args.base}",
        f"run.output_dir={out}",
        f"lora.r={lora_r}",
        f"deepspeed.zero_stage={args.zero_stage}",
        f"trainer.max_steps={args.steps}",
        f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.global_batch_size={args.global_batch}",
        "trainer.warmup_steps=2",
        f"trainer.lr={args.lr_lora if lora_r else args.lr}",
        "trainer.precision=fp32",
        f"trainer.eval_samples={args.eval_samples}",
        "logging.wandb=disabled",
        "logging.progress_bar=false",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "moss-train"), *overrides], capture_output=True, text=True, cwd=REPO, env=env
    )
    if result.returncode:
        raise RuntimeError(f"moss-train failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "tokens_per_s" in r]
    step_dir = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    found = TRAINED.search(result.stdout)
    return {
        "trainable": int(found.group(1).replace(",", "")) if found else None,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[1:]),
        "peak_rss_gb": max(r["mem_rss_peak_gb"] for r in steps),
        "checkpoint_mb": sum(p.stat().st_size for p in step_dir.iterdir()) / 2**20,
        "eval_loss": [r["eval_loss"] for r in records if "eval_loss" in r][-1],
        "first_loss": steps[0]["loss"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="stage.init_from: the model both sides fine-tune")
    p.add_argument("--data", required=True, help="moss-data sft output (data.root)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--model", default="small", help="the model recipe (its shapes come from --base)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2, help="runs per side, alternating")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4, help="full fine-tuning's learning rate")
    p.add_argument("--lr-lora", type=float, default=1e-3, help="LoRA's learning rate")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--zero-stage", type=int, default=3)
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    load_before = load_line()
    sides = {"full fine-tuning": 0, f"LoRA r={args.lora_r}": args.lora_r}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory(prefix="lora-vs-full-") as tmp:
        order = list(sides)
        for k in range(args.rounds):
            for name in order if k % 2 == 0 else order[::-1]:
                runs[name].append(run_side(Path(tmp) / f"{k}-{sides[name]}", sides[name], args))
    full = statistics.median(r["tokens_per_s"] for r in runs["full fine-tuning"])
    lines = [
        f"### lora_vs_full — SFT from {args.base} ({args.model}), "
        f"{args.steps} steps x {args.global_batch} x {args.seq_len}, "
        f"ZeRO-{args.zero_stage}, fp32 ({cpu_line()}, {args.threads} threads), each run its own process, alternating",
        "",
        run_line(argv, load_before) + f"; {args.rounds} runs per side; lr {args.lr} (full) / {args.lr_lora} (LoRA)",
        "",
        "| side | trainable params | peak RSS GB | tokens/s (median) | vs full | checkpoint MB | loss step 1 | "
        "held-out loss at the end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in runs.items():
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        trainable = rs[0]["trainable"]
        lines.append(
            f"| {name} | {trainable if trainable is not None else 'all':} | "
            f"{max(r['peak_rss_gb'] for r in rs):.2f} | {tps:.0f} | {tps / full:.2f}x | "
            f"{rs[0]['checkpoint_mb']:.1f} | {rs[0]['first_loss']:.3f} | "
            f"{statistics.median(r['eval_loss'] for r in rs):.3f} |"
        )
    publish(lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
