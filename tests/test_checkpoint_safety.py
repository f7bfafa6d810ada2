"""Crash safety of training checkpoints: SIGKILL during a save, checksums, free space, retention."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moss_train.checkpoint import safe_load
from moss_train.checkpoint.cli import main as export_main
from moss_train.checkpoint.sources import MossTrainCheckpoint
from moss_train.checkpoint.store import (
    COMPLETE,
    LATEST,
    CheckpointError,
    CheckpointManager,
    ensure_free_space,
    sha256_file,
    verify_checkpoint,
)
from moss_train.distributed import DistInfo

from conftest import BIN, REPO, run_cli, train_losses, train_overrides

KILLED_RUN_SETTINGS = {"trainer.max_steps": 8, "checkpoint.every": 1, "checkpoint.keep_last": 2}
SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=None)


# ---------------------------------------------------------------------------- a killed run
def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    os.killpg(proc.pid, sig)


def kill_during_a_save(command: list[str], checkpoints: Path, timeout: float = 240) -> Path:
    """Run `command`; at a save that starts after a complete one exists, freeze the run
    (SIGSTOP) while its `.tmp-step_N` directory is there and not yet renamed, then SIGKILL it.
    A save that finished before the freeze is let go (SIGCONT) and the next one is tried.
    Returns the temporary directory the killed save was writing."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            saving = sorted(checkpoints.glob(".tmp-step_*")) if (checkpoints / LATEST).is_file() else []
            if saving:
                _signal_group(proc, signal.SIGSTOP)
                tmp = saving[-1]
                final = checkpoints / tmp.name.removeprefix(".tmp-")
                if tmp.is_dir() and not (final / COMPLETE).is_file():
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
                    return tmp
                _signal_group(proc, signal.SIGCONT)
            time.sleep(0.0005)
    finally:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    raise AssertionError(f"no save was caught in progress (run exit code {proc.returncode})")


@dataclass
class KilledRun:
    out: Path
    killed_in: Path  # the temporary directory of the save the kill interrupted
    written: list[str]  # what that save had written when it was killed
    latest_after_kill: str
    logged: dict  # per-step records the killed run logged
    resume_stdout: str


