"""The training loop for real: DeepSpeed ZeRO-3 on gloo, one and two processes, resume, CLI."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moss_train.checkpoint.store import COMPLETE, LATEST
from moss_train.data.sampler import GlobalBatchPlan
from moss_train.engine.setup import WarmupCosine

from conftest import BIN, free_port, read_metrics, run_cli, train_losses, train_overrides


# ---------------------------------------------------------------------------- unit pieces
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_batch_plan_splits_global_batch_without_overlap_or_gaps(world_size):
    plans = [GlobalBatchPlan(37, 8, 2 if world_size < 4 else 1, world_size, r, seed=7) for r in range(world_size)]
    for position in (0, 8, 32, 72):  # 32 and 72 cross an epoch boundary
        whole = plans[0].global_batch_at(position)
        parts = np.concatenate([np.concatenate(p.micro_batches_at(position)) for p in plans])
        assert parts.tolist() == whole.tolist()
    # One epoch visits every sample exactly once, in a seed-dependent order.
    epoch = np.concatenate([plans[0]._order(0)])
    assert sorted(epoch.tolist()) == list(range(37))
    other_seed = GlobalBatchPlan(37, 8, 1, 1, 0, seed=8)
    assert other_seed._order(0).tolist() != epoch.tolist()
    assert plans[0]._order(1).tolist() != epoch.tolist()


def test_warmup_cosine_schedule():
    schedule = WarmupCosine(warmup_steps=4, max_steps=14, min_ratio=0.1)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == pytest.approx(1.0)
    assert schedule(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert schedule(14) == pytest.approx(0.1)
    assert schedule(100) == pytest.approx(0.1)


# ---------------------------------------------------------------------------- real runs
def test_pretraining_cli_end_to_end(pretrain_data, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        train_overrides(
            pretrain_data, out, **{"trainer.max_steps": 6, "checkpoint.keep_last": 1, "logging.tensorboard": "true"}
        )
    )
    records = train_losses(out)
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    for record in records.values():
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "accuracy"):
            assert math.isfinite(record[key]), key
        assert record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1
    assert records[1]["lr"] < records[2]["lr"]  # warming up
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert evals and math.isfinite(evals[-1]["eval_loss"])
    checkpoints = out / "checkpoints"
    assert (checkpoints / LATEST).read_text().strip() == "step_00000006"
    assert (checkpoints / "step_00000006" / COMPLETE).is_file()
    assert "done:" in result.stdout
    # logging.tensorboard: the same scalars, by step, read back from the event file.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    logged = {(r["step"], k): v for r in read_metrics(out) for k, v in r.items() if k != "step"}
    read_back = {(e.step, tag): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert sorted(read_back) == sorted(logged) and {"loss", "eval_loss", "lr", "mfu"} <= {k for _, k in read_back}
    assert all(read_back[key] == pytest.approx(value, rel=1e-6) for key, value in logged.items())  # float32 events


# The reference runs: the same 4 steps (global batch 8) under ZeRO-3, on 1 process (1x4
# micro-batches) and on 2 ranks (torchrun, 2x2); held-out loss over 14 samples.
REFERENCE_STEPS = {
    "trainer.max_steps": 4,
    "checkpoint.save_final": "false",
    "deepspeed": "zero3",
    "trainer.eval_samples": 14,
}


def torchrun_two() -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "moss_train"]


@pytest.fixture(scope="module")
def zero3_reference(pretrain_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("zero3-reference")
    run_cli(train_overrides(pretrain_data, root / "one", **REFERENCE_STEPS))
    run_cli(train_overrides(pretrain_data, root / "two", **REFERENCE_STEPS), launcher=torchrun_two())
    return {"one": root / "one", "two": root / "two"}


def assert_same_losses(a: dict[int, dict], b: dict[int, dict], rel: float = 1e-5) -> None:
    """Step by step: the same loss and gradient norm. A real divergence (a lost or doubled
    gradient shard, a wrong reduction) shows from step 2 on by far more than summation-order noise."""
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=rel, abs=1e-6), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=10 * rel), step
        assert a[step]["lr"] == b[step]["lr"], step


def test_zero3_one_process_equals_two_processes(zero3_reference):
    """Same global batch, split 1x4 micro-batches or 2 ranks x 2: the same losses, step by step;
    the same held-out loss over 14 samples (2 ranks: a last pass where one rank has none)."""
    one, two = zero3_reference["one"], zero3_reference["two"]
    a, b = train_losses(one), train_losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5, abs=1e-6), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-4), step
    assert a[4]["loss"] < a[1]["loss"]  # it trains: the comparison is not between two constant runs
    eval_a = [r["eval_loss"] for r in read_metrics(one) if "eval_loss" in r]
    eval_b = [r["eval_loss"] for r in read_metrics(two) if "eval_loss" in r]
    assert eval_a[-1] == pytest.approx(eval_b[-1], rel=1e-5)


@pytest.mark.parametrize(
    "zero",
    [
        pytest.param(["deepspeed.zero_stage=0"], id="zero0", marks=pytest.mark.slow),  # two-rank runs: ~10-13 s each
        pytest.param(["deepspeed=zero2"], id="zero2", marks=pytest.mark.slow),
        # slow: DeepSpeedCPUAdam is compiled on first use (minutes on a fresh machine)
        pytest.param(["deepspeed=zero3_offload"], id="zero3_offload", marks=pytest.mark.slow),
    ],
)
def test_other_zero_stages_train_like_zero3(zero, pretrain_data, zero3_reference, tmp_path):
    """ZeRO-0 (plain data parallel), ZeRO-2 (gradients and optimizer states sharded) and ZeRO-3
    with CPU offload (DeepSpeedCPUAdam) on two ranks: the same losses, gradient norms and
    held-out loss as ZeRO-3's two-rank run."""
    out = tmp_path / "run"
    settings = {k: v for k, v in REFERENCE_STEPS.items() if k != "deepspeed"}
    run_cli(zero + train_overrides(pretrain_data, out, **settings), launcher=torchrun_two(), timeout=600)
    reference = zero3_reference["two"]
    assert_same_losses(train_losses(out), train_losses(reference))
    eval_run = [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]
    eval_reference = [r["eval_loss"] for r in read_metrics(reference) if "eval_loss" in r]
    assert eval_run[-1] == pytest.approx(eval_reference[-1], rel=1e-5)


