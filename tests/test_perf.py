"""Performance changes keep the numerics: the chunked cross-entropy, fused AdamW, the whole
engine step against a plain torch reference; and the CPU matmul peak behind MFU."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F

from moss_train.engine import cpu, metrics, setup
from moss_train.losses import IGNORE_INDEX, token_cross_entropy

from conftest import REPO, cli_env, free_port


def bench_module(name: str):
    """A script of bench/ imported as a module (bench/ is not a package)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "bench"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_cross_entropy_equals_torch(dtype, monkeypatch):
    # Small chunks, so several chunks (and a ragged last one) are exercised.
    monkeypatch.setattr("moss_train.losses.CHUNK_BYTES", 4 * 300 * 7)
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(50, 300, generator=generator)).to(dtype)
    labels = torch.randint(0, 300, (50,), generator=generator)
    labels[1::3] = logits.float().argmax(-1)[1::3]  # some labels the top prediction
    logits[5, 7] = logits[5].max()  # a tie for the top: the tied label counts as a hit
    labels[5] = 7
    labels[::4] = IGNORE_INDEX
    weights = torch.rand(50, generator=generator)  # a non-uniform upstream gradient per token

    ours = logits.clone().requires_grad_()
    token_loss, is_top = token_cross_entropy(ours, labels)
    (token_loss * weights).sum().backward()

    ref = logits.clone().requires_grad_()
    ref_loss = F.cross_entropy(ref.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    (ref_loss * weights).sum().backward()

    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert token_loss.dtype == torch.float32
    torch.testing.assert_close(token_loss, ref_loss, rtol=1e-6, atol=1e-5)
    assert ours.grad.dtype == dtype
    torch.testing.assert_close(ours.grad.float(), ref.grad.float(), rtol=tol, atol=1e-6)
    hits = (logits.float().argmax(-1) == labels) & (labels != IGNORE_INDEX)
    hits[5] = True
    assert torch.equal(is_top, hits) and 10 < int(is_top.sum()) < 30
    assert (token_loss[labels == IGNORE_INDEX] == 0).all() and (ours.grad[labels == IGNORE_INDEX] == 0).all()


def test_fused_adamw_matches_default_adamw():
    from moss_train.config import MossTrainConfig
    from moss_train.engine.setup import build_optimizer, optimizer_param_groups

    cfg = MossTrainConfig()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    twin.load_state_dict(model.state_dict())
    ours = build_optimizer(model, cfg)
    assert ours.defaults["fused"] is True
    t = cfg.trainer
    reference = torch.optim.AdamW(
        optimizer_param_groups(twin, t.weight_decay),
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
        foreach=False,
    )
    x = torch.randn(8, 16)
    for _ in range(5):
        for net, opt in ((model, ours), (twin, reference)):
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# A script run in its own process (DeepSpeed and a process group of its own): a Trainer on one
# fixed batch of 4 x 32 tokens whose `labels` the script sets before training.
FIXED_BATCH_STAGE = textwrap.dedent(
    """
    import json, math
    from dataclasses import replace
    import torch
    import torch.nn.functional as F
    from moss_train.config import MossTrainConfig
    from moss_train.data.packed import collate_packed
    from moss_train.engine import setup
    from moss_train.engine.loop import Trainer
    from moss_train.model.codegen import CodeGenForCausalLM
    from moss_train.model.config import ModelConfig, flops_per_token, head_flops_per_row
    from moss_train.engine.stage import StageData, TrainingStage
    from moss_train.stages.lm import causal_lm_loss, count_label_targets

    model_cfg = ModelConfig(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))

    class Fixed(TrainingStage):
        name = "fixed"
        def loss(self, ctx, model, batch): return causal_lm_loss(model, batch)
        def load_tokenizer(self, cfg): return None
        def build_model(self, cfg, tok): return CodeGenForCausalLM(cfg.model)
        def build_data(self, ctx):
            samples = [{"input_ids": ids[i], "labels": labels[i]} for i in range(4)]
            return StageData(train=samples, eval=None, collate=collate_packed, count_targets=count_label_targets,
                             tokens_per_sample=32, shuffle=False)

    """
)

ENGINE_VS_TORCH = FIXED_BATCH_STAGE + textwrap.dedent(
    """
    labels = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], dim=1)
    labels[0, :10] = -100  # uneven targets per row: the token mean is over the whole batch

    cfg = MossTrainConfig()
    cfg.model = model_cfg
    cfg.trainer = replace(
        cfg.trainer, micro_batch_size=2, global_batch_size=4, precision="fp32", warmup_steps=2, max_steps=4
    )
    cfg.deepspeed = replace(cfg.deepspeed, zero_stage=3)
    trainer = Trainer(cfg, Fixed())
    engine = [trainer.train_step() for _ in range(4)]

    # The reference: plain torch, F.cross_entropy, AdamW's default (unfused) loop, same schedule.
    torch.manual_seed(cfg.trainer.seed)
    model = CodeGenForCausalLM(model_cfg)
    t = cfg.trainer
    opt = torch.optim.AdamW(setup.optimizer_param_groups(model, t.weight_decay), lr=t.lr,
                            betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, foreach=False)
    sched = setup.scheduler_factory(cfg)(opt)
    reference = []
    for _ in range(4):
        logits = model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step(); sched.step(); opt.zero_grad()
        reference.append({"loss": loss.item(), "grad_norm": norm.item()})
    print("RESULT " + json.dumps({"engine": engine, "reference": reference}))
    """
)


MFU_OF_ANSWER_TOKENS = FIXED_BATCH_STAGE + textwrap.dedent(
    """
    labels = torch.full((4, 32), -100)
    labels[:, 24:] = ids[:, 24:]  # SFT-like: the last 8 of 32 tokens are the answer

    cfg = MossTrainConfig()
    cfg.model = model_cfg
    cfg.run = replace(cfg.run, output_dir="run")
    cfg.trainer = replace(cfg.trainer, micro_batch_size=2, global_batch_size=4, precision="fp32", max_steps=3,
                          warmup_steps=1, eval_samples=0)
    cfg.checkpoint = replace(cfg.checkpoint, save_final=False)
    cfg.logging = replace(cfg.logging, wandb="disabled", progress_bar=False, peak_tflops=1.0)
    history = Trainer(cfg, Fixed()).fit()
    print("RESULT " + json.dumps({
        "per_token": [r["mfu"] * 1e12 / r["tokens_per_s"] for r in history],
        "every_token": flops_per_token(model_cfg, 32), "head": head_flops_per_row(model_cfg),
    }))
    """
)


def run_script_result(tmp_path, name: str, source: str) -> dict:
    """Run `source` as a script in its own process; the JSON of its RESULT line."""
    script = tmp_path / name
    script.write_text(source)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=cli_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_mfu_counts_the_lm_head_only_where_it_computed_logits(tmp_path):
    """SFT computes vocabulary logits only at the answers' tokens (model/codegen.py: logits_at).
    The model FLOPs behind a run's MFU are the body at every token and the lm_head at those
    positions, here a quarter of them; counting the head at every token gave the quickstart's
    SFT an MFU of 0.93 on a CPU whose matmuls reach 0.185 TFLOP/s at best."""
    result = run_script_result(tmp_path, "mfu_of_answer_tokens.py", MFU_OF_ANSWER_TOKENS)
    expected = result["every_token"] - result["head"] + result["head"] * 8 / 32
    assert len(result["per_token"]) == 3
    assert result["per_token"] == pytest.approx([expected] * 3, rel=1e-9)


def test_engine_step_equals_plain_torch_reference(tmp_path):
    """Through the real DeepSpeed engine (the ZeRO-3 recipe, which one process runs as ZeRO-2;
    two micro-batches), with the chunked loss and fused AdamW, four steps give the losses and
    gradient norms of a plain torch loop with F.cross_entropy and the default AdamW."""
    result = run_script_result(tmp_path, "engine_vs_torch.py", ENGINE_VS_TORCH)
    for step, (ours, ref) in enumerate(zip(result["engine"], result["reference"])):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-5), step
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), step
    assert result["reference"][-1]["loss"] < result["reference"][0]["loss"]  # it trained


