"""The CodeGen model: HF equivalence, packing, config arithmetic, checkpointing, dtypes, zero.Init."""

import copy
import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

import moss_train.model.codegen as codegen
from moss_train.errors import ConfigError
from moss_train.model import (
    CodeGenForCausalLM,
    ModelConfig,
    flops_per_token,
    from_hf_config,
    load_hf_state_dict,
    num_parameters,
    padded_vocab_size,
    to_hf_config,
    validate_model_config,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (config, batch, seq_len): n_head 4/8/12/16, rotary_dim < head_dim and == head_dim,
# n_inner unset/set, vocab already padded or not.
HF_CASES = [
    (dict(vocab_size=256, n_embd=64, n_head=4, rotary_dim=8, n_layer=2), 2, 13),
    (dict(vocab_size=300, n_embd=64, n_head=8, rotary_dim=8, n_layer=2, n_inner=100), 2, 32),
    (dict(vocab_size=128, n_embd=96, n_head=12, rotary_dim=4, n_layer=3, n_inner=50), 3, 7),
    (dict(vocab_size=200, n_embd=128, n_head=4, rotary_dim=32, n_layer=1), 1, 40),
    (dict(vocab_size=64, n_embd=128, n_head=16, rotary_dim=2, n_layer=2, layer_norm_epsilon=1e-6), 2, 1),
]


def make_cfg(**kw) -> ModelConfig:
    kw.setdefault("initializer_range", 1.0 / kw.get("n_embd", 256) ** 0.5)
    return ModelConfig(**kw)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights that make every part of the network matter: O(1) activations, non-trivial
    LayerNorm affine, non-zero biases (the default init has them at 1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "ln" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        else:
            fan_in = p.shape[-1] if p.dim() == 2 and "wte" not in name else 1
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def hf_model(cfg: ModelConfig) -> transformers.CodeGenForCausalLM:
    hf_cfg = to_hf_config(cfg)
    hf_cfg._attn_implementation = "eager"  # the only one CodeGen has
    return transformers.CodeGenForCausalLM(hf_cfg).eval()


EXPECTED_NAMES = ["transformer.wte.weight"]
for _i in range(2):
    EXPECTED_NAMES += [
        f"transformer.h.{_i}.{n}"
        for n in (
            "ln_1.weight",
            "ln_1.bias",
            "attn.qkv_proj.weight",
            "attn.out_proj.weight",
            "mlp.fc_in.weight",
            "mlp.fc_in.bias",
            "mlp.fc_out.weight",
            "mlp.fc_out.bias",
        )
    ]
EXPECTED_NAMES += ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight", "lm_head.bias"]


def test_state_dict_names_equal_hf_and_no_buffers():
    cfg = make_cfg(vocab_size=100, n_embd=64, n_head=4, rotary_dim=8, n_layer=2)
    ours = CodeGenForCausalLM(cfg)
    assert list(ours.state_dict()) == EXPECTED_NAMES
    assert list(ours.buffers()) == []
    hf_sd = hf_model(cfg).state_dict()
    assert sorted(hf_sd) == sorted(EXPECTED_NAMES)
    for k, v in ours.state_dict().items():
        assert v.shape == hf_sd[k].shape, k
    assert ours.lm_head.weight.shape[0] == 128  # 100 padded to a multiple of 64


@pytest.mark.parametrize("case", range(len(HF_CASES)))
def test_logits_equal_hf_both_directions(case):
    kw, B, T = HF_CASES[case]
    cfg = make_cfg(**kw)
    V = padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_to_multiple_of)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(case))

    # ours -> HF
    torch.manual_seed(case)
    ours = CodeGenForCausalLM(cfg).eval()
    randomize_(ours, seed=case)
    hf = hf_model(cfg)
    hf.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
        h_ours, h_hf = ours.hidden_states(x), hf.transformer(x).last_hidden_state
    assert a.shape == (B, T, V) and a.dtype == torch.float32
    assert a.std() > 0.3  # logits big enough that a 1e-5 tolerance means something
    diff = (a - b).abs().max().item()
    print(f"case {case}: ours->HF max abs logit diff {diff:.3e}")
    assert diff <= 1e-5
    assert (h_ours - h_hf).abs().max().item() <= 1e-5

    # HF -> ours
    hf2 = hf_model(cfg)
    randomize_(hf2, seed=100 + case)
    ours2 = CodeGenForCausalLM(cfg).eval()
    load_hf_state_dict(ours2, hf2.state_dict())
    with torch.no_grad():
        c, d = ours2(x), hf2(x).logits
    diff2 = (c - d).abs().max().item()
    print(f"case {case}: HF->ours max abs logit diff {diff2:.3e}")
    assert diff2 <= 1e-5
    assert (c - a).abs().max() > 1e-2  # the two directions really used different weights


