"""The main job, shrunken: launch/quickstart.py --smoke runs every step of the real quickstart
(a few optimizer steps each) and leaves the summary, the export and the pictures."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from moss_train.engine.setup import resolve_precision

from conftest import REPO, cli_env

STEPS = ["data", "pretrain", "sft", "tool-use", "pairs", "reward", "tag", "preference", "dpo", "compare", "export"]
TRAINING = ["pretrain", "sft", "reward", "preference", "dpo"]
RATES = ["tool_use_right", "reward_eval_accuracy", "best_tag_right", "worst_tag_right", "dpo_right", "sft_right"]


@pytest.mark.slow  # eleven commands, each starting Python, torch and DeepSpeed: about 2 min on 2 quiet cores
def test_the_shrunken_quickstart_writes_summary_export_and_pictures(tmp_path):
    out = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "launch/quickstart.py", "--smoke", "--out", str(out), "--data", str(tmp_path / "data")],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    # The SFT model's sampled answers are tagged (the levels are their quantiles) with the held-out
    # dialogues, and the preference stage trains on every tagged sample (each one conversation).
    tagged = json.loads((out / "tag" / "thresholds.json").read_text())["files"]
    assert list(tagged) == ["samples", "valid"] and tagged["samples"]["turns_tagged"] > 0
    preference_data = json.loads((out / "preference" / "sft_data.json").read_text())
    assert preference_data["train"]["kept"] == tagged["samples"]["turns_tagged"]

    summary = json.loads((out / "summary.json").read_text())
    stages = {row["name"]: row for row in summary["stages"]}
    assert list(stages) == STEPS
    assert all(row["wall_s"] > 0 for row in stages.values())
    assert sum(row["wall_s"] for row in stages.values()) <= summary["wall_s"]
    for name in TRAINING:  # three optimizer steps each, with their speed and losses
        assert (
            stages[name]["steps"] == 3 and stages[name]["tokens_per_s"] > 0 and math.isfinite(stages[name]["loss_last"])
        )
    figures = summary["figures"]
    for name in RATES:
        assert 0 <= figures[name] <= 1 and figures[f"{name}_n"] > 0 and figures[f"{name}_stderr"] >= 0
    for language in ("en", "zh", "code"):  # the held-out loss per language, at the start and the end
        assert figures[f"pretrain_eval_loss_{language}_first"] > figures[f"pretrain_eval_loss_{language}_last"] > 0
    assert figures["pretrain_loss_first"] > figures["pretrain_loss_last"]
    assert sorted(figures["right_by_quality_level"]) == ["1", "2", "3", "4", "5"]
    assert summary["cpu"]["cores"] >= 1 and isinstance(summary["cpu"]["amx_bf16"], bool)
    # auto became one precision for every step: what the CPU's measured peaks (the suite's cache) say.
    assert summary["cpu"]["precision"] == quickstart_precision_here()
    assert f"[quickstart] trainer.precision={summary['cpu']['precision']} (asked: auto)" in result.stdout
    # The table is printed, one row per step.
    printed = result.stdout
    assert all(f"\n{name:<12}" in printed for name in STEPS)

    # The export loads in plain transformers, with the tag-conditioned model's tag form.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "export")
    tokenizer = AutoTokenizer.from_pretrained(out / "export")
    assert model.config.model_type == "codegen" and len(tokenizer) <= model.config.vocab_size
    assert (out / "export" / "quality.json").is_file()

    # The picture: a valid PNG, its panels drawn (not a blank canvas).
    from matplotlib import image

    pixels = image.imread(out / "report.png")
    assert pixels.ndim == 3 and pixels.shape[0] > 400 and pixels.shape[1] > 800
    ink = (pixels[..., :3] < 0.9).any(axis=-1).mean()
    assert ink > 0.05, ink
    panels = summary["report_panels"]
    assert set(panels) == {*TRAINING, "quality", "time"} and all(count > 0 for count in panels.values()), panels
    assert np.isfinite(pixels).all()


def load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", REPO / "launch" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def quickstart_precision_here() -> str:
    """trainer.precision=auto as the quickstart resolves it: one process on every core."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(os.cpu_count() or 1)
        return resolve_precision("auto", torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_the_quickstart_precision_reaches_every_training_step(tmp_path, precision):
    """--precision fp32 is how a CPU where bf16 pays runs the quickstart as one where it does not would."""
    quickstart = load_quickstart()
    pipeline = quickstart.steps(quickstart.SMOKE, tmp_path / "out", tmp_path / "data", tmp_path / "bin", precision)
    training = [step for step in pipeline if any(arg.startswith("stage=") for arg in step.argv)]
    assert [step.name for step in training] == ["pretrain", "sft", "reward", "tag", "preference", "dpo"]
    for step in pipeline:
        overrides = [arg for arg in step.argv if arg.startswith("trainer.precision=")]
        assert overrides == ([f"trainer.precision={precision}"] if step in training else [])