def test_cpu_peak_is_measured_once_and_keeps_the_best_figure(tmp_path, monkeypatch):
    cache = tmp_path / "peak.json"
    measured = []

    def measure_as(value):
        def measure(precision):
            measured.append(precision)
            return value

        monkeypatch.setattr(cpu, "measure_cpu_peak_tflops", measure)

    measure_as(0.2)
    peak, line = cpu.cpu_peak_tflops("fp32", cache_file=cache)
    assert peak == 0.2 and "measured 0.200 now" in line and measured == ["fp32"]
    (key,) = json.loads(cache.read_text())
    assert "fp32" in key and f"{torch.get_num_threads()} threads" in key and cpu.cpu_identity() in key

    # A training run reads the cache and does not measure again.
    peak, line = cpu.cpu_peak_tflops("fp32", cache_file=cache)
    assert peak == 0.2 and "cached" in line and measured == ["fp32"]

    # A benchmark measures again: a loaded machine cannot lower the peak, a quieter one raises it.
    measure_as(0.05)
    peak, line = cpu.cpu_peak_tflops("fp32", cache_file=cache, remeasure=True)
    assert peak == 0.2 and "best cached 0.200" in line and json.loads(cache.read_text()) == {key: 0.2}
    measure_as(0.3)
    assert cpu.cpu_peak_tflops("fp32", cache_file=cache, remeasure=True)[0] == 0.3
    assert json.loads(cache.read_text()) == {key: 0.3}

    # bf16 has its own entry; a corrupt cache file is measured over, not fatal.
    cpu.cpu_peak_tflops("bf16-autocast", cache_file=cache)
    assert measured[-1] == "bf16-autocast" and len(json.loads(cache.read_text())) == 2
    cache.write_text("{not json")
    assert cpu.cpu_peak_tflops("fp32", cache_file=cache)[0] == 0.3 and len(measured) == 5


