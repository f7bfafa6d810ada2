"""Training throughput: one moss-train optimizer step vs transformers' CodeGenForCausalLM.

Both sides train the same CodeGen shapes on the same batches. Each side runs in its own
subprocess (so moss-train's process-wide settings — glibc allocator tuning, thread count — do
not touch the baseline, which runs as a plain transformers user would run it), and the sides
alternate round by round (A B, B A, A B, ...) so the machine's load hits both alike. The
figure is the median over all rounds of the steps after each subprocess's warm-up.

- moss-train:   `Trainer.train_step` — the training loop's own step: our model through a real
  DeepSpeed engine (ZeRO stage from --zero-stage), fused AdamW with no-decay groups, the global
  token-mean loss, clipping, metrics.
- transformers: CodeGenForCausalLM(labels=...) with torch.optim.AdamW (its defaults) and
  clipping; bf16 autocast where the row says so.

On a CUDA device both sides run bf16 (moss-train: DeepSpeed bf16 weights; the baseline: bf16
autocast), attention through SDPA (flash kernels), fused AdamW on both sides, and the device
name is recorded. On a CPU the precisions are fp32 and bf16 autocast.

MFU is against the measured matmul peak of the machine (moss_train.engine.metrics: the best
2048^3 / 4096^3 matmul in the step's precision, per CPU model and flags: the best figure
measured so far, cached; every benchmark run measures again), printed beside it, fp32 and
bf16; on a GPU against the data-sheet dense bf16 peak.

    python bench/train_throughput.py                                  # ~60M config, fp32 + bf16 autocast
    python bench/train_throughput.py --configs small,medium --write   # also append the table to RESULTS.md
    python bench/train_throughput.py --configs 1.3b                   # on a GPU: seq 2048, bf16
    python bench/train_throughput.py --configs tiny --ours-at HEAD~1  # also moss-train as of a commit
    python bench/train_throughput.py --configs quickstart \
        --ours-with deepspeed.stage3_param_persistence_threshold=1000000000  # a lever on, as an extra row
    python bench/train_throughput.py --configs small,quickstart --precisions bf16-autocast --ours-compiled --warmup 2
                                                                      # torch.compile of each block, as an extra row
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from moss_train.engine.cpu import cpu_identity
from moss_train.engine.stage import TrainingStage
from moss_train.model.config import ModelConfig, flops_per_token, num_parameters, to_hf_config

from bench_report import checkout, publish, source_env

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "

CONFIGS = {
    # recipes/model/tiny.yaml and quickstart.yaml (one layer more), with the quickstart's 8000-piece tokenizer.
    "tiny": ModelConfig(name="tiny", vocab_size=8000, n_positions=512, n_embd=128, n_layer=2, n_head=4, rotary_dim=16),
    "quickstart": ModelConfig(
        name="quickstart", vocab_size=8000, n_positions=512, n_embd=128, n_layer=3, n_head=4, rotary_dim=16
    ),
    "small": ModelConfig(
        name="small", vocab_size=32000, n_positions=2048, n_embd=512, n_layer=8, n_head=8, rotary_dim=32
    ),
    "medium": ModelConfig(
        name="medium", vocab_size=32000, n_positions=2048, n_embd=768, n_layer=12, n_head=12, rotary_dim=32
    ),
    "1.3b": ModelConfig(
        name="1.3b", vocab_size=32000, n_positions=2048, n_embd=2048, n_layer=24, n_head=16, rotary_dim=64
    ),
}
# (batch, seq) per config unless given on the command line.
DEFAULT_SHAPES = {"tiny": (16, 512), "quickstart": (16, 512), "small": (4, 512), "medium": (4, 512), "1.3b": (4, 2048)}


# ----------------------------------------------------------------------------- the sides (worker)


def make_batch(model_cfg: ModelConfig, batch_size: int, seq_len: int, device: torch.device) -> dict:
    """The same token ids for every side; labels are the next-token targets transformers builds
    from labels=input_ids (shifted left, last position ignored)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_cfg.vocab_size, (batch_size, seq_len), generator=generator)
    labels = ids.clone()
    labels[:, :-1] = ids[:, 1:]
    labels[:, -1] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