@pytest.fixture(scope="module")
def killed_run(pretrain_data, tmp_path_factory) -> KilledRun:
    """A run SIGKILLed in the middle of a save, then the same command run again (it resumes)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    checkpoints = out / "checkpoints"
    overrides = train_overrides(pretrain_data, out, **KILLED_RUN_SETTINGS)
    killed_in = kill_during_a_save([str(BIN / "moss-train"), *overrides], checkpoints)
    written = sorted(p.name for p in killed_in.iterdir())
    latest = (checkpoints / LATEST).read_text().strip()
    logged = train_losses(out)  # read before the resumed run appends
    result = run_cli(overrides)
    return KilledRun(out, killed_in, written, latest, logged, result.stdout)


def test_sigkill_during_save_resumes_from_previous_complete_checkpoint(killed_run):
    checkpoints = killed_run.out / "checkpoints"
    killed_step = int(killed_run.killed_in.name.split("_")[-1])
    print(
        f"killed during the save of step {killed_step} with {killed_run.written} written; "
        f"latest -> {killed_run.latest_after_kill}"
    )
    # The kill left the save half-done and `latest` on the previous complete checkpoint...
    assert killed_run.latest_after_kill == f"step_{killed_step - 1:08d}"
    assert COMPLETE not in killed_run.written
    # ...from which the rerun resumed, computing the steps the killed run had already done
    # bit-identically, and went on to the end.
    assert (
        f"resumed from {checkpoints / killed_run.latest_after_kill} at step {killed_step - 1}"
        in killed_run.resume_stdout
    )
    resumed = train_losses(killed_run.out)
    assert max(resumed) == KILLED_RUN_SETTINGS["trainer.max_steps"]
    for step in range(killed_step, max(killed_run.logged) + 1):
        assert resumed[step]["loss"] == killed_run.logged[step]["loss"], step
    assert (checkpoints / LATEST).read_text().strip() == "step_00000008"
    assert not list(checkpoints.glob(".tmp-*")), "the next complete save clears the killed one's leftovers"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000007", "step_00000008"]  # keep_last


# ---------------------------------------------------------------------------- checksums
@pytest.fixture(scope="module")
def finished_run(killed_run) -> Path:
    return killed_run.out


def _corrupt_copy(run: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the run's checkpoint with one byte of the optimizer shard flipped."""
    step = run / "checkpoints" / (run / "checkpoints" / LATEST).read_text().strip()
    copy = tmp_path / "checkpoints" / step.name
    shutil.copytree(step, copy)
    (tmp_path / "checkpoints" / LATEST).write_text(step.name)
    victim = next(copy.glob("*optim_states.pt"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    return copy, victim.name


def test_complete_json_records_checksums_and_the_model_config(finished_run):
    step = finished_run / "checkpoints" / "step_00000008"
    complete = json.loads((step / COMPLETE).read_text())
    assert set(complete["files"]) == {p.name for p in step.iterdir() if p.name != COMPLETE}
    assert all(len(entry["sha256"]) == 64 for entry in complete["files"].values())
    assert complete["meta"]["model_config"]["n_embd"] == 64 and complete["meta"]["stage"] == "pretrain"
    assert verify_checkpoint(step) == []


def test_load_names_the_corrupt_file(finished_run, tmp_path, capsys):
    copy, victim = _corrupt_copy(finished_run, tmp_path)
    problems = verify_checkpoint(copy)
    assert len(problems) == 1 and victim in problems[0] and "sha256" in problems[0]
    # The resume path verifies before DeepSpeed reads anything (so no engine is needed to fail).
    manager = CheckpointManager(copy.parent, keep_last=2, dist_info=SINGLE)
    with pytest.raises(CheckpointError, match=victim):
        manager.load(engine=None, path=copy)
    # So does the export, through its command line.
    assert export_main([str(copy), str(tmp_path / "hf")]) == 1
    stderr = capsys.readouterr().err
    assert victim in stderr and "corrupt" in stderr
    assert not (tmp_path / "hf").exists()


def test_a_truncated_file_is_named_too(finished_run, tmp_path):
    copy, _ = _corrupt_copy(finished_run, tmp_path)
    rng = copy / "rng_rank0.pt"
    rng.write_bytes(rng.read_bytes()[:-10])
    assert any("rng_rank0.pt: size" in p for p in verify_checkpoint(copy))


# ---------------------------------------------------------------------------- disk space
def test_free_space_is_checked_before_anything_is_written(finished_run, tmp_path):
    free = shutil.disk_usage(tmp_path).free
    ensure_free_space(tmp_path, free // 2, "a small thing")
    with pytest.raises(CheckpointError, match="not enough disk space"):
        ensure_free_space(tmp_path, free * 2, "a huge thing")
    # A previous checkpoint that (by its recorded sizes) would not fit twice over: the next save
    # fails with the clear error before touching the engine or creating its temporary directory.
    root = tmp_path / "checkpoints"
    big = root / "step_00000001"
    big.mkdir(parents=True)
    (big / COMPLETE).write_text(
        json.dumps({"step": 1, "files": {"zero_pp_rank_0_mp_rank_00_model_states.pt": free * 4}})
    )
    manager = CheckpointManager(root, keep_last=2, dist_info=SINGLE)
    with pytest.raises(CheckpointError, match=r"GiB free, about .* GiB needed"):
        manager.save(engine=None, step=2, client_state={})
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]


# ---------------------------------------------------------------------------- retention
def _fake_complete(root: Path, step: int) -> Path:
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    (path / COMPLETE).write_text(json.dumps({"step": step, "files": {}}))
    return path


def test_keep_last_n_never_deletes_latest_target(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5):
        _fake_complete(root, step)
    (root / ".tmp-step_00000006").mkdir()  # a save killed earlier
    manager = CheckpointManager(root, keep_last=2, dist_info=SINGLE)

    (root / LATEST).write_text("step_00000005")
    manager._apply_retention()
    assert [p.name for p in manager.complete_checkpoints()] == ["step_00000004", "step_00000005"]
    assert not (root / ".tmp-step_00000006").exists()

    # A run restarted from an older checkpoint (trainer.resume=<path>) saves step 2 again while
    # newer ones from the first attempt exist: `latest` names step 2, which is not among the
    # newest two by name, and must survive.
    _fake_complete(root, 2)
    (root / LATEST).write_text("step_00000002")
    manager._apply_retention()
    assert [p.name for p in manager.complete_checkpoints()] == ["step_00000002", "step_00000004", "step_00000005"]
    assert manager.latest() == root / "step_00000002"
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


# ---------------------------------------------------------------------------- files that run code
class RunsAShellCommand:
    """What an attacker pickles into a checkpoint: unpickling it runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


FILE_KINDS = {"model states": "*model_states.pt", "optimizer states": "*optim_states.pt", "RNG": "rng_rank0.pt"}


def _poisoned_copy(run: Path, tmp_path: Path, pattern: str) -> tuple[Path, Path, Path]:
    """A copy of the run's checkpoint whose `pattern` file also carries a RunsAShellCommand, with
    complete.json's checksums rewritten to match (the attacker writes those too).
    Returns (step directory, poisoned file, marker the command would create)."""
    step = run / "checkpoints" / (run / "checkpoints" / LATEST).read_text().strip()
    copy = tmp_path / "checkpoints" / step.name
    shutil.copytree(step, copy)
    (tmp_path / "checkpoints" / LATEST).write_text(step.name)
    victim = next(copy.glob(pattern))
    marker = tmp_path / "pwned"
    state = safe_load.load(victim)
    state["payload"] = RunsAShellCommand(marker)
    torch.save(state, victim)
    complete = json.loads((copy / COMPLETE).read_text())
    complete["files"][victim.name] = {"size": victim.stat().st_size, "sha256": sha256_file(victim)}
    (copy / COMPLETE).write_text(json.dumps(complete))
    assert verify_checkpoint(copy) == []  # checksums cannot tell
    return copy, victim, marker


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_a_checkpoint_file_that_would_run_code_is_refused(finished_run, tmp_path, capsys, kind):
    """Resume, moss-export, moss-chat's loader and stage.init_from's source all refuse the file,
    naming it, and the command never runs."""
    copy, victim, marker = _poisoned_copy(finished_run, tmp_path, FILE_KINDS[kind])
    manager = CheckpointManager(copy.parent, keep_last=2, dist_info=SINGLE)
    with pytest.raises(CheckpointError, match=f"{victim.name} would run code when loaded: it names posix.system"):
        manager.load(engine=None, path=copy)  # refused before DeepSpeed reads anything
    with pytest.raises(CheckpointError, match=victim.name):
        _ = MossTrainCheckpoint(copy).names  # stage.init_from, moss-chat (checkpoint.export.load_model)
    assert export_main([str(copy), str(tmp_path / "hf")]) == 1
    assert f"{victim.name} would run code" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "hf").exists()
    # The test is real: an ordinary unpickling of the same file runs the command.
    torch.load(victim, weights_only=False)
    assert marker.exists()


def test_deepspeed_own_loaders_unpickle_in_weights_only_mode(finished_run, tmp_path):
    """DeepSpeed's readers pass weights_only=False; inside safe_load.weights_only() (where
    resume, zero_to_fp32 and the universal conversion run) they refuse the file all the same."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    copy, victim, marker = _poisoned_copy(finished_run, tmp_path, "*optim_states.pt")
    with pytest.raises(CheckpointError, match="posix.system"), safe_load.weights_only():
        TorchCheckpointEngine().load(str(victim), map_location="cpu")  # the engine's load_checkpoint
    with pytest.raises(CheckpointError, match="posix.system"), safe_load.weights_only():
        get_fp32_state_dict_from_zero_checkpoint(str(copy.parent), tag=copy.name)
    assert not marker.exists()
    # Its real files load with exactly the allow-listed types.
    (tmp_path / "clean").mkdir()
    clean = finished_run / "checkpoints" / "step_00000008"
    with safe_load.weights_only():
        state = get_fp32_state_dict_from_zero_checkpoint(str(clean.parent), tag=clean.name)
        optim = TorchCheckpointEngine().load(str(next(clean.glob("*optim_states.pt"))), map_location="cpu")
    assert "lm_head.weight" in state and "optimizer_state_dict" in optim