def test_the_peak_measurement_goes_to_a_larger_matmul_only_while_they_are_fast():
    """On an AVX2-only AMD EPYC bf16 matmuls have no fast kernel (0.001 TFLOP/s, fp32 0.18): the
    4096^3 peak took minutes per matmul, so a first `precision=auto` run hung measuring it. The
    next, 8x larger, size is measured only while this size's fastest matmul is quick."""
    start = time.perf_counter()
    peak = cpu.measure_cpu_peak_tflops("fp32", sizes=(128, 8192), repeats=1, next_size_below_s=0.0)
    # 8192^3 in fp32 is 1.1 TFLOP: seconds on any CPU (3 s at an AMX Xeon's 0.34 TFLOP/s), twice with its warm-up.
    assert time.perf_counter() - start < 2.0 and peak > 0


def test_auto_precision_on_a_cpu_follows_its_measured_bf16_gain(tmp_path, monkeypatch):
    """bf16 autocast where bf16 matmuls run >= 1.5x fp32's, else fp32. Flags do not tell: a Xeon
    VM and an EPYC, both AVX512-BF16 without AMX, measured 0.5x and 2.2x (engine/cpu.py)."""
    cache = tmp_path / "peak.json"
    monkeypatch.setenv("MOSS_TRAIN_PEAK_CACHE", str(cache))
    here = torch.device("cpu")
    measured_peaks = {  # (fp32, bf16) TFLOP/s: the Xeon VM, the EPYC, an AMX Xeon, a CPU just below the line
        (0.326, 0.171): "fp32",
        (0.174, 0.386): "bf16-autocast",
        (0.34, 2.29): "bf16-autocast",
        (0.2, 0.29): "fp32",
    }
    for (fp32, bf16), expected in measured_peaks.items():
        cache.write_text(json.dumps({cpu.peak_cache_key("fp32"): fp32, cpu.peak_cache_key("bf16"): bf16}))
        assert setup.resolve_precision("auto", here) == expected, (fp32, bf16)
    assert setup.resolve_precision("fp32", here) == "fp32" and setup.resolve_precision("bf16", here) == "bf16"

    # A first run on a machine measures both peaks, once, and keeps them.
    cache.unlink()
    choice = setup.resolve_precision("auto", here)
    peaks = json.loads(cache.read_text())
    fp32, bf16 = peaks[cpu.peak_cache_key("fp32")], peaks[cpu.peak_cache_key("bf16")]
    assert len(peaks) == 2 and fp32 > 0 and bf16 > 0
    assert choice == ("bf16-autocast" if bf16 >= cpu.BF16_MIN_GAIN * fp32 else "fp32")
    assert setup.resolve_precision("auto", here) == choice and json.loads(cache.read_text()) == peaks


