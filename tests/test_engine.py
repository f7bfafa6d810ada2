"""The training loop for real: DeepSpeed ZeRO-3 on gloo, one and two processes, resume, CLI."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from conftest import BIN, free_port, read_metrics, run_cli, train_losses, train_overrides
from moss_train.data.sampler import GlobalBatchPlan
from moss_train.checkpoint.store import COMPLETE, LATEST
from moss_train.engine.setup import WarmupCosine


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
    result = run_cli(train_overrides(pretrain_data, out, **{"trainer.max_steps": 6, "checkpoint.keep_last": 1}))
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


def test_zero3_one_process_equals_two_processes(pretrain_data, tmp_path):
    """Same global batch, split 1x4 micro-batches or 2 ranks x 2: the same losses, step by step;
    the same held-out loss over 14 samples (2 ranks: a last pass where one rank has none)."""
    steps = {"trainer.max_steps": 4, "checkpoint.save_final": "false", "deepspeed": "zero3", "trainer.eval_samples": 14}
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(train_overrides(pretrain_data, one, **steps))
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "moss_train"]
    run_cli(train_overrides(pretrain_data, two, **steps), launcher=torchrun)
    a, b = train_losses(one), train_losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5, abs=1e-6), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-4), step
    assert a[4]["loss"] < a[1]["loss"]  # it trains: the comparison is not between two constant runs
    eval_a = [r["eval_loss"] for r in read_metrics(one) if "eval_loss" in r]
    eval_b = [r["eval_loss"] for r in read_metrics(two) if "eval_loss" in r]
    assert eval_a[-1] == pytest.approx(eval_b[-1], rel=1e-5)


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


def test_deepspeed_launcher_runs_the_cli(pretrain_data, tmp_path):
    """`deepspeed -m moss_train ...` passes --local_rank; Hydra's parsing must not trip on it."""
    out = tmp_path / "ds"
    launcher = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "moss_train"]
    run_cli(train_overrides(pretrain_data, out, **{"trainer.max_steps": 2}), launcher=launcher)
    assert sorted(train_losses(out)) == [1, 2]


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
