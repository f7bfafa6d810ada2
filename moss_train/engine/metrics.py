"""Training metrics to a console progress bar, a JSONL file and wandb (offline by default)."""

from __future__ import annotations

import json
import uuid
import resource
import time
from pathlib import Path
from typing import Optional

import torch

# Dense bf16 peak per GPU (TFLOP/s), from the vendors' data sheets, matched on the device name.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A800": 312.0, "H800": 989.0, "L40S": 362.0}


def measure_cpu_peak_tflops(precision: str, size: int = 1024, seconds: float = 0.5) -> float:
    """The matmul throughput this process actually gets, as the MFU denominator on a CPU."""
    dtype = torch.bfloat16 if precision in ("bf16", "bf16-autocast") else torch.float32
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    for _ in range(2):
        a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - start) / 1e12


def peak_tflops(configured: Optional[float], precision: str, device: torch.device) -> float:
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value
        return 312.0
    return measure_cpu_peak_tflops(precision)


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
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = None
        self.wandb_run = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if wandb_settings and wandb_settings.get("mode") != "disabled":
            self.wandb_run = _start_wandb(Path(output_dir), wandb_settings)

    def log(self, record: dict, advance: int = 0) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.bar is not None:
            shown = {k: record[k] for k in ("loss", "eval_loss", "lr", "tokens_per_s", "mfu") if k in record}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            self.bar.update(advance)
        else:
            print(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()  # in offline mode wandb prints the `wandb sync` command


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
