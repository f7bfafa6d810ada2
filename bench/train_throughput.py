"""Training throughput: one moss-train optimizer step vs transformers' CodeGenForCausalLM.

Both sides train the same CodeGen shapes on the same batches, alternating step by step in one
process so machine noise hits both alike; the figure is the median step after warm-up.

- moss-train: `Trainer.train_step` — the training loop's own step: our model through a real
  DeepSpeed engine (ZeRO stage from --zero-stage), AdamW with no-decay groups, the global
  token-mean loss, clipping, metrics.
- baseline:   transformers.CodeGenForCausalLM(labels=...) with torch.optim.AdamW and clipping.

    python bench/train_throughput.py                      # ~60M config, fp32 and bf16 autocast
    python bench/train_throughput.py --steps 8 --write    # also append the table to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from moss_train.config import MossTrainConfig
from moss_train.data.packed import collate_packed
from moss_train.engine.distributed import init_distributed
from moss_train.engine.loop import Trainer
from moss_train.engine.metrics import measure_cpu_peak_tflops
from moss_train.model.codegen import CodeGenForCausalLM
from moss_train.model.config import ModelConfig, flops_per_token, num_parameters, to_hf_config
from moss_train.stages.base import StageData
from moss_train.stages.lm import causal_lm_loss, count_label_targets

SMALL = ModelConfig(name="small", vocab_size=32000, n_positions=1024, n_embd=512, n_layer=8, n_head=8, rotary_dim=32)


class FixedBatchStage:
    """A stage whose every sample is the benchmark batch, so the Trainer's own step is timed."""

    name = "bench"
    loss = staticmethod(causal_lm_loss)

    def __init__(self, samples: list[dict]):
        self.samples = samples

    def load_tokenizer(self, cfg):
        return None

    def build_model(self, cfg, tokenizer):
        return CodeGenForCausalLM(cfg.model)

    def build_data(self, cfg, tokenizer) -> StageData:
        return StageData(
            train=self.samples,
            eval=None,
            collate=collate_packed,
            count_targets=count_label_targets,
            tokens_per_sample=self.samples[0]["input_ids"].numel(),
        )


def moss_step_fn(model_cfg: ModelConfig, precision: str, zero_stage: int, batch: dict):
    batch_size = batch["input_ids"].shape[0]
    cfg = MossTrainConfig()
    cfg.model = model_cfg
    cfg.trainer = replace(cfg.trainer, micro_batch_size=batch_size, global_batch_size=batch_size, precision=precision)
    cfg.deepspeed = replace(cfg.deepspeed, zero_stage=zero_stage)
    samples = [{k: v[i] for k, v in batch.items()} for i in range(batch_size)]
    trainer = Trainer(cfg, FixedBatchStage(samples))
    return lambda: trainer.train_step()["loss"]


def hf_step_fn(model_cfg: ModelConfig, precision: str, batch: dict):
    from transformers import CodeGenForCausalLM as HFCodeGen

    torch.manual_seed(0)
    model = HFCodeGen(to_hf_config(model_cfg)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-autocast" else contextlib.nullcontext()

    def step() -> float:
        with autocast:
            loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def bench_precision(model_cfg, precision, batch_size, seq_len, steps, warmup, zero_stage) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_cfg.vocab_size, (batch_size, seq_len), generator=generator)
    labels = ids.clone()
    labels[:, :-1] = ids[:, 1:]
    labels[:, -1] = -100  # the same next-token targets HF builds from labels=input_ids
    moss = moss_step_fn(model_cfg, precision, zero_stage, {"input_ids": ids, "labels": labels})
    hf = hf_step_fn(model_cfg, precision, {"input_ids": ids})
    times = {"moss-train": [], "transformers": []}
    for i in range(warmup + steps):
        for name, fn in (("moss-train", moss), ("transformers", hf)):
            elapsed = timed(fn)
            if i >= warmup:
                times[name].append(elapsed)
    tokens = batch_size * seq_len
    return {name: tokens / statistics.median(values) for name, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16-autocast")
    parser.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args(argv)

    init_distributed()
    load_before = os.getloadavg()[0]
    model_cfg = SMALL
    rows = []
    for precision in args.precisions.split(","):
        tps = bench_precision(model_cfg, precision, args.batch_size, args.seq_len, args.steps, args.warmup, args.zero_stage)
        peak = measure_cpu_peak_tflops(precision, size=2048, seconds=1.0)
        flops = flops_per_token(model_cfg, args.seq_len)
        for name, value in tps.items():
            rows.append((precision, name, value, value * flops / (peak * 1e12), peak))
        print(f"{precision}: moss-train {tps['moss-train']:.0f} tok/s, transformers {tps['transformers']:.0f} tok/s "
              f"({tps['moss-train'] / tps['transformers']:.2f}x)", flush=True)

    command = "python bench/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = [
        f"### train_throughput — {model_cfg.name} ({num_parameters(model_cfg) / 1e6:.0f}M params), "
        f"batch {args.batch_size} x seq {args.seq_len}, ZeRO-{args.zero_stage}, {torch.get_num_threads()} threads",
        "",
        f"`{command.strip()}` ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
        f"1-min load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after on {os.cpu_count()} cores)",
        "",
        "| precision | trainer | tokens/s | MFU (vs measured matmul peak) | matmul peak TFLOP/s |",
        "|---|---|---|---|---|",
    ]
    table += [f"| {p} | {n} | {v:.0f} | {m:.1%} | {pk:.3f} |" for p, n, v, m, pk in rows]
    text = "\n".join(table) + "\n"
    print(text)
    if args.write:
        results = Path(__file__).resolve().parent / "RESULTS.md"
        existing = results.read_text() if results.is_file() else "# Benchmark results\n\n"
        results.write_text(existing + "\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
