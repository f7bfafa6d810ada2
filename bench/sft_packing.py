"""SFT throughput: packed conversations vs the original MOSS recipe's pad-to-longest batches.

The moss-003 sample shared with the workspace is rendered with `moss-data sft` and trained on
by the real `stage=sft` through the real Trainer step (DeepSpeed engine, global token-mean loss),
once per batching mode, in one process:

- packed:             several whole conversations per `--seq-len` sequence, attention kept per
                      conversation (`sft.packing=packed`);
- original recipe:    one conversation per row, random batches padded to the longest
                      (`sft.packing=padded sft.padded_order=random`), as MOSS's finetune_moss.py;
- length-grouped:     one conversation per row, similar lengths per micro-batch
                      (`sft.packing=padded sft.padded_order=length_grouped`).

Same model, same conversations (each mode makes one pass over the same set, so the same
loss-bearing tokens — the token budget), same micro-batch size in rows. Steps of the modes
alternate so machine noise hits all alike. The figure is loss-bearing tokens per second.

    python bench/sft_packing.py                          # tokenizer from data/pretrain-demo
    python bench/sft_packing.py --conversations 200 --write
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from data_pipelines.sft import render_sft
from moss_train.config import compose, to_object, validate
from moss_train.distributed import init_distributed
from moss_train.engine.loop import Trainer
from moss_train.model.config import num_parameters
from moss_train.stages.sft import SFTStage

from bench_report import publish

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "moss-003-sft-sample" / "conversations.jsonl"
MODES = {
    "packed": ["sft.packing=packed"],
    "original (random, pad to longest)": ["sft.packing=padded", "sft.padded_order=random"],
    "padded, length-grouped": ["sft.packing=padded", "sft.padded_order=length_grouped"],
}
BASELINE = "original (random, pad to longest)"


def render_subset(sample: Path, tokenizer: str, out: Path, conversations: int, seed: int) -> dict:
    lines = [line for line in sample.read_text(encoding="utf-8").splitlines() if line.strip()]
    if conversations:
        lines = random.Random(seed).sample(lines, min(conversations, len(lines)))
    subset = out / "conversations.jsonl"
    subset.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return render_sft([subset], tokenizer, out / "rendered")


def make_trainer(args, data_root: Path, mode_overrides: list[str]) -> Trainer:
    overrides = [
        "stage=sft",
        "data=sft_moss003_sample",
        f"model={args.model}",
        f"data.root={data_root}",
        "data.valid_shards=[]",
        f"data.tokenizer={args.tokenizer}",
        f"data.seq_len={args.seq_len}",
        f"model.n_positions={max(args.seq_len, 512)}",
        f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.global_batch_size={args.micro_batch}",
        f"trainer.precision={args.precision}",
        f"deepspeed=zero{args.zero_stage}",
        "logging.wandb=disabled",
        "logging.progress_bar=false",
        f"sft.loss_mask={args.loss_mask}",
        f"run.output_dir={data_root / 'runs'}",
        *mode_overrides,
    ]
    cfg = compose(overrides)
    validate(cfg)
    return Trainer(to_object(cfg), SFTStage())


def step_work(trainer: Trainer) -> tuple[int, int]:
    """(loss-bearing tokens, computed token positions) of the trainer's next step."""
    targets = computed = 0
    for indices in trainer.plan.micro_batches_at(trainer.samples_consumed):
        batch = trainer.data.collate([trainer.data.train[int(i)] for i in indices])
        targets += trainer.data.count_targets(batch)
        computed += batch["input_ids"].numel()
    return targets, computed


def run(args) -> list[dict]:
    init_distributed()
    with tempfile.TemporaryDirectory() as tmp:
        summary = render_subset(Path(args.sample), args.tokenizer, Path(tmp), args.conversations, args.seed)
        trainers = {name: make_trainer(args, Path(tmp) / "rendered", extra) for name, extra in MODES.items()}
        stats = {
            name: {"steps": 0, "targets": 0, "computed": 0, "seconds": 0.0, "samples": len(t.data.train)}
            for name, t in trainers.items()
        }
        # One pass over each mode's samples: ceil(samples / micro-batch) steps; warm-up steps
        # first (timed separately, not counted), then the modes' steps alternate.
        remaining = {name: -(-len(t.data.train) // args.micro_batch) for name, t in trainers.items()}
        for trainer in trainers.values():
            for _ in range(args.warmup):
                trainer.train_step()
            trainer.samples_consumed = 0  # the measured pass starts at the beginning again
        while any(remaining.values()):
            for name, trainer in trainers.items():
                if not remaining[name]:
                    continue
                targets, computed = step_work(trainer)
                start = time.perf_counter()
                trainer.train_step()
                stats[name]["seconds"] += time.perf_counter() - start
                stats[name]["steps"] += 1
                stats[name]["targets"] += targets
                stats[name]["computed"] += computed
                remaining[name] -= 1
        model_params = num_parameters(trainers["packed"].model_config)
    rows = [{"mode": name, **s, "loss_tokens_per_s": s["targets"] / s["seconds"]} for name, s in stats.items()]
    base = next(r for r in rows if r["mode"] == BASELINE)["loss_tokens_per_s"]
    for row in rows:
        row["speedup"] = row["loss_tokens_per_s"] / base
    return rows, summary, model_params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", default=str(SAMPLE), help="moss-003 conversations.jsonl")
    parser.add_argument("--tokenizer", default=str(REPO / "data" / "pretrain-demo" / "tokenizer"))
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per step, every mode")
    parser.add_argument("--conversations", type=int, default=0, help="a seeded subset of the sample (0: all 550)")
    parser.add_argument("--loss-mask", default="default", choices=["default", "moss_reference"])
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args(argv)
    if not Path(args.tokenizer).is_dir():
        raise SystemExit(
            f"no tokenizer at {args.tokenizer}: run `moss-data prepare-pretrain-demo --out data/pretrain-demo` first"
        )
    rows, summary, params = run(args)
    command = "python bench/sft_packing.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = [
        f"### sft_packing — model {args.model} ({params / 1e6:.1f}M params), seq_len {args.seq_len}, "
        f"micro-batch {args.micro_batch} rows, {args.loss_mask} mask, ZeRO-{args.zero_stage}, {args.precision}, "
        f"{torch.get_num_threads()} threads",
        "",
        f"`{command.strip()}` ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}); data: "
        f"{summary['conversations_written']} moss-003 sample conversations, each mode one pass over the same set",
        "",
        "| batching | steps | rows | loss-bearing tokens | computed tokens | seconds | "
        "loss-bearing tokens/s | vs original |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table += [
        f"| {r['mode']} | {r['steps']} | {r['samples']} | {r['targets']} | {r['computed']} | {r['seconds']:.1f} | "
        f"{r['loss_tokens_per_s']:.0f} | {r['speedup']:.2f}x |"
        for r in rows
    ]
    print(json.dumps(rows, indent=1))
    publish(table, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