def test_hf_comparison_is_sensitive_to_layout():
    """Negative control: swapping the q and k blocks of qkv_proj (a plausible layout bug)
    must break the equality the test above checks."""
    cfg = make_cfg(**HF_CASES[1][0])
    ours = CodeGenForCausalLM(cfg).eval()
    randomize_(ours, seed=7)
    sd = ours.state_dict()
    C, P = cfg.n_embd, 4
    for i in range(cfg.n_layer):
        w = sd[f"transformer.h.{i}.attn.qkv_proj.weight"].view(P, 3, C // P, C)
        sd[f"transformer.h.{i}.attn.qkv_proj.weight"] = w[:, [2, 1, 0]].reshape(3 * C, C)
    hf = hf_model(cfg)
    hf.load_state_dict(sd, strict=True)
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() > 1e-2


def test_load_hf_state_dict_drops_legacy_buffers():
    cfg = make_cfg(vocab_size=64, n_embd=64, n_head=4, rotary_dim=8, n_layer=2)
    src = CodeGenForCausalLM(cfg)
    randomize_(src, seed=3)
    sd = dict(src.state_dict())
    sd["transformer.h.0.attn.causal_mask"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e9)
    dst = CodeGenForCausalLM(cfg)
    load_hf_state_dict(dst, sd)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    with pytest.raises(RuntimeError):
        dst.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("layout", ["per-document calls", "block-diagonal mask"])
def test_packed_documents_equal_separate_runs(layout, monkeypatch):
    # Both ways of keeping attention inside documents (codegen.document_attention_layout).
    monkeypatch.setattr(codegen, "MAX_DOCUMENT_CALLS", 256 if layout == "per-document calls" else 0)
    cfg = make_cfg(vocab_size=128, n_embd=64, n_head=8, rotary_dim=4, n_layer=2)
    model = CodeGenForCausalLM(cfg).eval()
    randomize_(model, seed=11)
    g = torch.Generator().manual_seed(0)
    lengths = [[5, 9, 4], [10, 1, 7]]
    docs = [[torch.randint(0, 128, (n,), generator=g) for n in row] for row in lengths]
    input_ids = torch.stack([torch.cat(row) for row in docs])
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    segment_ids = torch.stack([torch.cat([torch.full((n,), s) for s, n in enumerate(row)]) for row in lengths])
    with torch.no_grad():
        packed = model(input_ids, position_ids=position_ids, segment_ids=segment_ids)
        unmasked = model(input_ids, position_ids=position_ids)
        worst = 0.0
        for b, row in enumerate(docs):
            start = 0
            for doc in row:
                alone = model(doc[None])[0]
                worst = max(worst, (packed[b, start : start + len(doc)] - alone).abs().max().item())
                start += len(doc)
    print(f"{layout}: packed vs separate max abs logit diff {worst:.3e}")
    assert worst <= 1e-5
    # Without segment_ids later documents see earlier ones, so the mask is what makes it pass.
    assert (unmasked[0, 5:] - packed[0, 5:]).abs().max() > 1e-2


def test_forward_is_lm_head_of_hidden_states_and_default_positions():
    cfg = make_cfg(vocab_size=64, n_embd=64, n_head=4, rotary_dim=8, n_layer=1, n_positions=16)
    model = CodeGenForCausalLM(cfg).eval()
    randomize_(model, seed=5)
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(logits, model.lm_head(model.hidden_states(x)))
        assert torch.equal(logits, model(x, position_ids=torch.arange(12).expand(2, 12)))
        # Rotary embeddings are relative: shifting every position changes nothing...
        assert (logits - model(x, position_ids=torch.arange(12) + 3)).abs().max() <= 1e-5
        # ...but changing the distances between tokens does.
        assert (logits - model(x, position_ids=2 * torch.arange(12))).abs().max() > 1e-3
    with pytest.raises(ValueError, match="n_positions"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_reward_head_reads_in_fp32_under_bf16_autocast():
    """bf16's step at |r| ~ 5 is 0.03, coarser than the margin of two answers a digit apart."""
    from moss_train.model.reward import RewardModel

    cfg = make_cfg(vocab_size=64, n_embd=64, n_head=4, rotary_dim=8, n_layer=1, n_positions=16)
    model = RewardModel(cfg).eval()
    randomize_(model, seed=6)
    x = torch.randint(0, 64, (4, 12))
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        rewards = model(x)
        last = model.hidden_states(x)[:, -1]
        in_bf16 = torch.nn.functional.linear(last, model.score.weight, model.score.bias)
    exact = last.float() @ model.score.weight.float().T + model.score.bias.float()
    assert rewards.dtype == torch.float32
    assert (rewards - exact[:, 0]).abs().max() <= 1e-5
    assert in_bf16.dtype == torch.bfloat16 and (in_bf16.float()[:, 0] - exact[:, 0]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- config


def test_hf_config_round_trip():
    cfg = ModelConfig(
        vocab_size=1024,
        n_embd=96,
        n_head=12,
        rotary_dim=4,
        n_layer=3,
        n_inner=50,
        n_positions=512,
        activation_function="gelu",
        layer_norm_epsilon=1e-6,
        initializer_range=0.01,
        embd_pdrop=0.1,
        resid_pdrop=0.2,
        attn_pdrop=0.3,
    )
    hf_cfg = to_hf_config(cfg)
    assert isinstance(hf_cfg, transformers.CodeGenConfig)
    assert hf_cfg.tie_word_embeddings is False
    assert (hf_cfg.n_positions, hf_cfg.n_ctx, hf_cfg.n_inner, hf_cfg.vocab_size) == (512, 512, 50, 1024)
    assert from_hf_config(hf_cfg) == cfg
    assert from_hf_config(to_hf_config(ModelConfig(vocab_size=64))) == ModelConfig(vocab_size=64)
    # Unpadded vocab: HF gets the padded size, and importing it back keeps that size.
    back = from_hf_config(to_hf_config(dataclasses.replace(cfg, vocab_size=1000)))
    assert back.vocab_size == 1024 and num_parameters(back) == num_parameters(dataclasses.replace(cfg, vocab_size=1000))
    # An HF vocab that is not a multiple of 64 is taken as is.
    odd = from_hf_config(transformers.CodeGenConfig(vocab_size=50400, n_embd=64, n_head=4, rotary_dim=8, n_layer=1))
    assert odd.pad_vocab_to_multiple_of == 1 and padded_vocab_size(odd.vocab_size, 1) == 50400
    assert from_hf_config(hf_cfg, name="x").name == "x"
    with pytest.raises(ConfigError) as e:
        to_hf_config(ModelConfig())  # vocab_size 0 not resolved yet
    assert e.value.key == "model.vocab_size"


BAD_CONFIGS = [
    (dict(n_embd=100, n_head=8), "model.n_head", ["100", "8"]),
    (dict(n_embd=96, n_head=6, rotary_dim=16), "model.n_head", ["6", "4"]),
    (dict(n_embd=64, n_head=4, rotary_dim=32), "model.rotary_dim", ["32", "16"]),
    (dict(rotary_dim=7), "model.rotary_dim", ["7", "even"]),
    (dict(rotary_dim=0), "model.rotary_dim", ["0"]),
    (dict(n_layer=0), "model.n_layer", ["0"]),
    (dict(n_head=-4), "model.n_head", ["-4"]),
    (dict(n_embd=0), "model.n_embd", ["0"]),
    (dict(n_positions=0), "model.n_positions", ["0"]),
    (dict(vocab_size=-1), "model.vocab_size", ["-1"]),
    (dict(activation_function="swishy"), "model.activation_function", ["swishy"]),
    (dict(attn_pdrop=1.0), "model.attn_pdrop", ["1.0"]),
    (dict(resid_pdrop=-0.1), "model.resid_pdrop", ["-0.1"]),
    (dict(embd_pdrop=1.5), "model.embd_pdrop", ["1.5"]),
    (dict(n_inner=0), "model.n_inner", ["0"]),
    (dict(n_layer="2"), "model.n_layer", ["'2'"]),
    (dict(layer_norm_epsilon=0.0), "model.layer_norm_epsilon", ["0.0"]),
    (dict(pad_vocab_to_multiple_of=0), "model.pad_vocab_to_multiple_of", ["0"]),
]


@pytest.mark.parametrize("changes,key,values", BAD_CONFIGS, ids=[c[1] + str(i) for i, c in enumerate(BAD_CONFIGS)])
def test_config_validation(changes, key, values):
    cfg = ModelConfig(**changes)
    with pytest.raises(ConfigError) as e:
        validate_model_config(cfg)
    assert e.value.key == key
    assert key in str(e.value)
    for v in values:
        assert v in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate_model_config(cfg, prefix="reward.model")
    assert e.value.key == "reward." + key
    with pytest.raises(ConfigError):
        CodeGenForCausalLM(dataclasses.replace(cfg, vocab_size=64) if key != "model.vocab_size" else cfg)


def test_valid_configs_pass():
    validate_model_config(ModelConfig())
    moss16b = ModelConfig(vocab_size=107008, n_embd=6144, n_layer=34, n_head=24, rotary_dim=64)
    validate_model_config(moss16b)
    validate_model_config(ModelConfig(n_embd=64, n_head=4, rotary_dim=16))  # rotary_dim == head_dim
    with pytest.raises(ConfigError) as e:
        CodeGenForCausalLM(ModelConfig())  # vocab_size 0 must be resolved before building
    assert e.value.key == "model.vocab_size"


@pytest.mark.parametrize("kw", [c[0] for c in HF_CASES] + [dict(vocab_size=1000, n_inner=7)])
def test_num_parameters_exact(kw):
    cfg = ModelConfig(**kw)
    model = CodeGenForCausalLM(cfg)
    assert num_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_flops_per_token_hand_computed():
    cfg = ModelConfig(vocab_size=64, n_embd=8, n_layer=1, n_head=4, rotary_dim=2)
    # wte 64*8=512; layer: ln 16 + qkv 192 + out 64 + fc_in 8*32+32=288 + fc_out 32*8+8=264 = 824;
    # ln_f 16; lm_head 64*8+64 = 576. Total 1928; without the embedding lookup: 1416.
    assert num_parameters(cfg) == 1928
    assert flops_per_token(cfg, 16) == 6 * 1416 + 12 * 1 * 8 * 16 == 10032
    moss16b = ModelConfig(vocab_size=107008, n_embd=6144, n_layer=34, n_head=24, rotary_dim=64)
    assert 16.0e9 < num_parameters(moss16b) < 17.0e9
    assert flops_per_token(moss16b, 2048) > 6 * 15e9


# ----------------------------------------------------------------------------- training paths


def _loss_and_grads(model, x):
    logits = model(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_same_loss_and_grads(monkeypatch):
    # Dropout on: checkpointing must replay the same dropout masks when it recomputes.
    cfg = make_cfg(
        vocab_size=128, n_embd=64, n_head=8, rotary_dim=4, n_layer=3, embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1
    )
    model = CodeGenForCausalLM(cfg).train()
    randomize_(model, seed=2)
    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))

    calls = []
    real_checkpoint = codegen.checkpoint
    monkeypatch.setattr(codegen, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))

    torch.manual_seed(123)
    loss_plain, grads_plain = _loss_and_grads(model, x)
    assert calls == []
    model.config.gradient_checkpointing = True
    torch.manual_seed(123)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, x)
    assert len(calls) == cfg.n_layer
    assert abs(loss_plain.item() - loss_ckpt.item()) <= 1e-6
    for n in grads_plain:
        assert (grads_plain[n] - grads_ckpt[n]).abs().max() <= 1e-6, n
    torch.manual_seed(124)  # a different dropout draw gives a different loss: dropout is live
    assert abs(_loss_and_grads(model, x)[0].item() - loss_plain.item()) > 1e-4
    model.eval()
    with torch.no_grad():
        model(x)
    assert len(calls) == 2 * cfg.n_layer  # eval never checkpoints