def test_resume_continues_exactly(pretrain_data, tmp_path):
    """2k steps straight vs k steps, stop, resume, k more: identical losses and learning rates."""
    straight = tmp_path / "straight"
    settings = {"trainer.max_steps": 6, "checkpoint.every": 3, "checkpoint.keep_last": 2}
    run_cli(train_overrides(pretrain_data, straight, **settings))
    # The stopped run: what the straight run had on disk after step 3.
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_00000003", stopped / "checkpoints" / "step_00000003")
    (stopped / "checkpoints" / LATEST).write_text("step_00000003")
    result = run_cli(train_overrides(pretrain_data, stopped, **settings))
    assert "resumed from" in result.stdout
    a, b = train_losses(straight), train_losses(stopped)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step]["loss"] == a[step]["loss"], step
        assert b[step]["lr"] == a[step]["lr"], step
        assert b[step]["grad_norm"] == a[step]["grad_norm"], step


def test_one_process_runs_zero3_as_zero2_and_resumes_a_zero3_checkpoint(pretrain_data, tmp_path):
    """One process has nothing to partition: the ZeRO-3 recipe runs DeepSpeed's ZeRO-2 there
    (engine/setup.py: zero_stage_for), with the losses of ZeRO-3 kept in one process
    (deepspeed.zero3_on_one_rank), and resumes that run's ZeRO-3 checkpoint through the
    universal checkpoint to the losses and learning rates of its uninterrupted run."""
    settings = {"trainer.max_steps": 4, "checkpoint.every": 2, "checkpoint.save_final": "false"}
    kept = tmp_path / "kept"
    run_cli([*train_overrides(pretrain_data, kept, **settings), "deepspeed.zero3_on_one_rank=true"])
    assert (kept / "checkpoints" / "step_00000002" / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()
    default = tmp_path / "default"
    run_cli(train_overrides(pretrain_data, default, **settings))
    assert (default / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt").is_file()  # ZeRO 1/2's layout
    assert_same_losses(train_losses(default), train_losses(kept))

    resumed = _resume_copy(kept, "step_00000002", tmp_path / "resumed")
    result = run_cli(train_overrides(pretrain_data, resumed, **settings))
    assert "re-cut for 1 at ZeRO-2" in result.stdout
    a, b = train_losses(kept), train_losses(resumed)
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-6), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4), step
        assert b[step]["lr"] == a[step]["lr"], step


