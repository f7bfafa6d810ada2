"""LoRA through peft, for real: adapters on an HF CodeGen base (stage.init_from), on one process
(ZeRO-3) and two (ZeRO-2), for SFT, DPO and the reward model; only the adapters (and a reward
head) train and are saved; resume is exact; the merged export's logits equal the peft model's,
and the adapter directory loads with PeftModel.from_pretrained; LoRA SFT lowers the held-out loss
on the demo dialogues."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
import transformers

from moss_train.checkpoint.export import export_checkpoint
from moss_train.checkpoint.sources import MossTrainCheckpoint
from moss_train.checkpoint.store import LATEST
from moss_train.config import compose, to_object, validate
from moss_train.errors import ConfigError
from moss_train.model import lora
from moss_train.tokenizer import MossTokenizer

from conftest import BIN, free_port, read_metrics, run_cli, train_losses

R, N_EMBD, N_LAYER = 4, 64, 2
BASE_SHAPE = dict(n_positions=512, n_ctx=512, n_embd=N_EMBD, n_layer=N_LAYER, n_head=4, rotary_dim=8)
ADAPTER_PARAMS = (
    N_LAYER
    * R
    * (  # r x (in + out) per adapted projection
        (N_EMBD + 3 * N_EMBD) + (N_EMBD + N_EMBD) + (N_EMBD + 4 * N_EMBD) + (4 * N_EMBD + N_EMBD)
    )
)
TRAINED = re.compile(r"LoRA r=\d+ alpha=[\d.]+ on [\w, ]+: ([\d,]+) trainable parameters of ([\d,]+)")

JOBS_SCRIPT = r"""
import shutil
import sys
from pathlib import Path

from moss_train.config import compose, to_object, validate
from moss_train.distributed import barrier, init_distributed
from moss_train.engine.loop import Trainer
from moss_train.stages import get_stage

for job in sys.argv[1:]:
    name, mode, *args = job.split("\n")
    print(f"=== job {name}", flush=True)
    if mode == "copy-checkpoint":  # a stopped run: one checkpoint of another run, as `latest`
        source, run = Path(args[0]), Path(args[1])
        if init_distributed().is_main:
            (run / "checkpoints").mkdir(parents=True)
            shutil.copytree(source, run / "checkpoints" / source.name)
            (run / "checkpoints" / "latest").write_text(source.name)
        barrier()
        continue
    cfg = to_object(compose(args))
    validate(cfg)
    Trainer(cfg, get_stage(cfg.stage.name)).fit()
