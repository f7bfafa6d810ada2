"""The DeepSpeed engine's own cost: moss-train's step against a bare torch step doing the same work.

Same model (moss_train's CodeGenForCausalLM, same seed, so the same initial weights), same
optimizer (setup.build_optimizer: fused AdamW, no-decay groups), same schedule, same loss
(stages.lm.causal_lm_loss, token mean), same clipping, same batches, same process settings
(setup.tune_cpu: threads, allocator) — the only difference is the step going through
`Trainer.train_step` and the DeepSpeed engine (backward hooks, ZeRO partitioning, gradient
buckets, its clipping and norm). By default all variants live in one process and alternate
step by step, so they share the process settings and meet the same machine load (on a shared
machine the load changes within seconds; subprocesses that alternate round by round met
different loads and disagreed by 2-3x); --subprocesses runs each in its own process instead
(that also gives each one's peak memory). The figure is the median step.

A row where DeepSpeed really runs ZeRO-3 always gets its own process: building a ZeRO-3 engine
replaces torch.nn.functional.linear, for the whole process and for good, with DeepSpeed's
memory-efficient linear (zero3_linear_wrap), and every other variant in that process then paid
for it (tiny model, AVX2 EPYC: the bare torch step 13-15 ms alone, 21-25 ms beside a ZeRO-3
engine). With such a row the bench runs every variant in its own process.

    python bench/engine_overhead.py                        # ZeRO-0 and ZeRO-3 vs bare torch, fp32
    python bench/engine_overhead.py --ours-with deepspeed.zero3_on_one_rank=true  # also ZeRO-3 kept in one process
    python bench/engine_overhead.py --steps 8 --write      # also append the table to RESULTS.md
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import train_throughput as tt
from bench_report import publish


def torch_step_fn(model_cfg, precision, batch, args):
    """A plain torch training step with exactly the recipe's model, optimizer, loss and clipping."""
    from moss_train.config import MossTrainConfig
    from moss_train.distributed import init_distributed
    from moss_train.engine import setup
    from moss_train.model.codegen import CodeGenForCausalLM
    from moss_train.stages.lm import causal_lm_loss

    cfg = MossTrainConfig()
    cfg.model = model_cfg
    cfg.trainer = replace(cfg.trainer, precision=precision)
    dist_info = init_distributed()
    setup.tune_cpu(cfg, dist_info)
    precision = setup.resolve_precision(precision, dist_info.device)
    torch.manual_seed(cfg.trainer.seed)  # the Trainer's seed: the same initial weights
    model = CodeGenForCausalLM(model_cfg).to(dist_info.device).train()
    optimizer = setup.build_optimizer(model, cfg)
    scheduler = setup.scheduler_factory(cfg)(optimizer)

    def step() -> float:
        with setup.autocast_context(precision, dist_info.device):
            terms = causal_lm_loss(model, batch)
        (terms.loss_sum / terms.num_targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return (terms.loss_sum / terms.num_targets).item()

    return step


SIDES = {**tt.SIDES, "torch": torch_step_fn}


def memory_cell(peaks: list) -> str:
    return f"{max(peaks):.2f}" if peaks else "one process"


def engine_rows(args, precision: str) -> list[tuple[str, int, list, int]]:
    """(row name, ZeRO stage, recipe overrides, the stage DeepSpeed runs) of each moss-train row:
    every --engine-stages stage, alone and with each --ours-with lever."""
    rows = []
    for stage in map(int, args.engine_stages.split(",")):
        for lever in ["", *args.ours_with]:
            overrides = lever.split(",") if lever else []
            runs = tt.stage_that_runs(stage, precision, overrides)
            name = f"moss-train {tt.stage_label(stage, runs)}" + "".join(f" + {o}" for o in overrides)
            rows.append((name, stage, overrides, runs))
    return rows


def needs_own_processes(rows) -> bool:
    """Whether some row runs a real ZeRO-3 engine, which would slow the others in its process
    (the module docstring)."""
    return any(runs == 3 for *_, runs in rows)


def alternate_in_process(config: str, precision: str, args, rows) -> dict:
    """Build the bare torch step and one moss-train Trainer per ZeRO stage in this process,
    then time them in turn, step by step (the order reversed every other step)."""
    import argparse
    import statistics

    from moss_train.distributed import init_distributed

    device = init_distributed().device
    batch_size, seq_len = tt.shape(args, config)
    model_cfg = tt.CONFIGS[config]
    batch = tt.make_batch(model_cfg, batch_size, seq_len, device)
    steps = {"bare torch": torch_step_fn(model_cfg, precision, batch, args)}
    for name, stage, overrides, _ in rows:
        stage_args = argparse.Namespace(**{**vars(args), "zero_stage": stage, "overrides": overrides})
        steps[name] = tt.moss_step_fn(model_cfg, precision, batch, stage_args)
    pooled = {name: {"times": [], "losses": [[]], "peak_memory_gb": [], "device": str(device)} for name in steps}
    names = list(steps)
    for i in range(args.warmup + args.steps):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            pooled[name]["losses"][0].append(float(steps[name]()))
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                pooled[name]["times"].append(time.perf_counter() - start)
        if i >= args.warmup:
            print(f"  step {i + 1}: " + ", ".join(f"{n} {pooled[n]['times'][-1]:.2f}s" for n in names), flush=True)
    for entry in pooled.values():
        entry["median_s"] = statistics.median(entry["times"])
    return pooled


def parser():
    p = tt.parser(__doc__)
    p.add_argument("--engine-stages", default="0,3", help="ZeRO stages of the moss-train rows")
    p.add_argument("--subprocesses", action="store_true", help="each variant in its own subprocess, round by round")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        return tt.run_worker(args, SIDES)
    script = Path(__file__).resolve()
    load_before = tt.load_line()
    config = args.configs.split(",")[0]
    precision = (args.precisions or "fp32").split(",")[0]
    variants = {"bare torch": ("torch", [])}
    rows = engine_rows(args, precision)
    for name, stage, overrides, _ in rows:
        extra = ["--overrides", *overrides] if overrides else []
        variants[name] = ("moss-train", ["--zero-stage", str(stage), *extra])
    if not args.subprocesses and needs_own_processes(rows):
        print("A row runs ZeRO-3, whose engine would slow the other rows in its process: each in its own process.")
        args.subprocesses = True
    if args.subprocesses:
        pooled = tt.alternate(script, variants, config, precision, args)
        how = "each variant in its own subprocess, alternating round by round"
    else:
        pooled = alternate_in_process(config, precision, args, rows)
        how = "one process, alternating step by step"
    batch_size, seq_len = tt.shape(args, config)
    bare = pooled["bare torch"]["median_s"]
    lines = [
        f"### engine_overhead — {config} ({tt.num_parameters(tt.CONFIGS[config]) / 1e6:.0f}M), {precision}, "
        f"batch {batch_size} x seq {seq_len}, {pooled['bare torch']['device']}, {how}",
        "",
        tt.run_line(argv, load_before),
        "",
        "| step | median s | all timed steps (s) | overhead vs bare torch | first loss | peak memory GB |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in pooled.items():
        steps = " ".join(f"{t:.3f}" for t in entry["times"])
        lines.append(
            f"| {name} | {entry['median_s']:.3f} | {steps} | {entry['median_s'] / bare - 1:+.1%} | "
            f"{entry['losses'][0][0]:.6f} | "
            f"{memory_cell(entry['peak_memory_gb'])} |"
        )
    publish(lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