def test_zero3_runs_as_zero2_only_where_one_process_holds_every_parameter():
    from moss_train.config import DeepSpeedConfig
    from moss_train.engine.setup import zero_stage_for

    assert zero_stage_for(DeepSpeedConfig(zero_stage=3), world_size=1) == 2
    assert zero_stage_for(DeepSpeedConfig(zero_stage=3), world_size=2) == 3
    assert zero_stage_for(DeepSpeedConfig(zero_stage=3, zero3_on_one_rank=True), world_size=1) == 3
    assert zero_stage_for(DeepSpeedConfig(zero_stage=3, offload_param=True), world_size=1) == 3  # stage 3 only
    assert [zero_stage_for(DeepSpeedConfig(zero_stage=s), world_size=1) for s in (0, 1, 2)] == [0, 1, 2]
    assert zero_stage_for(DeepSpeedConfig(zero_stage=3), 1, "bf16-autocast") == 2  # fp32 weights
    # 16-bit weights: ZeRO-2 would add 16-bit gradients that a one-GPU run sized for ZeRO-3 may lack
    assert (
        zero_stage_for(DeepSpeedConfig(zero_stage=3), 1, "bf16")
        == zero_stage_for(DeepSpeedConfig(zero_stage=3), 1, "fp16")
        == 3
    )


def test_one_process_run_as_zero2_keeps_no_reduction_buffers():
    """With nothing to reduce, the ZeRO-3 recipe run as ZeRO-2 in one process neither overlaps a
    reduction nor copies gradients into a contiguous reduction buffer; on more ranks, or at the
    stage the recipe names, the recipe's settings stand."""
    from moss_train.config import MossTrainConfig
    from moss_train.engine.setup import deepspeed_config

    cfg = MossTrainConfig()
    cfg.trainer.global_batch_size = cfg.trainer.micro_batch_size * 2

    def reduction(world_size, **deepspeed):
        cfg.deepspeed = replace(cfg.deepspeed, **deepspeed)
        zero = deepspeed_config(cfg, "fp32", world_size)["zero_optimization"]
        return zero["stage"], zero["overlap_comm"], zero["contiguous_gradients"]

    assert reduction(1, zero_stage=3) == (2, False, False)
    assert reduction(2, zero_stage=3) == (3, True, True)
    assert reduction(1, zero_stage=3, zero3_on_one_rank=True) == (3, True, True)
    assert reduction(1, zero_stage=2) == (2, True, True)


def _resume_copy(run: Path, step: str, into: Path) -> Path:
    """A run directory holding only `step` of `run` (what a stopped run leaves)."""
    (into / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / step, into / "checkpoints" / step)
    (into / "checkpoints" / LATEST).write_text(step)
    return into


@pytest.mark.slow  # three real runs (two on two ranks) and a universal-checkpoint conversion: ~40 s quiet
def test_resume_on_another_number_of_ranks_continues_the_uninterrupted_run(pretrain_data, tmp_path):
    """2 ranks -> 1 -> 2 through DeepSpeed's universal checkpoint: the uninterrupted run's
    losses to 1e-5 (a step's loss does not depend on the rank count) and its data position. A
    resume whose model differs names the recipe keys, not DeepSpeed's first tensor size."""
    settings = {"trainer.max_steps": 4, "checkpoint.every": 2, "checkpoint.save_final": "false"}
    torchrun = torchrun_two()
    straight = tmp_path / "straight"
    run_cli(train_overrides(pretrain_data, straight, **settings), launcher=torchrun)  # 2 ranks, saves step 2
    one = _resume_copy(straight, "step_00000002", tmp_path / "one")
    resumed = run_cli(
        train_overrides(pretrain_data, one, **{**settings, "checkpoint.every": 1})
    )  # 1 rank, saves step 3
    assert "resumed from" in resumed.stdout and "re-cut for 1" in resumed.stdout
    two = _resume_copy(one, "step_00000003", tmp_path / "two")
    torchrun[4] = str(free_port())
    run_cli(train_overrides(pretrain_data, two, **settings), launcher=torchrun)  # 2 ranks again
    a, b, c = train_losses(straight), train_losses(one), train_losses(two)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [3, 4] and sorted(c) == [4]
    for resumed_run, steps in ((b, (3, 4)), (c, (4,))):
        for step in steps:
            assert resumed_run[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-6), step
            assert resumed_run[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4), step
            assert resumed_run[step]["lr"] == a[step]["lr"] and resumed_run[step]["epoch"] == a[step]["epoch"], step
    assert a[4]["loss"] < a[1]["loss"]
    assert not list((one / "checkpoints").glob(".tmp-*"))  # the universal copy is gone after the load

    other_model = run_cli(
        train_overrides(pretrain_data, one, **settings, **{"model.n_embd": 96, "model.n_layer": 3}), check=False
    )
    assert other_model.returncode == 2 and "Traceback" not in other_model.stderr
    assert "recipe error: model.n_embd, model.n_layer: the checkpoint" in other_model.stderr
    assert "n_embd=64, n_layer=2, this run builds n_embd=96, n_layer=3" in other_model.stderr


