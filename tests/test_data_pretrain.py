"""Pretraining on the three-language blend (data=moss_mix) through the real CLI and engine."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from moss_train.checkpoint.store import LATEST

from conftest import read_metrics, run_cli, train_losses, train_overrides

SOURCES = ("en", "zh", "code")


def mix_overrides(data_dir, out, **extra):
    return ["data=moss_mix", *train_overrides(data_dir, out, **extra)]


def test_blend_reports_per_source_loss_and_resumes_exactly(pretrain_data, tmp_path):
    straight = tmp_path / "straight"
    settings = {"trainer.max_steps": 6, "checkpoint.every": 3, "checkpoint.keep_last": 2}
    run_cli(mix_overrides(pretrain_data, straight, **settings))
    records = train_losses(straight)
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    for record in records.values():
        per_source = [record[f"loss_{s}"] for s in SOURCES]
        assert all(math.isfinite(x) for x in per_source), record
        # the token mean over the batch lies between the per-source means
        assert min(per_source) - 1e-6 <= record["loss"] <= max(per_source) + 1e-6
    evals = [r for r in read_metrics(straight) if "eval_loss" in r]
    assert evals and all(math.isfinite(evals[-1][f"eval_loss_{s}"]) for s in SOURCES)

    # The stopped run: what the straight run had on disk after step 3; the blend position is
    # the samples consumed, so the resumed run sees the same batches.
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_00000003", stopped / "checkpoints" / "step_00000003")
    (stopped / "checkpoints" / LATEST).write_text("step_00000003")
    result = run_cli(mix_overrides(pretrain_data, stopped, **settings))
    assert "resumed from" in result.stdout
    resumed = train_losses(stopped)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", *(f"loss_{s}" for s in SOURCES)):
            assert resumed[step][key] == records[step][key], (step, key)


def test_stop_when_a_source_runs_out_fails_up_front(pretrain_data, tmp_path):
    """on_exhausted=stop: the stage refuses a run that needs more samples than a source has,
    before any model exists, naming the source (the CLI prints it as a recipe error, exit 2)."""
    from moss_train.config import compose, to_object, validate
    from moss_train.engine.stage import StageContext
    from moss_train.errors import ConfigError
    from moss_train.stages.pretrain import PretrainStage
    from moss_train.tokenizer import load_tokenizer

    overrides = mix_overrides(pretrain_data, tmp_path / "stop", **{"data.on_exhausted": "stop"})
    cfg = to_object(compose(overrides))
    validate(cfg, world_size=1)
    stage = PretrainStage()
    data = stage.build_data(StageContext(cfg, load_tokenizer(cfg.data.tokenizer)))  # 4 steps: enough data
    assert not data.shuffle and list(data.group_names) == list(SOURCES)
    cfg.trainer.max_steps = len(data.train) // cfg.trainer.global_batch_size + 1
    with pytest.raises(
        ConfigError, match=r"data\.sources\.(en|zh|code): data source '(en|zh|code)' runs out after \d+"
    ):
        stage.build_data(StageContext(cfg, load_tokenizer(cfg.data.tokenizer)))


def test_per_source_loss_sums_add_up_to_the_loss(tmp_path):
    """loss_<source> is the mean over exactly that source's target tokens: the per-source sums add
    up to the loss sum, and each equals the loss of a batch holding only that source's tokens."""
    import torch

    from moss_train.data.packed import PackedSequenceDataset, collate_packed
    from moss_train.data.shards import ShardWriter, open_shards
    from moss_train.model.codegen import CodeGenForCausalLM
    from moss_train.model.config import ModelConfig
    from moss_train.stages.lm import causal_lm_loss

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        with ShardWriter(tmp_path / name, "uint16", "h" * 64, name) as w:
            for _ in range(6):
                w.add_document(rng.integers(4, 100, size=int(rng.integers(3, 30))).tolist() + [2])
    ds = PackedSequenceDataset(open_shards([tmp_path / "a", tmp_path / "b"]), 16, shard_sources=[0, 1])
    torch.manual_seed(0)
    model = CodeGenForCausalLM(ModelConfig(vocab_size=128, n_positions=64, n_embd=32, n_head=4, rotary_dim=8)).eval()
    batch = collate_packed([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        terms = causal_lm_loss(model, batch, group_names=["a", "b"])
        assert set(terms.sums) == {"accuracy", "loss_a", "loss_b"}
        total = terms.sums["loss_a"] + terms.sums["loss_b"]
        assert float(total) == pytest.approx(float(terms.loss_sum), rel=1e-6)
        assert int(terms.counts["loss_a"] + terms.counts["loss_b"]) == int(terms.num_targets)
        for g, name in enumerate(("a", "b")):
            only = {k: v.clone() for k, v in batch.items()}
            only["labels"][batch["source_ids"] != g] = -100  # the same forward, other targets ignored
            alone = causal_lm_loss(model, only)
            assert int(alone.num_targets) == int(terms.counts[f"loss_{name}"]) > 0
            assert float(alone.loss_sum) == pytest.approx(float(terms.sums[f"loss_{name}"]), rel=1e-6)


@pytest.mark.slow  # two real pretraining runs: ~20 s quiet
def test_packed_documents_never_see_each_other_in_the_pretraining_stage(pretrain_data, tmp_path):
    """The held-out loss at the initial weights, through moss-train's pretraining stage, its
    collator and its DeepSpeed engine (two real runs): documents packed four to six to a row
    (seq_len 64) give the same loss as each document alone in its row (seq_len 16). Were
    segment_ids lost on the way, every document after the first in a row would attend to the
    ones before it and its loss would change. (Positions restart per document too; with rotary
    embeddings only relative positions reach attention, so a position offset alone would not
    show in a loss.)"""
    from moss_train.data.shards import ShardWriter
    from moss_train.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(pretrain_data / "tokenizer")
    rng = np.random.default_rng(3)
    for split, n in (("train", 64), ("valid", 24)):
        with ShardWriter(tmp_path / "shards" / f"docs.{split}", "uint16", tokenizer.hash, "docs") as writer:
            for _ in range(n):  # 10 to 16 tokens: never two in a row of 16, four or more in a row of 64
                writer.add_document(rng.integers(10, 900, size=int(rng.integers(9, 16))).tolist() + [tokenizer.eos_id])
    initial_eval = {}
    for seq_len in (16, 64):
        out = tmp_path / f"seq{seq_len}"
        run_cli(
            train_overrides(
                pretrain_data,
                out,
                **{
                    "data.root": str(tmp_path),
                    "data.tokenizer": str(pretrain_data / "tokenizer"),
                    "data.packing": "documents",
                    "data.seq_len": seq_len,
                    "model.initializer_range": 0.5,  # large weights: attention far from uniform
                    "trainer.max_steps": 1,
                    "trainer.eval_at_start": "true",
                    "trainer.eval_samples": 1000,
                    "checkpoint.save_final": "false",
                },
            )
        )
        (initial_eval[seq_len],) = [r for r in read_metrics(out) if "eval_loss" in r and r["step"] == 0]
    alone, packed = initial_eval[16], initial_eval[64]
    assert alone["eval_samples"] == 24 and packed["eval_samples"] <= 6  # one document per row vs several
    assert packed["eval_loss"] == pytest.approx(alone["eval_loss"], rel=1e-5)
    assert packed["eval_accuracy"] == pytest.approx(alone["eval_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_per_source_loss_falls_over_a_few_hundred_steps(pretrain_data, tmp_path):
    out = tmp_path / "long"
    run_cli(
        mix_overrides(
            pretrain_data,
            out,
            **{
                "trainer.max_steps": 200,
                "trainer.global_batch_size": 16,
                "trainer.micro_batch_size": 8,
                "trainer.lr": 2e-3,
                "trainer.warmup_steps": 20,
                "trainer.eval_every": 100,
                "trainer.log_every": 10,
            },
        ),
        timeout=1800,
    )
    records = train_losses(out)
    first, last = records[10], records[200]
    for s in SOURCES:
        assert last[f"loss_{s}"] < first[f"loss_{s}"] - 1.0, s


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.sources.en.weight=0", "data.sources.en.weight"),
        ("data.sources.zh.train_shards=[]", "data.sources.zh.train_shards"),
        ("+data.sources.code.typo=1", "data.sources.code.typo"),
        ("data.on_exhausted=wrap", "data.on_exhausted"),
        ("data.packing=greedy", "data.packing"),
        ("data.train_shards=[shards/*.train]", "data.sources"),
    ],
)
def test_blend_recipe_errors_name_the_key(override, key):
    from moss_train.config import compose, to_object, validate
    from moss_train.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        validate(to_object(compose(["data=moss_mix", override])), world_size=1)
    assert error.value.key == key
