"""Crash-safe DeepSpeed checkpoints: write aside, verify, rename into place, then move `latest`.

Layout under the run's checkpoint directory::

    step_00000100/        one complete DeepSpeed checkpoint (ZeRO shards of every rank)
        rng_rank{R}.pt    each rank's RNG state
        complete.json     written last: step, files and sizes; its presence marks completeness
    latest                text file naming the newest complete checkpoint (DeepSpeed's format)

A save goes to `.tmp-step_N` first; only a complete, verified directory is renamed into place,
and only then is `latest` replaced (atomically). A run killed mid-save therefore resumes from
the previous complete checkpoint, and retention never removes the one `latest` names.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import torch

from moss_train.engine.distributed import DistInfo, barrier

LATEST = "latest"
COMPLETE = "complete.json"
TMP_PREFIX = ".tmp-"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(_to_lists(random.getstate()))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    tmp.write_text(text)
    with open(tmp) as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, dist_info: DistInfo):
        self.root = Path(root)
        self.keep_last = keep_last
        self.dist = dist_info

    # ---- reading -------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / COMPLETE).is_file() else None

    def complete_checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step_*") if (p / COMPLETE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def load(self, engine, path: Path) -> dict:
        """Restore model, optimizer, scheduler (DeepSpeed) and this rank's RNG; return client state."""
        path = Path(path)
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"{path} is not a complete moss-train checkpoint (no {COMPLETE})")
        load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
        rng_file = path / f"rng_rank{self.dist.rank}.pt"
        if rng_file.is_file():
            restore_rng(torch.load(rng_file, weights_only=True))
        return client_state or {}

    # ---- writing -------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict) -> Path:
        tag = step_tag(step)
        tmp_tag = TMP_PREFIX + tag
        tmp_dir, final_dir = self.root / tmp_tag, self.root / tag
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp_dir, ignore_errors=True)
        barrier()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state=client_state, save_latest=False)
        torch.save(capture_rng(), tmp_dir / f"rng_rank{self.dist.rank}.pt")
        barrier()
        if self.dist.is_main:
            self._seal(tmp_dir, step)
            shutil.rmtree(final_dir, ignore_errors=True)  # a rerun reaching the same step
            os.replace(tmp_dir, final_dir)
            _write_atomic(self.root / LATEST, tag)
            self._apply_retention()
        barrier()
        return final_dir

    def _seal(self, directory: Path, step: int) -> None:
        """Check every rank's files are there and non-empty, then mark the directory complete."""
        files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
        missing = [f"rng_rank{r}.pt" for r in range(self.dist.world_size) if f"rng_rank{r}.pt" not in files]
        empty = [name for name, size in files.items() if size == 0]
        if missing or empty or not any(name.endswith("model_states.pt") for name in files):
            raise RuntimeError(f"incomplete checkpoint in {directory}: missing {missing}, empty {empty}")
        _write_atomic(directory / COMPLETE, json.dumps({"step": step, "files": files}, indent=1))

    def _apply_retention(self) -> None:
        keep = self.complete_checkpoints()[-self.keep_last :]
        latest = self.latest()
        for path in self.complete_checkpoints():
            if path not in keep and path != latest:
                shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob(TMP_PREFIX + "step_*"):
            shutil.rmtree(stale, ignore_errors=True)