class FixedBatchStage(TrainingStage):
    """A stage whose every sample is the benchmark batch, so the Trainer's own step is timed."""

    name = "bench"

    def __init__(self, samples: list[dict]):
        self.samples = samples

    @staticmethod
    def loss(ctx, model, batch):
        from moss_train.stages.lm import causal_lm_loss

        return causal_lm_loss(model, batch)

    def load_tokenizer(self, cfg):
        return None

    def build_model(self, cfg, tokenizer):
        from moss_train.model.codegen import CodeGenForCausalLM

        return CodeGenForCausalLM(cfg.model)

    def build_data(self, ctx):
        from moss_train.data.packed import collate_packed
        from moss_train.engine.stage import StageData
        from moss_train.stages.lm import count_label_targets

        return StageData(
            train=self.samples,
            eval=None,
            collate=collate_packed,
            count_targets=count_label_targets,
            tokens_per_sample=self.samples[0]["input_ids"].numel(),
        )


def bench_config(model_cfg: ModelConfig, precision: str, zero_stage: int, batch_size: int, overrides=()):
    """The recipe's defaults for one benchmark batch per step; `overrides`: recipe keys as on the
    command line (`deepspeed.overlap_comm=false`), typed and checked as the recipe's own are."""
    from omegaconf import OmegaConf

    from moss_train.config import MossTrainConfig

    cfg = MossTrainConfig()
    cfg.model = model_cfg
    cfg.trainer = replace(cfg.trainer, micro_batch_size=batch_size, global_batch_size=batch_size, precision=precision)
    cfg.deepspeed = replace(cfg.deepspeed, zero_stage=zero_stage)
    for override in overrides:  # section by section: the whole config has mandatory keys (data paths) unset here
        section, assignment = override.split(".", 1)
        merged = OmegaConf.merge(OmegaConf.structured(getattr(cfg, section)), OmegaConf.from_dotlist([assignment]))
        setattr(cfg, section, OmegaConf.to_object(merged))
    return cfg


def stage_that_runs(zero_stage: int, precision: str, overrides=()) -> int:
    """The ZeRO stage DeepSpeed runs for the recipe's `zero_stage` in one process
    (engine/setup.py: zero_stage_for)."""
    from moss_train.engine.setup import zero_stage_for

    cfg = bench_config(CONFIGS["tiny"], precision, zero_stage, 1, overrides)
    return zero_stage_for(cfg.deepspeed, 1, precision)


def stage_label(zero_stage: int, runs: int) -> str:
    """ "ZeRO-3", or "ZeRO-3 (runs as ZeRO-2)" where one process changes the stage DeepSpeed runs."""
    return f"ZeRO-{zero_stage}" + ("" if runs == zero_stage else f" (runs as ZeRO-{runs})")


def zero_label(zero_stage: int, precision: str, overrides=()) -> str:
    return stage_label(zero_stage, stage_that_runs(zero_stage, precision, overrides))


def moss_trainer(model_cfg: ModelConfig, precision: str, zero_stage: int, batch: dict, overrides=()):
    """A real moss-train Trainer (DeepSpeed engine, the recipe's optimizer) whose every step
    trains on `batch`."""
    from moss_train.engine.loop import Trainer

    batch_size = batch["input_ids"].shape[0]
    cfg = bench_config(model_cfg, precision, zero_stage, batch_size, overrides)
    samples = [{k: v[i].cpu() for k, v in batch.items()} for i in range(batch_size)]
    return Trainer(cfg, FixedBatchStage(samples))


def moss_step_fn(model_cfg, precision, batch, args):
    trainer = moss_trainer(model_cfg, precision, args.zero_stage, batch, args.overrides)
    if args.compile_blocks:  # the torch.compile lever (--ours-compiled): inductor kernels for each block
        for block in trainer.engine.module.transformer.h:
            block.compile(dynamic=False)
    return lambda: trainer.train_step()["loss"]


def transformers_step_fn(model_cfg, precision, batch, args):
    from transformers import CodeGenForCausalLM as HFCodeGen

    device = batch["input_ids"].device
    torch.manual_seed(0)
    model = HFCodeGen(to_hf_config(model_cfg)).to(device).train()
    # A plain transformers user: AdamW's defaults on CPU; on a GPU, fused (its fast path).
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True if device.type == "cuda" else None
    )
    use_bf16 = precision in ("bf16", "bf16-autocast")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    def step() -> float:
        with autocast:
            loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


