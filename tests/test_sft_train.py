"""stage=sft for real: moss-data sft --demo, fine-tuning padded and packed (the second from the
first one's checkpoint, via stage.init_from), per-category eval, the held-out tool-use figure."""

from __future__ import annotations

import json
import math

import pytest

from conftest import BIN, read_metrics, run_cli, train_losses


@pytest.fixture(scope="module")
def demo_sft_data(pretrain_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-demo")
    result = run_cli(
        [
            "sft",
            "--demo",
            "--demo-train",
            "160",
            "--demo-valid",
            "16",
            "--tokenizer",
            str(pretrain_data / "tokenizer"),
            "--out",
            str(out),
        ],
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
    run_cli(
        sft_overrides(pretrain_data, demo_sft_data, out, **{"sft.packing": "padded", "sft.loss_mask": "moss_reference"})
    )
    return out


def test_sft_padded_length_grouped_with_the_original_mask(padded_run):
    records = train_losses(padded_run)
    assert sorted(records) == [1, 2, 3] and records[3]["loss"] < records[1]["loss"]
    assert "loss_cat_calculator" in records[1]


def test_sft_from_a_checkpoint_packed_with_per_category_eval_and_the_tool_figure(
    pretrain_data, demo_sft_data, padded_run, tmp_path
):
    out = tmp_path / "sft"
    result = run_cli(sft_overrides(pretrain_data, demo_sft_data, out, **{"stage.init_from": str(padded_run)}))
    assert f"from {padded_run}" in result.stdout  # the earlier run's weights were loaded
    assert "sft train: 160/160 conversations" in result.stdout
    records = train_losses(out)
    assert sorted(records) == [1, 2, 3]
    # It continues from the trained weights: its first loss is below the first loss from scratch.
    assert records[1]["loss"] < train_losses(padded_run)[1]["loss"]
    categories = {k[len("loss_cat_") :] for r in records.values() for k in r if k.startswith("loss_cat_")}
    assert {"calculator", "equation_solver"} <= categories
    assert all(math.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in records.values())
    final_eval = [r for r in read_metrics(out) if "eval_loss" in r][-1]
    assert math.isfinite(final_eval["eval_accuracy"])
    assert any(k.startswith("eval_loss_cat_") for k in final_eval) and any(
        k.startswith("eval_accuracy_cat_") for k in final_eval
    )
    report = json.loads((out / "sft_data.json").read_text())
    assert report["train"]["conversations"] == 160 and report["valid"]["conversations"] == 16

    # The held-out tool-use figure (moss-eval tool-use): this checkpoint's own greedy answers,
    # judged; recomputed here answer by answer (moss-chat's two-pass protocol), so the counts
    # and the replies reported are the model's, not merely numbers in range.
    from moss_train.checkpoint.export import load_model
    from moss_train.eval import tool_use
    from moss_train.tokenizer import load_tokenizer

    figure, valid = tmp_path / "figure.json", demo_sft_data / "dialogues" / "valid.jsonl"
    run_cli(
        [
            "tool-use",
            str(out),
            "--tokenizer",
            str(pretrain_data / "tokenizer"),
            "--dialogues",
            str(valid),
            "--limit",
            "3",
            "--out",
            str(figure),
        ],
        launcher=[str(BIN / "moss-eval")],
    )
    scores = json.loads(figure.read_text())
    records = tool_use.checked(json.loads(line) for line in valid.read_text().splitlines())[:3]
    answers = tool_use.answer_first_turns(load_model(out), load_tokenizer(pretrain_data / "tokenizer"), records)
    verdicts = [
        tool_use.check_reply(r["check"], tool_use.commands_of(a), a.reply, tool_use.enabled_plugins(r))
        for r, a in zip(records, answers)
    ]
    assert scores["prompts"] == 3 and [e["reply"] for e in scores["examples"]] == [a.reply for a in answers]
    assert scores["right_command"] == {**scores["right_command"], "hits": sum(c for c, _ in verdicts), "n": 3}
    assert scores["result_stated"] == {**scores["result_stated"], "hits": sum(s for _, s in verdicts), "n": 3}
    assert scores["both"] == {**scores["both"], "hits": sum(c and s for c, s in verdicts), "n": 3}
    assert scores["both"]["rate"] == pytest.approx(scores["both"]["hits"] / 3)
