"""Training metrics to a console progress bar, a JSONL file, wandb (offline by default) and, with
``logging.tensorboard``, TensorBoard event files (``{output_dir}/tensorboard``): the same scalars,
by step, to every sink."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
import uuid
from pathlib import Path
from typing import Optional

import torch

from moss_train.engine.cpu import cpu_peak_tflops

TENSORBOARD_DIR = "tensorboard"  # under the run's output directory: tensorboard --logdir runs/
# Dense bf16 peak per GPU (TFLOP/s), from the vendors' data sheets, matched on the device name.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A800": 312.0, "H800": 989.0, "L40S": 362.0}


def peak_tflops(
    configured: Optional[float], precision: str, device: torch.device, verbose: bool = True, remeasure: bool = False
) -> float:
    """Peak TFLOP/s per device, the MFU denominator: the recipe's logging.peak_tflops, else a
    known GPU's data sheet figure, else the measured (and cached) CPU matmul peak."""
    if configured:
        peak, source = configured, f"peak {configured:.3f} TFLOP/s from logging.peak_tflops"
    elif device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = [value for key, value in GPU_PEAK_TFLOPS.items() if key in name]
        peak = known[0] if known else 312.0
        source = (
            f"{name}: dense bf16 peak {peak:.0f} TFLOP/s "
            f"({'data sheet' if known else 'unknown GPU, A100 figure assumed'})"
        )
    else:
        peak, source = cpu_peak_tflops(precision, remeasure=remeasure)
    if verbose and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        print(f"[moss-train] MFU against {source}", flush=True)
    return peak


class ThroughputWindow:
    """The steps since the last logged one: tokens/s and MFU over their time, the evaluations and
    checkpoint saves among them left out (`paused`). Model FLOPs: the body at every token, the
    lm_head only at the rows where it computed logits (model/config.py: head_flops_per_row)."""

    def __init__(self, tokens_per_step: int, body_flops: float, head_flops: float, peak_flops: float, clock=None):
        self.tokens_per_step, self.body_flops, self.head_flops = tokens_per_step, body_flops, head_flops
        self.peak_flops = peak_flops  # FLOP/s of every device of the run together
        self.clock = clock or time.perf_counter
        self.reset()

    def reset(self) -> None:
        self.steps, self.head_rows, self.start = 0, 0.0, self.clock()

    def add_step(self, head_rows: float) -> None:
        self.steps += 1
        self.head_rows += head_rows

    @contextlib.contextmanager
    def paused(self):
        began = self.clock()
        try:
            yield
        finally:
            self.start += self.clock() - began

    def rates(self) -> dict:
        elapsed = self.clock() - self.start
        tokens = self.steps * self.tokens_per_step
        model_flops = tokens * self.body_flops + self.head_rows * self.head_flops
        return {"tokens_per_s": tokens / elapsed, "mfu": model_flops / elapsed / self.peak_flops}


def memory_gb(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"mem_alloc_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return {"mem_rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing."""

    def __init__(
        self,
        output_dir: Path,
        enabled: bool,
        total_steps: int,
        start_step: int,
        progress_bar: bool,
        wandb_settings: Optional[dict] = None,
        tensorboard: bool = False,
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = None
        self.wandb_run = None
        self.tensorboard = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep_records_until(self.path, start_step)
        self.file = open(self.path, "a")
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if wandb_settings and wandb_settings.get("mode") != "disabled":
            self.wandb_run = _start_wandb(Path(output_dir), wandb_settings)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(Path(output_dir) / TENSORBOARD_DIR))

    def log(self, record: dict, advance: int = 0) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in record.items() if k != "step"}
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=record["step"])
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, global_step=record["step"])
            self.tensorboard.flush()
        if self.bar is not None:
            shown = {k: record[k] for k in ("loss", "eval_loss", "lr", "tokens_per_s", "mfu") if k in record}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            self.bar.update(advance)
        else:
            print(
                " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True
            )

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()  # in offline mode wandb prints the `wandb sync` command
        if self.tensorboard is not None:
            self.tensorboard.close()


def keep_records_until(path: Path, step: int) -> None:
    """Drop the records of steps after `step` from a metrics file: a run that resumes there
    computes them again, so each step is logged once (a killed run logged steps past its last
    checkpoint; its last line may be cut off, and goes too)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _step_of(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"]) if line.endswith("\n") else None
    except (ValueError, KeyError, TypeError):
        return None


def _start_wandb(output_dir: Path, settings: dict):
    """Start (or, after a restart, continue) the run whose id is kept in the output directory."""
    import wandb

    id_file = output_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    return wandb.init(
        project=settings["project"],
        name=settings["name"],
        group=settings.get("group"),
        config=settings.get("config"),
        dir=str(output_dir),
        mode=settings["mode"],
        id=run_id,
        resume="allow",
    )