"""


def overrides(out, **extra) -> list[str]:
    settings = {
        "model": "tiny",
        "run.output_dir": out,
        "lora.r": R,
        "trainer.micro_batch_size": 2,
        "trainer.global_batch_size": 4,
        "trainer.max_steps": 6,
        "trainer.warmup_steps": 1,
        "trainer.lr": 3e-3,
        "trainer.precision": "fp32",
        "trainer.eval_samples": 16,
        "logging.wandb": "disabled",
        "logging.progress_bar": "false",
        "data.seq_len": 512,
    }
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]


@pytest.fixture(scope="module")
def lora_runs(pretrain_data, tmp_path_factory):
    """The base (an HF CodeGen with random weights and the demo tokenizer), the demo dialogues and
    preference pairs; then LoRA runs: SFT on one process (ZeRO-3, the moss-train CLI); and in one
    two-process launch (ZeRO-2 / ZeRO-3): the same SFT, its resumption from step 3, DPO, a reward
    model."""
    from test_export import random_hf_codegen

    root = tmp_path_factory.mktemp("lora")
    tokenizer = pretrain_data / "tokenizer"
    base = root / "base"
    random_hf_codegen(1024, seed=5, **BASE_SHAPE).save_pretrained(base)
    MossTokenizer.load(tokenizer).save_pretrained(base)
    run_cli(
        [
            "sft",
            "--demo",
            "--demo-train",
            "96",
            "--demo-valid",
            "16",
            "--tokenizer",
            str(tokenizer),
            "--out",
            str(root / "sft"),
        ],
        launcher=[str(BIN / "moss-data")],
    )
    pairs = [
        {"prompt": f"Say something about {w}.", "chosen": f"{w} is fine, please.", "rejected": f"{w}."}
        for w in "abcdefghijklmnopqrstuvwxyzABCDEF"
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    run_cli(
        [
            "pairs",
            "--input",
            str(root / "pairs.jsonl"),
            "--tokenizer",
            str(tokenizer),
            "--out",
            str(root / "pairs"),
            "--valid-fraction",
            "0.25",
            "--meta-instruction",
            "You are MOSS.\n",
        ],
        launcher=[str(BIN / "moss-data")],
    )

    sft = {
        "stage": "sft",
        "data": "sft_demo",
        "data.root": root / "sft",
        "data.tokenizer": tokenizer,
        "stage.init_from": base,
        "checkpoint.every": 3,
        "checkpoint.keep_last": 2,
    }
    pair = {
        "data": "pairs_demo",
        "data.root": root / "pairs",
        "data.tokenizer": tokenizer,
        "stage.init_from": base,
        "data.seq_len": 128,
        "trainer.max_steps": 2,
        "deepspeed": "zero3",
    }
    one = run_cli(overrides(root / "one", **sft, deepspeed="zero3"))
    jobs = [
        ["two", "train", *overrides(root / "two", **sft, deepspeed="zero2")],
        ["copy", "copy-checkpoint", str(root / "two" / "checkpoints" / "step_00000003"), str(root / "resumed")],
        ["resumed", "train", *overrides(root / "resumed", **sft, deepspeed="zero2")],
        ["dpo", "train", *overrides(root / "dpo", **pair, stage="dpo")],
        ["reward", "train", *overrides(root / "reward", **pair, stage="reward")],
    ]
    script = root / "jobs.py"
    script.write_text(JOBS_SCRIPT)
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script)]
    two = run_cli(["\n".join(map(str, job)) for job in jobs], launcher=torchrun, timeout=600)
    logs = dict(re.findall(r"=== job (\w+)\n(.*?)(?==== job |\Z)", two.stdout, re.DOTALL))
    logs["one"] = one.stdout
    return {"root": root, "base": base, "tokenizer": tokenizer, "logs": logs}


def trained_counts(log: str) -> tuple[int, int]:
    trainable, total = TRAINED.search(log).groups()
    return int(trainable.replace(",", "")), int(total.replace(",", ""))


@pytest.mark.slow  # the lora_runs fixture trains four real runs: ~30 s quiet
def test_only_the_adapters_train_and_are_saved(lora_runs):
    base_params = sum(
        p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(lora_runs["base"]).parameters()
    )
    assert trained_counts(lora_runs["logs"]["one"]) == (ADAPTER_PARAMS, base_params + ADAPTER_PARAMS)
    assert trained_counts(lora_runs["logs"]["two"]) == (ADAPTER_PARAMS, base_params + ADAPTER_PARAMS)
    checkpoint = MossTrainCheckpoint(lora_runs["root"] / "one")
    assert all(lora.is_adapter(n) for n in checkpoint.names) and len(checkpoint.names) == 2 * 4 * N_LAYER
    assert sum(int(torch.Size(checkpoint.shape(n)).numel()) for n in checkpoint.names) == ADAPTER_PARAMS
    settings = checkpoint.meta["lora"]
    assert (settings["r"], settings["target_modules"]) == (R, list(lora.LORA_TARGETS))
    assert settings["base"]["path"] == str(lora_runs["base"].resolve())
    # The reward model trains its score head beside the adapters, and saves both.
    reward = MossTrainCheckpoint(lora_runs["root"] / "reward")
    assert trained_counts(lora_runs["logs"]["reward"])[0] == ADAPTER_PARAMS + N_EMBD + 1
    assert sorted(n for n in reward.names if not lora.is_adapter(n)) == ["score.bias", "score.weight"]


@pytest.mark.slow  # the lora_runs fixture trains four real runs: ~30 s quiet
def test_lora_on_one_and_two_processes_agrees_and_resume_is_exact(lora_runs):
    root = lora_runs["root"]
    one, two, resumed = (train_losses(root / name) for name in ("one", "two", "resumed"))
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5, 6] and sorted(resumed) == [4, 5, 6]
    for step in one:  # ZeRO-3 on 1 process vs ZeRO-2 on 2: the same global batches
        assert one[step]["loss"] == pytest.approx(two[step]["loss"], rel=1e-5, abs=1e-6), step
        assert one[step]["grad_norm"] == pytest.approx(two[step]["grad_norm"], rel=1e-4), step
    assert one[6]["loss"] < one[1]["loss"]
    assert "resumed from" in lora_runs["logs"]["resumed"]
    for step in (4, 5, 6):  # adapters, optimizer, schedule and data position restored
        assert (resumed[step]["loss"], resumed[step]["lr"], resumed[step]["grad_norm"]) == (
            two[step]["loss"],
            two[step]["lr"],
            two[step]["grad_norm"],
        )


@pytest.mark.slow  # the lora_runs fixture trains four real runs: ~30 s quiet
def test_dpo_reference_is_the_base_with_the_adapters_disabled(lora_runs):
    log = lora_runs["logs"]["dpo"]
    assert "dpo reference: the policy with its LoRA adapters disabled (no second model)" in log
    assert log.count("loaded 21 tensors from") == 1  # one model built and loaded: no frozen copy
    first = train_losses(lora_runs["root"] / "dpo")[1]
    # The adapters start at zero (B = 0): the policy is the reference, every pair's loss log 2.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["margin"] == pytest.approx(0, abs=1e-6)


def held_out_loss(model, tokenizer_dir, sft_dir) -> float:
    """Mean token loss of `model` (transformers) on the held-out demo dialogues' trained tokens."""
    from moss_train.data import rendering
    from moss_train.data.shards import open_shards

    shards = open_shards(sorted(str(p)[: -len(".json")] for p in (sft_dir / "shards").glob("valid.*.json")))
    total, count = 0.0, 0
    for shard in shards:
        for i in range(len(shard)):
            ids = torch.from_numpy(shard.document(i).astype("int64"))[None]
            targets = torch.from_numpy((shard.document_mask(i) & rendering.LOSS_DEFAULT).astype(bool))[1:]
            with torch.no_grad():
                logits = model(ids).logits[0, :-1].float()
            losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            total, count = total + losses[targets].sum().item(), count + int(targets.sum())
    return total / count


