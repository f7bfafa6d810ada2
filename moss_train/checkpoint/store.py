"""Crash-safe DeepSpeed checkpoints: write aside, verify, rename into place, then move `latest`.

Layout under the run's checkpoint directory::

    step_00000100/        one complete DeepSpeed checkpoint (ZeRO shards of every rank)
        rng_rank{R}.pt    each rank's RNG state
        complete.json     written last: step, each file's size and sha256, and the run's
                          JSON-able client state (model config, stage) under "meta"; its
                          presence marks completeness
    latest                text file naming the newest complete checkpoint (DeepSpeed's format)

A save first checks the free disk space (the size of the previous checkpoint, or an estimate
from the parameter count, must fit), then goes to `.tmp-step_N`; only a complete, verified
directory is renamed into place, and only then is `latest` replaced (atomically). A run killed
mid-save therefore resumes from the previous complete checkpoint, and retention never removes
the one `latest` names. Loading re-hashes every file and names the first one whose checksum
differs, and refuses a file that would run code when unpickled (checkpoint/safe_load.py).
Hashing is shared out over the ranks (file i goes to rank i mod world size).

Resuming on another number of ranks, or another ZeRO stage (one process runs ZeRO-3 as ZeRO-2:
engine/setup.py, zero_stage_for): ZeRO's shards are cut for the world size and stage that wrote
them. Such a checkpoint is converted with DeepSpeed's own ``ds_to_universal`` (rank 0, into
``.tmp-universal/step_N``, removed after the load), fitted to this run's stage
(fit_universal_to_stage), and read with DeepSpeed's universal loader (``checkpoint.load_universal``
in the DeepSpeed config), which cuts the shards for the ranks of this run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import torch

from moss_train.checkpoint import safe_load
from moss_train.distributed import DistInfo, all_gather_objects, barrier, broadcast_object
from moss_train.errors import CheckpointError, ConfigError
from moss_train.files import sha256_file
from moss_train.model.config import SHAPE_FIELDS

LATEST = "latest"
COMPLETE = "complete.json"
TMP_PREFIX = ".tmp-"
# Bytes a ZeRO checkpoint takes per parameter when there is no previous one to measure: fp32
# master weights (4) + Adam's two moments (8) + the module's own copy (up to 4).
BYTES_PER_PARAM_ESTIMATE = 16
FREE_SPACE_MARGIN = 1.1


def read_complete(directory: Path) -> dict:
    """The parsed complete.json of a checkpoint directory (CheckpointError if absent)."""
    marker = Path(directory) / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"{directory} is not a complete moss-train checkpoint (no {COMPLETE})")
    return json.loads(marker.read_text())


def _recorded(entry) -> tuple[int, Optional[str]]:
    """(size, sha256) of a complete.json file entry; checkpoints written before checksums
    existed recorded the size alone."""
    return (entry, None) if isinstance(entry, int) else (entry["size"], entry.get("sha256"))


def verify_checkpoint(directory: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """Problems with this rank's share of the files complete.json lists (all files when
    world_size is 1): missing, wrong size, or a sha256 that differs. Empty when intact."""
    directory = Path(directory)
    files = sorted(read_complete(directory)["files"].items())
    problems = []
    for name, entry in files[rank::world_size]:
        size, digest = _recorded(entry)
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != size:
            problems.append(f"{path}: size {path.stat().st_size} bytes, recorded {size}")
        elif digest is not None and sha256_file(path) != digest:
            problems.append(f"{path}: sha256 differs from the one recorded at save time (corrupt file)")
    return problems


def verify_or_raise(directory: Path, rank: int = 0, world_size: int = 1) -> None:
    """Verify a checkpoint, the work shared over the ranks; every rank raises the same error.
    world_size 1: this process verifies every file alone (no collective: e.g. rank 0 checking
    stage.init_from while the other ranks wait for its verdict)."""
    mine = verify_checkpoint(directory, rank, world_size)
    problems = [p for share in (all_gather_objects(mine) if world_size > 1 else [mine]) for p in share]
    if problems:
        raise CheckpointError(f"checkpoint {directory} is corrupt: " + "; ".join(problems))


def checkpoint_bytes(directory: Path) -> int:
    return sum(_recorded(entry)[0] for entry in read_complete(directory)["files"].values())


def check_same_model(directory: Path, model_config) -> None:
    """ConfigError naming every model key whose value differs between the checkpoint (as
    complete.json records it) and the model this run builds, before DeepSpeed reports the
    first mismatching tensor by its size."""
    saved = read_complete(directory).get("meta", {}).get("model_config")
    if saved is None:  # written before complete.json recorded it
        return
    ours = dataclasses.asdict(model_config)
    differ = [field for field in SHAPE_FIELDS if field in saved and saved[field] != ours[field]]
    if differ:
        raise ConfigError(
            ", ".join(f"model.{field}" for field in differ),
            f"the checkpoint {directory} holds a model with "
            + ", ".join(f"{field}={saved[field]}" for field in differ)
            + ", this run builds "
            + ", ".join(f"{field}={ours[field]}" for field in differ)
            + " (model.vocab_size follows the tokenizer); resume with the checkpoint's model, or start a new "
            "run.output_dir (or trainer.resume=never)",
        )


def ensure_free_space(root: Path, needed: int, what: str) -> None:
    """Raise CheckpointError when the file system holding `root` has less than `needed` bytes free."""
    free = shutil.disk_usage(root).free
    if free < needed:
        raise CheckpointError(
            f"not enough disk space to save {what} under {root}: {free / 2**30:.2f} GiB free, about "
            f"{needed / 2**30:.2f} GiB needed; free space there, or lower checkpoint.keep_last "
            "(older checkpoints are removed only after a new one is complete)"
        )


def _json_safe(state: dict) -> dict:
    """The entries of a client state that JSON can hold (numbers, strings, model config)."""
    safe = {}
    for key, value in state.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        safe[key] = value
    return safe


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


def _repair_universal_optimizer_state(engine, universal_dir: Path) -> None:
    """Undo two shortcuts of DeepSpeed's ZeRO-3 universal loader, which its ZeRO 1/2 loader
    does not take: it gives every optimizer param group the first group's settings ("the
    hyperparameters of each parameter should be the same"), which puts weight decay on biases
    and LayerNorms; and one `step` tensor to every group's state, which a fused Adam then
    advances once per group, so the bias correction of all but the first group is off."""
    optimizer = engine.optimizer.optimizer  # the wrapped torch optimizer
    saved = safe_load.load(universal_dir / "zero" / "optimizer_state.pt")["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{universal_dir}: {len(saved)} optimizer param groups saved, this run has {len(optimizer.param_groups)}"
        )
    for group, settings in zip(optimizer.param_groups, saved):
        group.update({key: value for key, value in settings.items() if key != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def convert_to_universal(step_dir: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal of one checkpoint (in this process, in weights-only mode; its
    progress output is kept and shown only if it fails)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(
        input_folder=str(step_dir),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # inject: the version entry ZeRO 1/2 asks for
    )
    output = io.StringIO()
    try:
        with safe_load.weights_only(), contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            ds_to_universal(args)
    except BaseException:
        print(output.getvalue()[-4000:], flush=True)
        raise


# The file DeepSpeed's engine reads a checkpoint's step, schedule and client state from (in a
# universal load it takes the weights and optimizer states from zero/ instead): rank 0's
# parameter shard under ZeRO-3, the whole module under ZeRO 0-2.
MODEL_STATES_ZERO3 = "zero_pp_rank_0_mp_rank_00_model_states.pt"
MODEL_STATES = "mp_rank_00_model_states.pt"


def written_by_zero3(file_names) -> bool:
    """Whether a checkpoint's (or its universal copy's) files are ZeRO-3's: each rank's parameter
    shard in a model-states file of its own, where ZeRO 0-2 write the whole module to one."""
    return any(name.startswith("zero_pp_rank_") and name.endswith("model_states.pt") for name in file_names)


def fit_universal_to_stage(universal_step_dir: Path, param_shapes: Optional[dict]) -> None:
    """Make a universal checkpoint converted from one ZeRO layout loadable by the other: ZeRO-3
    (`param_shapes` None) or ZeRO 1/2 (`param_shapes`: this engine's parameter shapes by name),
    as when one process (ZeRO-2: engine/setup.py, zero_stage_for) resumes a multi-rank ZeRO-3
    run or the other way round. DeepSpeed 0.19's ds_to_universal writes two flavours, and each
    stage's loader reads only its own:

    - ZeRO-3's: flat tensors under zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt; the optimizer's
      step and param groups in zero/optimizer_state.pt's torch optimizer state dict; rank 0's
      parameter shard file for the step and client state;
    - ZeRO 1/2's: {"param": shaped tensor, "cat_dim": 0} in those files and the step in
      zero/<name>/step.pt; a "ds_version" in zero/optimizer_state.pt; the module's file.

    The weights and moments are the same numbers in both; this rewrites the one flavour as the
    other, in the temporary universal copy only."""
    to_zero3 = param_shapes is None
    if written_by_zero3(path.name for path in universal_step_dir.iterdir()) == to_zero3:
        return  # already this stage's flavour (the global state, rank 0's moments under ZeRO-3, stays unread)
    wanted, other = (MODEL_STATES_ZERO3, MODEL_STATES) if to_zero3 else (MODEL_STATES, MODEL_STATES_ZERO3)
    os.replace(universal_step_dir / other, universal_step_dir / wanted)
    global_file = universal_step_dir / "zero" / "optimizer_state.pt"
    global_state = safe_load.load(global_file)
    param_dirs = sorted(path for path in global_file.parent.iterdir() if path.is_dir())
    if to_zero3:
        _zero12_flavour_to_zero3(global_state, param_dirs)
    else:
        _zero3_flavour_to_zero12(global_state, param_dirs, param_shapes)
    torch.save(global_state, global_file)


def _zero12_flavour_to_zero3(global_state: dict, param_dirs: list[Path]) -> None:
    """ZeRO-3's loader reads the step and param groups from a torch optimizer state dict (and
    takes the per-parameter files' "param" entries as they are)."""
    step = safe_load.load(param_dirs[0] / "step.pt")
    global_state["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": global_state["param_groups"]}


def _zero3_flavour_to_zero12(global_state: dict, param_dirs: list[Path], param_shapes: dict) -> None:
    """ZeRO 1/2's loader wants each tensor in its parameter's shape, a step file per parameter,
    and the DeepSpeed version of the checkpoint (here: the version that converted it)."""
    import deepspeed

    step = global_state["optimizer_state_dict"]["state"][0]["step"]
    for param_dir in param_dirs:
        if param_dir.name not in param_shapes:
            raise CheckpointError(f"{param_dir}: parameter {param_dir.name} is not in this run's model")
        for moment in ("fp32", "exp_avg", "exp_avg_sq"):
            flat = safe_load.load(param_dir / f"{moment}.pt")
            torch.save({"param": flat.view(param_shapes[param_dir.name]), "cat_dim": 0}, param_dir / f"{moment}.pt")
        torch.save(step, param_dir / "step.pt")
    global_state["ds_version"] = deepspeed.__version__


def _parameter_shapes(module: torch.nn.Module) -> dict:
    return {name: tuple(param.shape) for name, param in module.named_parameters()}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    tmp.write_text(text)
    with open(tmp) as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    """`trainable_only`: save (and expect) only the parameters that train (LoRA: the adapters and
    a reward head); the frozen rest comes from stage.init_from again on resume."""

    def __init__(self, root: str | Path, keep_last: int, dist_info: DistInfo, trainable_only: bool = False):
        self.root = Path(root)
        self.keep_last = keep_last
        self.dist = dist_info
        self.trainable_only = trainable_only

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

    def needs_universal(self, path: Path, zero_stage: int) -> bool:
        """True when ZeRO optimizer shards of `path` were cut for another number of ranks than
        this run's, or another layout than `zero_stage`'s: stage 3 keeps each rank's parameter
        shard in a file of its own, stages 1 and 2 the whole module in one (ZeRO 0 keeps whole
        states, which load on any number of ranks)."""
        names = read_complete(path)["files"]
        shards = [name for name in names if name.endswith("optim_states.pt")]
        return bool(shards) and (len(shards) != self.dist.world_size or written_by_zero3(names) != (zero_stage == 3))

    def load(self, engine, path: Path, universal: bool = False) -> dict:
        """Verify checksums and refuse files that would run code, then restore model, optimizer,
        scheduler (DeepSpeed, in weights-only mode) and this rank's RNG; return the client state.
        A corrupt, missing or unsafe file raises CheckpointError naming it. `universal`: the
        checkpoint is from another number of ranks, and the engine was configured with
        checkpoint.load_universal (see the module docstring)."""
        path = Path(path)
        read_complete(path)
        verify_or_raise(path, self.dist.rank, self.dist.world_size)
        safe_load.refuse_unsafe_files(path)
        if universal:
            shapes = None if engine.zero_optimization_partition_weights() else _parameter_shapes(engine.module)
            load_dir, tag = self._universal_copy(path, shapes), path.name
        else:
            load_dir, tag = path.parent, path.name
        with safe_load.weights_only():
            load_path, client_state = engine.load_checkpoint(
                str(load_dir), tag=tag, load_module_strict=not self.trainable_only
            )
        if universal:
            _repair_universal_optimizer_state(engine, load_dir / tag)
            barrier()
            if self.dist.is_main:
                shutil.rmtree(load_dir, ignore_errors=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
        rng_file = path / f"rng_rank{self.dist.rank}.pt"
        if rng_file.is_file():  # a rank the checkpoint did not have keeps its seeded stream
            restore_rng(safe_load.load(rng_file))
        return client_state or {}

    def _universal_copy(self, path: Path, param_shapes: Optional[dict]) -> Path:
        """Rank 0 converts `path` with DeepSpeed's ds_to_universal, in the flavour of this
        engine's stage (`param_shapes`: see fit_universal_to_stage); every rank gets the
        directory that holds the converted `path.name` (or the same CheckpointError)."""
        load_dir = self.root / f"{TMP_PREFIX}universal"
        error = None
        if self.dist.is_main:
            shutil.rmtree(load_dir, ignore_errors=True)
            try:
                ensure_free_space(
                    self.root, int(checkpoint_bytes(path) * FREE_SPACE_MARGIN), f"a universal copy of {path.name}"
                )
                convert_to_universal(path, load_dir / path.name)
                fit_universal_to_stage(load_dir / path.name, param_shapes)
            except Exception as exc:  # every rank must learn of it, or the others wait forever
                error = (
                    str(exc)
                    if isinstance(exc, CheckpointError)
                    else f"{path}: universal conversion failed: {type(exc).__name__}: {exc}"
                )
        error = broadcast_object(error)
        if error:
            raise CheckpointError(error)
        return load_dir

    # ---- writing -------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict) -> Path:
        tag = step_tag(step)
        tmp_tag = TMP_PREFIX + tag
        tmp_dir, final_dir = self.root / tmp_tag, self.root / tag
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
        self._check_free_space(engine, tag)
        if self.dist.is_main:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        barrier()
        engine.save_checkpoint(
            str(self.root),
            tag=tmp_tag,
            client_state=client_state,
            save_latest=False,
            exclude_frozen_parameters=self.trainable_only,
        )
        torch.save(capture_rng(), tmp_dir / f"rng_rank{self.dist.rank}.pt")
        barrier()
        checksums = self._hash_files(tmp_dir)
        error = None
        if self.dist.is_main:
            try:
                self._seal(tmp_dir, step, checksums, _json_safe(client_state))
            except CheckpointError as exc:
                error = str(exc)
            else:
                shutil.rmtree(final_dir, ignore_errors=True)  # a rerun reaching the same step
                os.replace(tmp_dir, final_dir)
                _write_atomic(self.root / LATEST, tag)
                self._apply_retention()
        error = broadcast_object(error)  # also the barrier that ends the save on every rank
        if error:
            raise CheckpointError(error)
        return final_dir

    def _check_free_space(self, engine, tag: str) -> None:
        """Rank 0 compares the free space with the last checkpoint's size (else an estimate from
        the parameter count); every rank raises the same CheckpointError, before any write."""
        error = None
        if self.dist.is_main:
            previous = self.complete_checkpoints()
            if previous:
                needed = checkpoint_bytes(previous[-1])
            else:
                saved = [p for p in engine.module.parameters() if p.requires_grad or not self.trainable_only]
                numel = sum(getattr(p, "ds_numel", p.numel()) for p in saved)
                needed = numel * BYTES_PER_PARAM_ESTIMATE
            try:
                ensure_free_space(self.root, int(needed * FREE_SPACE_MARGIN), f"checkpoint {tag}")
            except CheckpointError as exc:
                error = str(exc)
        error = broadcast_object(error)
        if error:
            raise CheckpointError(error)

    def _hash_files(self, directory: Path) -> dict[str, str]:
        """sha256 of every file in the directory, each rank hashing its share; all ranks call it."""
        names = sorted(p.name for p in directory.iterdir() if p.is_file())
        mine = {name: sha256_file(directory / name) for name in names[self.dist.rank :: self.dist.world_size]}
        return {name: digest for share in all_gather_objects(mine) for name, digest in share.items()}

    def _seal(self, directory: Path, step: int, checksums: dict[str, str], meta: dict) -> None:
        """Check every rank's files are there and non-empty, then mark the directory complete."""
        files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
        world = self.dist.world_size
        missing = [f"rng_rank{r}.pt" for r in range(world) if f"rng_rank{r}.pt" not in files]
        empty = [name for name, size in files.items() if size == 0]
        optim = [name for name in files if name.endswith("optim_states.pt")]
        if optim and len(optim) != world:  # ZeRO: one optimizer shard per rank
            missing.append(f"{world - len(optim)} of {world} *optim_states.pt")
        unhashed = sorted(set(files) - set(checksums))
        if missing or empty or unhashed or not any(name.endswith("model_states.pt") for name in files):
            raise CheckpointError(
                f"incomplete checkpoint in {directory}: missing {missing}, empty {empty}, unhashed {unhashed}"
            )
        entries = {name: {"size": size, "sha256": checksums[name]} for name, size in files.items()}
        _write_atomic(directory / COMPLETE, json.dumps({"step": step, "files": entries, "meta": meta}, indent=1))

    def _apply_retention(self) -> None:
        """Keep the newest keep_last complete checkpoints and always the one `latest` names.

        A directory to delete is first renamed aside (atomic), so a kill mid-delete never
        leaves a `step_N` that looks complete but is missing files."""
        keep = self.complete_checkpoints()[-self.keep_last :]
        latest = self.latest()
        for path in self.complete_checkpoints():
            if path not in keep and path != latest:
                doomed = path.with_name(f"{TMP_PREFIX}deleting-{path.name}")
                shutil.rmtree(doomed, ignore_errors=True)
                os.replace(path, doomed)
        for stale in self.root.glob(TMP_PREFIX + "*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