def test_an_explicit_bf16_is_kept_with_a_warning_where_bf16_is_slower(tmp_path, monkeypatch, capsys):
    """On a CPU without a bf16 kernel (an AVX2-only EPYC: 0.001 TFLOP/s against fp32's 0.18) an
    explicit bf16 trains as asked, and says once how much slower its matmuls are."""
    cache = tmp_path / "peak.json"
    monkeypatch.setenv("MOSS_TRAIN_PEAK_CACHE", str(cache))
    here = torch.device("cpu")
    for (fp32, bf16), warned in {(0.18, 0.001): True, (0.34, 2.29): False, (0.2, 0.2): False}.items():
        cache.write_text(json.dumps({cpu.peak_cache_key("fp32"): fp32, cpu.peak_cache_key("bf16"): bf16}))
        for asked in ("bf16", "bf16-autocast"):
            assert setup.resolve_precision(asked, here) == asked
            out = capsys.readouterr().out
            assert ("warning: bf16 matmuls on this CPU measure" in out) == warned, (fp32, bf16, out)
            assert not warned or f"({fp32 / bf16:.0f}x slower)" in out
    assert setup.resolve_precision("fp32", here) == "fp32" and capsys.readouterr().out == ""


def test_bf16_attention_crossover_is_measured_once_and_sets_the_model(tmp_path, monkeypatch):
    """Under bf16 autocast on a CPU the trainer asks at which length causal SDPA stops being
    faster in fp32 (measured, cached beside the peaks) and tells the model; in fp32 it is off."""
    import moss_train.model.codegen as codegen
    from moss_train.config import MossTrainConfig
    from moss_train.distributed import DistInfo

    cache = tmp_path / "peak.json"
    monkeypatch.setenv("MOSS_TRAIN_PEAK_CACHE", str(cache))
    below = cpu.bf16_attention_fp32_below(n_head=2, head_dim=16, max_length=128)
    assert below in (0, 65, 129)  # bf16 wins everywhere, fp32 wins at 64 only, or fp32 wins at 128 too
    (key,) = json.loads(cache.read_text())
    assert "sdpa fp32 below, 2 x 16" in key
    cache.write_text(json.dumps({key: 77}))  # the cached answer is used, not measured again
    assert cpu.bf16_attention_fp32_below(n_head=2, head_dim=16, max_length=128) == 77

    cfg = MossTrainConfig()
    cfg.model.n_head, cfg.model.n_embd, cfg.data.seq_len = 2, 32, 128
    single = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    try:
        setup.tune_cpu_attention(cfg, "bf16-autocast", single)
        assert codegen._bf16_cpu_attention_in_fp32_below == 77
        setup.tune_cpu_attention(cfg, "fp32", single)
        assert codegen._bf16_cpu_attention_in_fp32_below == 0
    finally:
        codegen.attend_in_fp32_below(0)


