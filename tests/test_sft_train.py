"""stage=sft for real: moss-data sft --demo, fine-tuning padded and packed (the second from the
first one's checkpoint, via stage.init_from), per-category eval, the held-out tool-use figure."""

from __future__ import annotations

import json
import math
import sys

import pytest

from conftest import BIN, read_metrics, run_cli, train_losses


@pytest.fixture(scope="module")
def demo_sft_data(pretrain_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-demo")
    result = run_cli(
        ["sft", "--demo", "--demo-train", "160", "--demo-valid", "16", "--tokenizer", str(pretrain_data / "tokenizer"), "--out", str(out)],
        launcher=[str(BIN / "moss-data")],
    )
    assert "sft: 176 records -> 176 conversations, 0 rejected," in result.stdout
    return out


def sft_overrides(pretrain_data, data_dir, out, **extra) -> list[str]:
    settings = {
        "stage": "sft",
        "data": "sft_demo",
        "data.root": str(data_dir),
        "data.tokenizer": str(pretrain_data / "tokenizer"),
        "data.seq_len": 512,
        "model": "tiny",
        "model.n_embd": 64,
        "model.rotary_dim": 8,
        "run.output_dir": str(out),
        "trainer.micro_batch_size": 2,
        "trainer.global_batch_size": 4,
        "trainer.max_steps": 3,
        "trainer.warmup_steps": 1,
        "trainer.lr": 3e-3,
        "trainer.precision": "fp32",
        "trainer.eval_samples": 8,
        "logging.wandb": "disabled",
        "logging.progress_bar": "false",
    }
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]


@pytest.fixture(scope="module")
def padded_run(pretrain_data, demo_sft_data, tmp_path_factory):
    """From scratch: one conversation per row, length-grouped, the original MOSS masking."""
    out = tmp_path_factory.mktemp("sft-padded")
    run_cli(sft_overrides(pretrain_data, demo_sft_data, out, **{"sft.packing": "padded", "sft.loss_mask": "moss_reference"}))
    return out


def test_sft_padded_length_grouped_with_the_original_mask(padded_run):
    records = train_losses(padded_run)
    assert sorted(records) == [1, 2, 3] and records[3]["loss"] < records[1]["loss"]
    assert "loss_cat_calculator" in records[1]


def test_sft_from_a_checkpoint_packed_with_per_category_eval_and_the_tool_figure(pretrain_data, demo_sft_data, padded_run, tmp_path):
    out = tmp_path / "sft"
    result = run_cli(sft_overrides(pretrain_data, demo_sft_data, out, **{"stage.init_from": str(padded_run)}))
    assert f"from {padded_run}" in result.stdout  # the earlier run's weights were loaded
    assert "sft train: 160/160 conversations" in result.stdout
    records = train_losses(out)
    assert sorted(records) == [1, 2, 3]
    # It continues from the trained weights: its first loss is below the first loss from scratch.
    assert records[1]["loss"] < train_losses(padded_run)[1]["loss"]
    categories = {k[len("loss_cat_"):] for r in records.values() for k in r if k.startswith("loss_cat_")}
    assert {"calculator", "equation_solver"} <= categories
    assert all(math.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in records.values())
    final_eval = [r for r in read_metrics(out) if "eval_loss" in r][-1]
    assert math.isfinite(final_eval["eval_accuracy"])
    assert any(k.startswith("eval_loss_cat_") for k in final_eval) and any(k.startswith("eval_accuracy_cat_") for k in final_eval)
    report = json.loads((out / "sft_data.json").read_text())
    assert report["train"]["conversations"] == 160 and report["valid"]["conversations"] == 16

    figure = tmp_path / "figure.json"
    run_cli(
        ["-m", "data_pipelines.demo_dialogues", "--checkpoint", str(out), "--tokenizer", str(pretrain_data / "tokenizer"),
         "--dialogues", str(demo_sft_data / "dialogues" / "valid.jsonl"), "--limit", "3", "--out", str(figure)],
        launcher=[sys.executable],
    )
    scores = json.loads(figure.read_text())
    assert scores["prompts"] == 3 and all(0 <= scores[k] <= 1 for k in ("right_command", "result_stated", "both"))
