"""moss-plan: model states against DeepSpeed's own estimators, activations against what autograd
really saves, time arithmetic, the verdict and the CLI."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from moss_train import plan
from moss_train.config import compose, to_object, validate
from moss_train.losses import token_cross_entropy
from moss_train.model.codegen import CodeGenForCausalLM
from moss_train.model.config import ModelConfig, flops_per_token

from conftest import BIN, run_cli

MOSS_16B = ModelConfig(
    name="moss-16b", vocab_size=107008, n_positions=2048, n_embd=6144, n_layer=34, n_head=24, rotary_dim=64
)
GIB = 2**30
MOSS_PLAN = [str(BIN / "moss-plan")]


def recipe(*overrides: str):
    cfg = to_object(compose(list(overrides), "moss16b_pretrain"))
    validate(cfg, world_size=cfg.cluster.nodes * cfg.cluster.gpus_per_node)
    return cfg


# ---------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("vocab, width", [(1000, 64), (64, 128)])  # lm_head largest; fc_in largest
def test_parameter_counts_match_deepspeeds_count_of_a_built_model(vocab, width):
    from deepspeed.runtime.zero.stage3 import model_to_params

    cfg = ModelConfig(vocab_size=vocab, n_embd=width, n_layer=2, n_head=4, rotary_dim=8, n_positions=64)
    counts = plan.parameter_counts(cfg)
    assert (counts.total, counts.largest_layer) == model_to_params(CodeGenForCausalLM(cfg))
    assert counts.largest_layer_name == ("lm_head" if vocab > width else "mlp.fc_in")


def test_moss16b_size():
    counts = plan.parameter_counts(MOSS_16B)
    assert counts.total == pytest.approx(16.72e9, rel=1e-3)  # CodeGen-16B with MOSS's vocabulary
    assert counts.largest_layer == 107008 * 6144 + 107008


# ---------------------------------------------------------------------------- model states vs DeepSpeed
DS_ROW = re.compile(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$")


def deepspeed_printed_table(capsys, stage: int, counts, nodes: int, gpus: int) -> dict[tuple, tuple[float, float]]:
    """DeepSpeed's estimator as a user runs it: {(offload_param, offload_optimizer): (cpu, gpu)} in GiB."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

        estimate_zero3_model_states_mem_needs_all_cold(counts.total, counts.largest_layer, gpus, nodes)
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

        estimate_zero2_model_states_mem_needs_all_cold(counts.total, gpus, nodes)
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        match = DS_ROW.match(line)
        if match and "zero_init=0" not in line:  # moss-train always builds ZeRO-3 under zero.Init
            options = match.group(3)
            rows[
                (
                    "offload_param=none" not in options and "offload_param" in options,
                    "offload_optimizer=none" not in options,
                )
            ] = (
                float(match.group(1)),
                float(match.group(2)),
            )
    return rows


@pytest.mark.parametrize("nodes, gpus", [(1, 8), (2, 8), (8, 8), (64, 8), (1, 1)])
@pytest.mark.parametrize("stage", [2, 3])
def test_model_states_agree_with_deepspeeds_estimators(capsys, stage, nodes, gpus):
    counts = plan.parameter_counts(MOSS_16B)
    table = deepspeed_printed_table(capsys, stage, counts, nodes, gpus)
    assert len(table) == (3 if stage == 3 else 2)
    for (offload_param, offload_optimizer), (ds_cpu, ds_gpu) in table.items():
        states = plan.model_states(counts, plan.Layout(stage, offload_optimizer, offload_param, nodes, gpus))
        assert states.gpu / GIB == pytest.approx(ds_gpu, abs=0.006), (offload_param, offload_optimizer)
        assert states.cpu_per_node / GIB == pytest.approx(ds_cpu, abs=0.006), (offload_param, offload_optimizer)


def test_model_states_break_down_as_documented():
    counts = plan.parameter_counts(MOSS_16B)
    P, gpus = counts.total, 64
    z3 = plan.model_states(counts, plan.Layout(3, False, False, 8, 8))
    assert (z3.params, z3.grads, z3.optimizer) == (2 * P / gpus, 4 * P / gpus, 12 * P / gpus)
    assert z3.gathered == 4 * counts.largest_layer
    offloaded = plan.model_states(counts, plan.Layout(3, True, True, 8, 8))
    assert offloaded.gpu == z3.gathered  # only the layer being computed stays on the GPU
    z1 = plan.model_states(counts, plan.Layout(1, False, False, 8, 8))
    assert z1.gpu == pytest.approx(4 * P + 16 * P / gpus)  # no DeepSpeed estimator: our own count
    assert plan.deepspeed_estimate(counts, plan.Layout(1, False, False, 8, 8)) is None