SIDES = {"moss-train": moss_step_fn, "transformers": transformers_step_fn}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_worker(args, sides: dict) -> int:
    """One side, one subprocess: build, warm up, time `steps` steps, print the result line."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.side != "transformers":  # moss-train's own steps run under its launcher's process group
        from moss_train.distributed import init_distributed

        init_distributed()
    model_cfg = replace(CONFIGS[args.config], gradient_checkpointing=args.gradient_checkpointing)
    batch = make_batch(model_cfg, args.batch_size, args.seq_len, device)
    step = sides[args.side](model_cfg, args.precision, batch, args)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(float(step()))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {
        "times": times,
        "losses": losses,
        "peak_memory_gb": peak_memory_gb(device),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------- the parent


def run_side(
    script: Path, side: str, config: str, precision: str, args, extra: list[str] = (), source: Path | None = None
) -> dict:
    """Run one side in a fresh subprocess of `script` (whose --worker mode knows `side`), with
    moss_train from `source` (an earlier commit's, bench_report.checkout) or this tree's."""
    batch_size, seq_len = shape(args, config)
    command = [
        sys.executable,
        str(script),
        "--worker",
        "--side",
        side,
        "--config",
        config,
        "--precision",
        precision,
        "--batch-size",
        str(batch_size),
        "--seq-len",
        str(seq_len),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--zero-stage",
        str(args.zero_stage),
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env = source_env(env, source)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def alternate(
    script: Path,
    variants: dict[str, tuple[str, list[str]]],
    config: str,
    precision: str,
    args,
    sources: dict[str, Path] | None = None,
) -> dict:
    """Run every variant (name -> (side, extra worker args)) once per round, the order reversed
    every other round; pool the timed steps. `sources`: name -> the moss_train a variant imports
    (an earlier commit's), where not this tree's. Returns name -> {times, peak_memory_gb, ...}."""
    pooled: dict[str, dict] = {}
    names = list(variants)
    for round_index in range(args.rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            side, extra = variants[name]
            result = run_side(script, side, config, precision, args, extra, (sources or {}).get(name))
            entry = pooled.setdefault(
                name, {"times": [], "peak_memory_gb": [], "losses": [], "device": result["device"]}
            )
            entry["times"] += result["times"]
            entry["peak_memory_gb"].append(result["peak_memory_gb"])
            entry["losses"].append(result["losses"])
            print(
                f"  round {round_index + 1} {config} {precision} {name}: "
                + ", ".join(f"{t:.2f}s" for t in result["times"])
                + f" ({result['peak_memory_gb']:.2f} GB)",
                flush=True,
            )
    for entry in pooled.values():
        entry["median_s"] = statistics.median(entry["times"])
    return pooled


def machine_peaks(device: str) -> dict[str, float]:
    """MFU denominators: the measured (and cached) CPU matmul peaks, or a GPU's data sheet."""
    from moss_train.engine.metrics import peak_tflops

    if device != "cpu":
        return {"bf16": peak_tflops(None, "bf16", torch.device("cuda"))}
    return {dtype: peak_tflops(None, dtype, torch.device("cpu"), remeasure=True) for dtype in ("fp32", "bf16")}


def load_line() -> str:
    return f"1-min load average {os.getloadavg()[0]:.1f}"


def command_line(argv) -> str:
    return "python " + os.path.relpath(sys.argv[0], REPO) + " " + " ".join(argv if argv is not None else sys.argv[1:])


def run_line(argv, load_before: str) -> str:
    """How a table was made: the command, when, the torch version, the machine's load around it."""
    return (
        f"`{command_line(argv).strip()}` ({time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
        f"{load_before} before / {load_line()[len('1-min load average ') :]} after)"
    )


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="small", help=f"comma-separated: {', '.join(CONFIGS)}")
    p.add_argument("--precisions", default=None, help="default: fp32,bf16-autocast on CPU, bf16 on a GPU")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3, help="subprocesses per side, alternating")
    p.add_argument("--steps", type=int, default=3, help="timed steps per subprocess")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per subprocess")
    p.add_argument("--zero-stage", type=int, default=3)
    p.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    p.add_argument(
        "--ours-at", default="", help="comma-separated git revisions: moss-train as of each, as extra rows (main only)"
    )
    p.add_argument(
        "--ours-with",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="recipe overrides of moss-train as an extra row (a lever on, beside the defaults); repeatable",
    )
    p.add_argument(
        "--ours-compiled",
        action="store_true",
        help="also moss-train with each block torch.compile'd, as an extra row (the first step compiles: "
        "keep --warmup >= 1)",
    )
    # worker mode (the parent runs the script again as its own subprocess)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compile-blocks", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    return p