def test_bf16_and_fp16_close_to_fp32():
    cfg = make_cfg(vocab_size=128, n_embd=64, n_head=4, rotary_dim=8, n_layer=2)
    model = CodeGenForCausalLM(cfg).eval()
    randomize_(model, seed=9)
    x = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    segment_ids = torch.tensor([[0] * 10 + [1] * 10, [0] * 20])
    with torch.no_grad():
        ref = model(x, segment_ids=segment_ids)
        for dtype, tol in ((torch.bfloat16, 0.03), (torch.float16, 0.005)):
            out = copy.deepcopy(model).to(dtype)(x, segment_ids=segment_ids)
            assert out.dtype == dtype
            rel = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            print(f"{dtype}: max abs diff / max |logit| = {rel:.3e}")
            assert rel < tol


# ----------------------------------------------------------------------------- DeepSpeed zero.Init

ZERO_INIT_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    import deepspeed
    import deepspeed.comm.torch as ds_torch_comm

    # deepspeed.init_distributed on CPU JIT-compiles a shared-memory allreduce op (~40 s on a
    # fresh machine, needs a C++ compiler). One process needs no allreduce: skip it.
    ds_torch_comm.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")

    from moss_train.model import CodeGenForCausalLM, ModelConfig, num_parameters

    cfg = ModelConfig(vocab_size=500, n_embd=128, n_layer=2, n_head=4, rotary_dim=16, initializer_range=0.02)
    with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1,
                                                  "zero_optimization": {"stage": 3}}):
        model = CodeGenForCausalLM(cfg)
    params = dict(model.named_parameters())
    out = {"partitioned": all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values()),
           "ds_numel": sum(p.ds_numel for p in params.values()),
           "expected_numel": num_parameters(cfg), "weights": {}, "biases_max": {}, "ln_ok": True}
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, p in params.items():
            p = p.detach().float()
            if "ln" in name:
                want = 1.0 if name.endswith("weight") else 0.0
                out["ln_ok"] &= bool(torch.all(p == want))
            elif name.endswith("bias"):
                out["biases_max"][name] = p.abs().max().item()
            else:
                out["weights"][name] = [p.mean().item(), p.std().item(), list(p.shape)]
    print("RESULT " + json.dumps(out))
    """
)


def test_init_under_deepspeed_zero_init(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        DS_ACCELERATOR="cpu",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    script = tmp_path / "zero_init.py"
    script.write_text(ZERO_INIT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [text for text in proc.stdout.splitlines() if text.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT ") :])
    assert res["partitioned"], "parameters were not partitioned by zero.Init"
    assert res["ds_numel"] == res["expected_numel"]
    assert res["ln_ok"]
    assert len(res["biases_max"]) == 2 * 2 + 1  # fc_in, fc_out per layer + lm_head
    assert all(v == 0.0 for v in res["biases_max"].values()), res["biases_max"]
    assert len(res["weights"]) == 1 + 2 * 4 + 1  # wte, qkv/out/fc_in/fc_out per layer, lm_head
    for name, (mean, std, _shape) in res["weights"].items():
        assert abs(std - 0.02) < 0.002, (name, std)
        assert abs(mean) < 0.002, (name, mean)


def test_document_layouts_give_the_same_gradients(monkeypatch):
    """Training through per-document attention calls and through the block-diagonal mask
    produces the same gradients (the layout is a speed choice, never a numerics one)."""
    cfg = make_cfg(vocab_size=64, n_embd=32, n_head=4, rotary_dim=4, n_layer=2)
    model = CodeGenForCausalLM(cfg)
    randomize_(model, seed=5)
    lengths = [[6, 10], [16]]
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 64, (2, 16), generator=g)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    segment_ids = torch.stack([torch.cat([torch.full((n,), s) for s, n in enumerate(row)]) for row in lengths])
    grads = {}
    for max_calls in (256, 0):
        monkeypatch.setattr(codegen, "MAX_DOCUMENT_CALLS", max_calls)
        model.zero_grad()
        logits = model(input_ids, position_ids=position_ids, segment_ids=segment_ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten()).backward()
        grads[max_calls] = [p.grad.clone() for p in model.parameters()]
    assert isinstance(codegen.document_attention_layout(segment_ids), torch.Tensor)  # 0 calls: the mask
    for a, b in zip(grads[256], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_document_spans_are_contiguous_runs():
    segment_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [3, 3, 3, 3, 3, 3]])
    assert codegen.document_spans(segment_ids) == [[(0, 2), (2, 5), (5, 6)], [(0, 6)]]


def test_short_bf16_attention_on_a_cpu_can_run_in_fp32():
    """attend_in_fp32_below(n): bf16 causal attention of fewer than n tokens runs in fp32 (up-cast,
    the output cast back), per packed document and for plain rows; longer ones stay in bf16."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    segments = torch.tensor([[0] * 10 + [1] * 30, [0] * 40])
    layout = codegen.document_attention_layout(segments)
    scale = 16**-0.5

    def attention(below, layout=layout):
        codegen.attend_in_fp32_below(below)
        try:
            return codegen.attend(q, k, v, layout, 0.0, scale)
        finally:
            codegen.attend_in_fp32_below(0)

    def in_fp32(start, end, row):
        part = (t[row : row + 1, :, start:end].float() for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(*part, is_causal=True, scale=scale).bfloat16()

    def in_bf16(start, end, row):  # as training runs it: padded on the right to a multiple of 64 tokens
        part = (t[row : row + 1, :, start:end] for t in (q, k, v))
        padded = (torch.nn.functional.pad(t, (0, 0, 0, -(end - start) % 64)) for t in part)
        out = torch.nn.functional.scaled_dot_product_attention(*padded, is_causal=True, scale=scale)
        return out[:, :, : end - start]

    everything = attention(below=64)
    assert everything.dtype == torch.bfloat16
    assert torch.equal(everything[0:1, :, :10], in_fp32(0, 10, 0)) and torch.equal(everything[1:2], in_fp32(0, 40, 1))
    assert not torch.equal(everything[1:2], in_bf16(0, 40, 1))  # so the two paths can be told apart
    split = attention(below=30)  # the 10-token document in fp32, the 30- and 40-token ones in bf16
    assert torch.equal(split[0:1, :, :10], in_fp32(0, 10, 0)) and torch.equal(split[0:1, :, 10:], in_bf16(10, 40, 0))
    assert torch.equal(split[1:2], in_bf16(0, 40, 1))
    assert torch.equal(attention(below=0), codegen.attend(q, k, v, layout, 0.0, scale))
    plain = attention(below=64, layout=None)  # one document per row: the plain causal call
    assert torch.equal(plain[1:2], in_fp32(0, 40, 1))
    everything.float().square().sum().backward()  # gradients flow back through the casts, in bf16
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_bf16_training_attention_on_a_cpu_meets_only_whole_steps_of_tokens(monkeypatch):
    """SDPA's CPU backward in bf16 keeps kernels for every length it meets, so training pads each
    bf16 document on the right to a multiple of BF16_CPU_ATTENTION_LENGTH_STEP tokens: the kernel
    meets only those lengths, and the real positions' outputs and gradients are those of the
    unpadded call up to bf16 rounding. Without gradients (generation, evaluation) nothing is padded."""
    step = codegen.BF16_CPU_ATTENTION_LENGTH_STEP
    real_sdpa, lengths = torch.nn.functional.scaled_dot_product_attention, []

    def recording_sdpa(q, *args, **kwargs):
        lengths.append(q.shape[2])
        return real_sdpa(q, *args, **kwargs)

    torch.manual_seed(0)
    base = [torch.randn(2, 4, 200, 16, dtype=torch.bfloat16) for _ in range(3)]
    segments = torch.tensor([[0] * 70 + [1] * 130, [0] * 200])
    layout = codegen.document_attention_layout(segments)
    upstream = torch.randn(2, 4, 200, 16, dtype=torch.bfloat16)

    def run(pad: bool):
        qkv = [t.clone().requires_grad_() for t in base]
        monkeypatch.setattr(codegen, "BF16_CPU_ATTENTION_LENGTH_STEP", step if pad else 1)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
        lengths.clear()
        out = codegen.attend(*qkv, layout, 0.0, 0.25)
        out.backward(upstream)
        return [out.detach(), *(t.grad for t in qkv)], list(lengths)

    padded, padded_lengths = run(pad=True)
    plain, plain_lengths = run(pad=False)
    assert plain_lengths == [70, 130, 200] and padded_lengths == [128, 192, 256]
    for a, b in zip(padded, plain):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    monkeypatch.setattr(codegen, "BF16_CPU_ATTENTION_LENGTH_STEP", step)
    with torch.no_grad():
        lengths.clear()
        inference = codegen.attend(*base, layout, 0.0, 0.25)
    assert lengths == [70, 130, 200] and torch.equal(inference, plain[0])


def test_bf16_logits_at_targets_on_a_cpu_come_in_whole_steps_of_rows():
    """The vocabulary head on a CPU in bf16 sees its rows padded to a multiple of
    BF16_CPU_HEAD_ROWS_STEP (oneDNN keeps a kernel per row count); the logits returned are the
    targets' own, and the head's gradient is the unpadded one. fp32, and inference, compute the rows
    as they are."""
    torch.manual_seed(0)
    model = CodeGenForCausalLM(make_cfg(vocab_size=300, n_embd=64, n_head=4, rotary_dim=8, n_layer=1))
    ids = torch.randint(0, 300, (2, 96))
    targets = torch.rand(2, 96) < 0.4
    rows = int(targets.sum())
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))

    def head_grad(precision):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            logits = model(ids, logits_at=targets)
        logits.float().square().sum().backward()
        return logits.detach(), model.lm_head.weight.grad.clone()

    logits, grad = head_grad("bf16-autocast")
    assert logits.shape == (rows, model.lm_head.out_features) and rows % codegen.BF16_CPU_HEAD_ROWS_STEP
    assert seen == [rows + -rows % codegen.BF16_CPU_HEAD_ROWS_STEP]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.hidden_states(ids)[targets]
        unpadded = model.lm_head(hidden)
    torch.testing.assert_close(logits, unpadded.detach(), rtol=2e-2, atol=2e-2)
    model.zero_grad()
    unpadded.float().square().sum().backward()
    torch.testing.assert_close(grad, model.lm_head.weight.grad, rtol=2e-2, atol=2e-2)
    seen.clear()
    head_grad("fp32")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # inference: rows as they are
        model(ids, logits_at=targets)
    assert seen == [rows, rows]