@pytest.mark.slow  # the lora_runs fixture trains four real runs: ~30 s quiet
def test_merged_and_adapter_exports_give_the_peft_models_logits_and_a_lower_held_out_loss(lora_runs, tmp_path):
    from peft import PeftModel

    run, base = lora_runs["root"] / "one", lora_runs["base"]
    export_checkpoint(run, tmp_path / "merged")
    result = export_checkpoint(run, tmp_path / "adapter", lora_format="adapter")
    assert result.kind == "lora_adapter" and result.num_parameters == ADAPTER_PARAMS
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with_adapters = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter"
    ).eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    x = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = merged(x).logits, with_adapters(x).logits, plain(x).logits
    print(
        f"merged export vs peft model: max abs logit difference {(a - b).abs().max():.2e}; "
        f"vs the base {(a - c).abs().max():.2e}"
    )
    assert (a - b).abs().max() <= 1e-4 and (a - c).abs().max() > 1e-2  # the adapters loaded, and changed the model
    # LoRA SFT lowers the held-out loss on the demo dialogues (the run's own figure agrees).
    before, after = (held_out_loss(m, lora_runs["tokenizer"], lora_runs["root"] / "sft") for m in (plain, merged))
    final_eval = [r for r in read_metrics(run) if "eval_loss" in r][-1]["eval_loss"]
    print(
        f"held-out loss on the demo dialogues: base {before:.4f} -> LoRA {after:.4f} "
        f"(the run's eval_loss {final_eval:.4f})"
    )
    assert after < before - 0.1 and after == pytest.approx(final_eval, rel=1e-4)
    # The adapter directory carries what chat needs, and a reward model exports merged only.
    assert json.loads((tmp_path / "adapter" / "generation_config.json").read_text())["eos_token_id"]
    transformers.AutoTokenizer.from_pretrained(tmp_path / "adapter").apply_chat_template(
        [{"role": "user", "content": "hi"}]
    )
    with pytest.raises(Exception, match="exports merged"):
        export_checkpoint(lora_runs["root"] / "reward", tmp_path / "reward-adapter", lora_format="adapter")
    export_checkpoint(lora_runs["root"] / "reward", tmp_path / "reward")
    assert json.loads((tmp_path / "reward" / "config.json").read_text())["architectures"] == ["CodeGenModel"]