def shape(args, config: str) -> tuple[int, int]:
    """(batch, seq) of a config: the command line's, else the config's default."""
    batch, seq = DEFAULT_SHAPES[config]
    return args.batch_size or batch, args.seq_len or seq


def precisions(args) -> list[str]:
    if args.precisions:
        return args.precisions.split(",")
    return ["bf16"] if torch.cuda.is_available() else ["fp32", "bf16-autocast"]


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    if args.worker:
        return run_worker(args, SIDES)
    script = Path(__file__).resolve()
    load_before = load_line()
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        revisions = [rev for rev in args.ours_at.split(",") if rev]
        sources = {f"moss-train @ {rev}": checkout(rev, Path(tmp)) for rev in revisions}
        for config in args.configs.split(","):
            for precision in precisions(args):
                variants = {"moss-train": ("moss-train", [])} | {name: ("moss-train", []) for name in sources}
                for lever in args.ours_with:
                    variants[f"moss-train + {lever}"] = ("moss-train", ["--overrides", *lever.split(",")])
                if args.ours_compiled:
                    variants["moss-train + torch.compile(blocks)"] = ("moss-train", ["--compile-blocks"])
                variants["transformers"] = ("transformers", [])
                pooled = alternate(script, variants, config, precision, args, sources)
                rows.append((config, precision, *shape(args, config), pooled))
    device = rows[0][4]["moss-train"]["device"]
    peaks = machine_peaks(device)
    publish(throughput_table(rows, peaks, device, argv, load_before, args.zero_stage), args.write)
    return 0


# Each side trains in one process, where fp32 weights (fp32, bf16 autocast) run the ZeRO-3 recipe
# as ZeRO-2 (engine/setup.py: zero_stage_for).
ONE_PROCESS_NOTE = {3: " (one process: ZeRO-2 where the weights are fp32)"}


def throughput_table(rows, peaks: dict, device: str, argv, load_before: str, zero_stage: int) -> list[str]:
    threads = torch.get_num_threads()
    where = device if device != "cpu" else f"CPU {cpu_identity()}, {os.cpu_count()} cores, {threads} threads"
    peak_cols = list(peaks)
    lines = [
        f"### train_throughput — {where}, moss-train ZeRO-{zero_stage}{ONE_PROCESS_NOTE.get(zero_stage, '')}, "
        "each side in its own subprocess, alternating",
        "",
        run_line(argv, load_before)
        + "; matmul peak used for MFU: "
        + ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in peaks.items()),
        "",
        "| model | precision | batch x seq | trainer | step s (median) | tokens/s | vs transformers | "
        + " | ".join(f"MFU vs {k} peak" for k in peak_cols)
        + " | peak memory GB |",
        "|---|---|---|---|---|---|---|" + "---|" * len(peak_cols) + "---|",
    ]
    for config, precision, batch_size, seq_len, pooled in rows:
        model_cfg = CONFIGS[config]
        tokens = batch_size * seq_len
        flops = flops_per_token(model_cfg, seq_len)
        baseline = tokens / pooled["transformers"]["median_s"]
        for name, entry in pooled.items():
            tps = tokens / entry["median_s"]
            mfu = " | ".join(f"{tps * flops / (peaks[k] * 1e12):.1%}" for k in peak_cols)
            lines.append(
                f"| {config} ({num_parameters(model_cfg) / 1e6:.0f}M) | {precision} | {batch_size} x {seq_len} | "
                f"{name} | {entry['median_s']:.2f} | {tps:.0f} | {tps / baseline:.2f}x | {mfu} | "
                f"{max(entry['peak_memory_gb']):.2f} |"
            )
    return lines


if __name__ == "__main__":
    sys.exit(main())