# ---------------------------------------------------------------------------- activations vs autograd
def measured_saved_bytes(cfg: ModelConfig, batch: int, seq: int) -> int:
    """Bytes autograd keeps for backward after a bf16 forward + the training loss (each storage counted once,
    parameters excluded), with packed-document masks as pretraining uses them."""
    torch.manual_seed(0)
    model = CodeGenForCausalLM(cfg).to(torch.bfloat16).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    segments = (torch.arange(seq) >= seq // 2).long().expand(batch, seq)  # two documents per row
    storages: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        logits = model(ids, segment_ids=segments)
        token_cross_entropy(logits.flatten(0, 1), ids.flatten())  # the training loss's own kernel
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for ptr, size in storages.items() if ptr not in params)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_matches_what_autograd_saves(checkpointing):
    cfg = ModelConfig(
        vocab_size=512,
        n_embd=256,
        n_layer=3,
        n_head=8,
        rotary_dim=16,
        n_positions=128,
        gradient_checkpointing=checkpointing,
    )
    measured = measured_saved_bytes(cfg, batch=2, seq=128)
    assert plan.saved_activation_bytes(cfg, 2, 128, checkpointing) == pytest.approx(measured, rel=0.02)


def test_activations_at_moss16b_scale():
    with_ckpt = plan.activation_bytes(MOSS_16B, 1, 2048, checkpointing=True)
    without = plan.activation_bytes(MOSS_16B, 1, 2048, checkpointing=False)
    assert plan.activation_bytes(MOSS_16B, 4, 2048, True) == pytest.approx(4 * with_ckpt)
    # The layers dominate without checkpointing. The loss head over the 107k vocabulary holds
    # 4 bytes per entry at its peak (16-bit logits + their gradient), not the 14 of an unfused
    # fp32 cross-entropy (log-probabilities, their gradient, the logits' fp32 and 16-bit grads).
    head = 2048 * (plan.head_saved_bytes_per_token(MOSS_16B) + plan.head_backward_bytes_per_token(MOSS_16B))
    assert without > 3 * with_ckpt
    per_entry = head / (2048 * plan.model_vocab_size(MOSS_16B))  # ln_f's activations add a little
    assert 4 <= per_entry < 4.5 and head < 0.5 * with_ckpt


# ---------------------------------------------------------------------------- recipes
@pytest.mark.parametrize(
    "name, stage", [("moss16b_pretrain", "pretrain"), ("moss16b_sft", "sft"), ("moss16b_preference", "preference")]
)
def test_moss16b_recipes_fit_their_cluster(name, stage):
    cfg = to_object(compose([], name))
    validate(cfg, world_size=cfg.cluster.nodes * cfg.cluster.gpus_per_node)
    assert (cfg.stage.name, cfg.model.n_embd, cfg.model.n_layer, cfg.data.seq_len) == (stage, 6144, 34, 2048)
    assert cfg.deepspeed.zero_stage == 3 and cfg.trainer.precision == "bf16" and cfg.model.gradient_checkpointing
    assert plan.make_plan(cfg).fits


@pytest.mark.parametrize("cluster", ["a100-80g-x1", "a100-80g-x8", "a100-80g-x64", "h100-x1", "h100-x8", "h100-x64"])
def test_cluster_recipes(cluster):
    cfg = to_object(compose([f"cluster={cluster}", "model=moss-16b"]))
    validate(cfg, world_size=1)
    nodes = int(cluster.rsplit("-x", 1)[1])
    assert (cfg.cluster.name, cfg.cluster.nodes, cfg.cluster.gpus_per_node) == (cluster, nodes, 8)
    assert cfg.cluster.peak_tflops == (312 if cluster.startswith("a100") else 989)
    assert 79 <= cfg.cluster.gpu_memory_gib <= 80 and cfg.cluster.interconnect