@pytest.mark.slow  # a two-rank run under the deepspeed launcher: ~20 s quiet
def test_deepspeed_launcher_runs_the_cli(pretrain_data, zero3_reference, tmp_path):
    """`deepspeed -m moss_train ...` passes --local_rank; Hydra's parsing must not trip on it.
    It starts two ranks (two optimizer-state shards in the checkpoint) that train as one process does."""
    out = tmp_path / "ds"
    launcher = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "moss_train"]
    run_cli(
        train_overrides(pretrain_data, out, **{**REFERENCE_STEPS, "checkpoint.save_final": "true"}), launcher=launcher
    )
    shards = sorted(p.name for p in (out / "checkpoints" / "step_00000004").glob("*optim_states.pt"))
    assert len(shards) == 2, shards  # one per rank: really two processes
    assert_same_losses(train_losses(out), train_losses(zero3_reference["one"]))


@pytest.mark.slow  # six real moss-train starts, ~28 s: keeps the default suite under 8 min (it measured 467-513 s)
def test_recipe_errors_name_the_key_before_any_process_starts(tmp_path):
    cases = {
        "trainer.global_batch_size=7": "trainer.global_batch_size",
        "data.seq_len=4096": "data.seq_len",
        "trainer.nonexistent=1": "trainer.nonexistent",
        "trainer.max_steps=many": "trainer.max_steps",
        "model.n_head=6": "model.n_head",
        "model=nope": "model",
    }
    for override, key in cases.items():
        result = run_cli([override, f"run.output_dir={tmp_path}/x"], check=False)
        assert result.returncode == 2, override
        assert f"recipe error: {key}:" in result.stderr, (override, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_a_missing_data_root_is_found_before_the_process_group(tmp_path):
    """It used to surface after DeepSpeed's set-up (93 s under load), as a tokenizer error."""
    started = time.monotonic()
    result = run_cli([f"data.root={tmp_path}/nowhere", f"run.output_dir={tmp_path}/x"], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"recipe error: data.root: no such directory: {tmp_path}/nowhere" in result.stderr
    assert "[moss-train]" not in result.stdout + result.stderr  # nothing was set up
    assert time.monotonic() - started < 60 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("when", ["before the process group", "after it"])
def test_under_torchrun_a_recipe_error_is_printed_once(pretrain_data, tmp_path, when):
    """Not once per rank followed by torchrun's 46-line report: rank 0 prints it, and ends the
    launcher before torchrun can report (the job's status is then non-zero: 137)."""
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "moss_train"]
    bad = "trainer.global_batch_size=7" if when == "before the process group" else "data.train_shards=[no/such/*]"
    result = run_cli(
        [*train_overrides(pretrain_data, tmp_path / "run"), bad], launcher=torchrun, check=False, timeout=240
    )
    assert result.returncode != 0
    key = "trainer.global_batch_size" if "batch" in bad else "data.train_shards"
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        line for line in result.stderr.splitlines() if line.startswith(f"moss-train: recipe error: {key}: ")
    ] and result.stderr.count("recipe error") == 1, result.stderr