def test_one_query_attention_equals_sdpa_with_and_without_a_mask():
    """A decoding step's attention (one query per row and head) by two batched matmuls over a
    KV cache's slices: what SDPA gives, with every key seen and with left padding masked out."""
    torch.manual_seed(0)
    B, H, L, D, capacity = 3, 4, 37, 16, 50
    q = torch.randn(B, H, 1, D)
    keys, values = torch.randn(B, H, capacity, D), torch.randn(B, H, capacity, D)
    k, v = keys[:, :, :L], values[:, :, :L]  # the cache's (B, H, L, D) slices, as KVCache.update returns them
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    mask[1, ..., :5] = False  # row 1 left-padded by 5 tokens, row 2 by 20
    mask[2, ..., :20] = False
    for layout in (None, mask):
        got = codegen.attend(q, k, v, layout, 0.0, D**-0.5)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=layout, scale=D**-0.5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # A masked key changes nothing: row 2 alone over its 17 real keys.
    alone = torch.nn.functional.scaled_dot_product_attention(q[2:], k[2:, :, 20:], v[2:, :, 20:], scale=D**-0.5)
    torch.testing.assert_close(codegen.attend(q, k, v, mask, 0.0, D**-0.5)[2:], alone, rtol=1e-5, atol=1e-6)