@pytest.mark.parametrize(
    "override, key",
    [
        ("cluster.nodes=0", "cluster.nodes"),
        ("cluster.mfu=0", "cluster.mfu"),
        ("cluster.gpu_memory_gib=-1", "cluster.gpu_memory_gib"),
        ("cluster.collective_timeout_s=0", "cluster.collective_timeout_s"),
        ("cluster.nvlink=1", "cluster.nvlink"),
    ],
)
def test_cluster_errors_name_the_key(override, key):
    from moss_train.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        validate(to_object(compose([override])), world_size=1)
    assert error.value.key == key


def test_lora_plan_for_moss16b_on_one_gpu():
    cfg = to_object(compose(["stage.init_from=."], "moss16b_lora"))
    validate(cfg, world_size=1)
    lora_plan = plan.make_plan(cfg)
    counts, layout = plan.parameter_counts(MOSS_16B), plan.layout_of(cfg)
    C, r = 6144, 16
    assert lora_plan.trainable == 34 * r * ((C + 3 * C) + 2 * C + 2 * (C + 4 * C))  # qkv, out, fc_in, fc_out
    # The adapters as full training counts parameters, plus the frozen base in 16-bit, plus
    # ZeRO-3's gathered layer without gradients.
    adapters = plan.model_states(plan.ParameterCounts(lora_plan.trainable, 0, "adapters"), layout)
    assert lora_plan.states.gpu == pytest.approx(adapters.gpu + 2 * counts.total + 2 * counts.largest_layer)
    assert lora_plan.full_states.gpu > 8 * lora_plan.states.gpu and lora_plan.fits  # 41 GiB of 80
    # No weight gradients for the base: 4 N instead of 6 N FLOPs per token (+ the attention).
    full = plan.make_plan(dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, r=0)))
    assert full.fits is False and 0.6 < lora_plan.step_seconds / full.step_seconds < 0.7
    assert "LoRA r=16 alpha=32.0 on qkv_proj, out_proj, fc_in, fc_out: 53.5M trainable parameters" in plan.render(
        lora_plan
    )


# ---------------------------------------------------------------------------- time and verdict
def test_step_time_follows_the_6n_rule_and_scales_with_gpus():
    one, eight = plan.make_plan(recipe("cluster=a100-80g-x1")), plan.make_plan(recipe())
    n_matmul = plan.parameter_counts(MOSS_16B).total - 107008 * 6144
    six_n = 6 * n_matmul * 1024 * 2048 / (8 * 312e12 * 0.40)  # attention adds ~5% at 2048 tokens
    assert one.step_seconds == pytest.approx(six_n, rel=0.06) and one.step_seconds > six_n
    assert one.step_seconds == pytest.approx(8 * eight.step_seconds)
    assert flops_per_token(MOSS_16B, 2048) * 1024 * 2048 / one.step_seconds == pytest.approx(8 * 312e12 * 0.40)


def test_the_recipe_fits_its_cluster_and_the_planner_says_what_would_fit_otherwise():
    fits = plan.make_plan(recipe())
    assert fits.fits and "fits:" in plan.render(fits)
    one_gpu = plan.make_plan(recipe("cluster=a100-80g-x1", "cluster.gpus_per_node=1"))
    assert one_gpu.fits is False
    report = plan.render(one_gpu)
    assert "WARNING: DOES NOT FIT" in report and "would fit with:" in report and "deepspeed=zero3_offload" in report
    no_ckpt = plan.make_plan(recipe("cluster=a100-80g-x1", "model.gradient_checkpointing=false"))
    assert no_ckpt.fits is False and plan.fitting_change(no_ckpt) == "model.gradient_checkpointing=true"


def test_moss_plan_cli(pretrain_data, capsys):
    ok = run_cli(["moss16b_pretrain", "cluster=a100-80g-x1", "cluster.nodes=2"], launcher=MOSS_PLAN)
    assert "16 (A100-SXM4-80GB" in ok.stdout and "estimate_zero3_model_states_mem_needs_all_cold" in ok.stdout
    # The same entry point in-process (faster): exit 1 when it does not fit, 2 on a recipe error.
    assert plan.main(["--config-name=moss16b_pretrain", "cluster=h100-x1", "cluster.gpus_per_node=1"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert plan.main(["moss16b_pretrain", "cluster.mfu=1.5"]) == 2
    assert "recipe error: cluster.mfu:" in capsys.readouterr().err
    # A tiny recipe takes its vocabulary from the tokenizer; the local cluster's memory is unknown.
    assert plan.main([f"data.root={pretrain_data}"]) == 0
    assert "fit: unknown" in capsys.readouterr().out