@pytest.mark.slow  # the lora_runs fixture trains four real runs: ~30 s quiet
def test_an_adapter_fits_only_its_base(lora_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_runs["root"] / "one", run)
    complete = run / "checkpoints" / (run / "checkpoints" / LATEST).read_text().strip() / "complete.json"
    state = json.loads(complete.read_text())
    state["meta"]["lora"]["base"]["fingerprint"] = "0" * 64  # as if the base had been trained further
    complete.write_text(json.dumps(state))
    with pytest.raises(Exception, match="has changed since the LoRA adapters were trained"):
        export_checkpoint(run, tmp_path / "out")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["lora.r=8", "stage.init_from=."], "lora.r"),  # stage=pretrain trains no adapters
        (["stage=sft", "lora.r=8"], "stage.init_from"),
        (
            ["stage=sft", "lora.r=8", "stage.init_from=.", "lora.target_modules=[qkv_proj,lm_head]"],
            "lora.target_modules",
        ),
        (["stage=sft", "lora.r=8", "stage.init_from=.", "lora.dropout=1.5"], "lora.dropout"),
        (["stage=dpo", "lora.r=8", "stage.init_from=.", "preference.reference=tests"], "preference.reference"),
        (["stage=sft", "lora.r=-1"], "lora.r"),
    ],
)
def test_lora_recipe_errors_name_the_key(overrides, key):
    cfg = to_object(compose(["data.tokenizer=x", *overrides]))
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}:"):
        validate(cfg, world_size=1)


def test_mfu_counts_frozen_weights_without_their_gradient_and_the_adapters_in_full():
    """A frozen weight runs forward and passes the gradient to its input (4 FLOPs a parameter
    per token), not 6 as in PaLM's count where everything trains; each adapter adds its 6."""
    from moss_train.config import LoraConfig
    from moss_train.model.codegen import CodeGenForCausalLM
    from moss_train.model.config import ModelConfig, num_parameters

    cfg = ModelConfig(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
    model = lora.add_adapters(CodeGenForCausalLM(cfg), LoraConfig(r=4), seed=0)
    head = 512 * 64 + 512  # lm_head weight and bias, frozen
    frozen_body = num_parameters(cfg) - 512 * 64 - head  # the input embedding has no FLOPs at all
    # r x (in + out) per adapted projection: qkv_proj 64 -> 192, out_proj 64 -> 64, fc_in 64 -> 256, fc_out 256 -> 64
    adapters = 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert sum(p.numel() for n, p in model.named_parameters() if lora.is_adapter(n)) == adapters
    assert lora.flops_per_token_change(model) == (6 * adapters - 2 * frozen_body, -2 * head)