@pytest.mark.integration
def test_rank_0_decides_auto_precision_for_every_rank(tmp_path):
    """Two gloo ranks whose own measurements disagree still train in one precision: rank 0's."""
    script = tmp_path / "ranks.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, os, sys
            import torch
            from moss_train.engine import cpu, setup
            rank = int(os.environ["RANK"])
            cache = {str(tmp_path)!r} + f"/peak-{{rank}}.json"
            os.environ["MOSS_TRAIN_PEAK_CACHE"] = cache
            gain = 2.2 if rank == 0 else 0.5  # rank 0: bf16 pays; rank 1: it does not
            peaks = {{cpu.peak_cache_key("fp32"): 0.2, cpu.peak_cache_key("bf16"): 0.2 * gain}}
            open(cache, "w").write(json.dumps(peaks))
            torch.distributed.init_process_group("gloo")
            print(f"rank {{rank}}: " + setup.resolve_precision("auto", torch.device("cpu")), flush=True)
            torch.distributed.destroy_process_group()
            """
        )
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_port", str(free_port())]
    result = subprocess.run(torchrun + [str(script)], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0: bf16-autocast" in result.stdout and "rank 1: bf16-autocast" in result.stdout


def test_throughput_leaves_out_the_evaluations_and_saves_among_its_steps():
    """Four steps of 1 s with a 10 s evaluation after the second: 4 steps over 4 s. (Restarting
    the window's clock after the evaluation, as the loop did, counted 4 steps over 2 s.)"""
    now = [0.0]
    window = metrics.ThroughputWindow(
        tokens_per_step=100, body_flops=10.0, head_flops=1000.0, peak_flops=1e5, clock=lambda: now[0]
    )
    for step in range(1, 5):
        now[0] += 1.0
        window.add_step(head_rows=25)  # the lm_head at a quarter of the 100 tokens
        if step == 2:
            with window.paused():
                now[0] += 10.0
    rates = window.rates()
    assert rates["tokens_per_s"] == 400 / 4
    assert rates["mfu"] == (400 * 10.0 + 100 * 1000.0) / 4 / 1e5
    window.reset()
    now[0] += 2.0
    window.add_step(head_rows=0)
    assert window.steps == 1 and window.rates()["tokens_per_s"] == 100 / 2


def test_peak_used_for_mfu_is_printed_and_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOSS_TRAIN_PEAK_CACHE", str(tmp_path / "moss-train" / "cpu_matmul_peak.json"))
    peak = metrics.peak_tflops(None, "fp32", torch.device("cpu"))
    assert peak > 0 and f"fp32 matmul peak {peak:.3f} TFLOP/s" in capsys.readouterr().out
    cached = json.loads((tmp_path / "moss-train" / "cpu_matmul_peak.json").read_text())
    assert list(cached.values()) == [peak]
    assert metrics.peak_tflops(2.5, "fp32", torch.device("cpu")) == 2.5
    assert "from logging.peak_tflops" in capsys.readouterr().out


def test_the_throughput_bench_applies_a_lever_as_the_recipe_would():
    """`bench/train_throughput.py --ours-with KEY=VALUE` rows: the override reaches the config, typed,
    and a misspelt key fails instead of timing the defaults under the lever's name."""
    bench = bench_module("train_throughput")
    from omegaconf.errors import ConfigKeyError

    model = bench.CONFIGS["quickstart"]
    default = bench.bench_config(model, "fp32", 3, 16)
    levers = ["deepspeed.stage3_param_persistence_threshold=1000000000", "deepspeed.overlap_comm=false"]
    lever = bench.bench_config(model, "fp32", 3, 16, levers)
    assert default.deepspeed.stage3_param_persistence_threshold == 100_000 and default.deepspeed.overlap_comm
    assert lever.deepspeed.stage3_param_persistence_threshold == 1_000_000_000 and not lever.deepspeed.overlap_comm
    assert (lever.model, lever.trainer.micro_batch_size, lever.trainer.precision) == (model, 16, "fp32")
    with pytest.raises(ConfigKeyError, match="overlap_com"):
        bench.bench_config(model, "fp32", 3, 16, ["deepspeed.overlap_com=false"])


def test_the_engine_bench_gives_a_real_zero3_engine_a_process_of_its_own():
    """A ZeRO-3 engine replaces torch.nn.functional.linear for its whole process, so
    bench/engine_overhead.py runs every row in its own process as soon as one row would really run
    ZeRO-3, and keeps the one-process alternation otherwise."""
    bench = bench_module("engine_overhead")

    def rows(precision, *levers):
        args = bench.parser().parse_args(["--engine-stages", "0,3", *(f"--ours-with={lever}" for lever in levers)])
        return bench.needs_own_processes(bench.engine_rows(args, precision))

    assert not rows("fp32")  # ZeRO-3 in one process runs as ZeRO-2
    assert not rows("bf16-autocast")
    assert rows("fp32", "deepspeed.zero3_on_one_rank=true")
    assert rows("bf16")  # 16-bit weights keep stage 3


@pytest.mark.slow
@pytest.mark.integration
def test_the_compiled_lever_row_trains_the_same_model():
    """`bench/train_throughput.py --ours-compiled`: the row with each block torch.compile'd runs in
    its own process beside the defaults and trains the same model on the same batch, so its losses
    equal the eager row's (inductor's fused kernels round differently: close, not bit-equal)."""
    bench = bench_module("train_throughput")
    args = bench.parser(None).parse_args(
        ["--configs", "tiny", "--rounds", "1", "--steps", "2", "--warmup", "1", "--batch-size", "2", "--seq-len", "32"]
    )
    variants = {"eager": ("moss-train", []), "compiled": ("moss-train", ["--compile-blocks"])}
    pooled = bench.alternate(REPO / "bench" / "train_throughput.py", variants, "tiny", "fp32", args)
    eager, compiled = pooled["eager"]["losses"][0], pooled["compiled"]["losses"][0]
    assert len(eager) == len(compiled) == 3 and eager[0] > eager[-1]  # it trains: the loss falls
    assert compiled == pytest.approx(eager, rel=1e-4)
