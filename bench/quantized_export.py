"""Quantized exports against the bf16 export: load memory, generation speed, held-out perplexity.

For each model (a moss-train run): `moss-export` in fp32 and bf16 (the baseline) and
`moss-export --quantize int8 / int4` (bitsandbytes, the library the export uses); for the choice
of library, also torchao's weight-only int8 and int4 of the same fp32 export, quantized the same
way (moss_train/checkpoint/quantize.py, `library="torchao"`). Then each directory, in its own
subprocess, as a user would load it (`AutoModelForCausalLM.from_pretrained(dir)`, on the CPU):

- load memory: resident memory the model holds once loaded and run (psutil RSS after the load
  and a first forward pass over a held-out document, minus before the load, the libraries
  already imported: weights mapped from the files count once touched), and the weight files'
  size on disk;
- generation: greedy tokens/s for --new-tokens tokens after a held-out prompt (batch 1, the
  end tokens ignored), the best of --repeats in each subprocess and of --rounds subprocesses
  per export, the exports taken in turn, the order reversed every other round (on a shared
  machine the best run is the one least slowed by others);
- perplexity: exp(mean next-token loss) over the first --seq-len tokens of --docs held-out
  documents of the run's own validation shards (its recipe's data.valid_shards).

    python bench/quantized_export.py --model quickstart=runs/quickstart-pretrain \\
        --model small=runs/small-pretrain --write
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_report import cpu_line, publish
from train_throughput import load_line, run_line

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "
# name -> (moss-export dtype, quantization scheme, library)
# (the quantized exports keep the embedding, the vocabulary head, LayerNorms and biases in the
# export's dtype: fp32, and for one int4 row bf16)
VARIANTS = {
    "fp32": ("fp32", None, None),
    "bf16": ("bf16", None, None),
    "int8 bitsandbytes": ("fp32", "int8", "bitsandbytes"),
    "int4 bitsandbytes (NF4)": ("fp32", "int4", "bitsandbytes"),
    "int4 bitsandbytes (NF4), bf16 rest": ("bf16", "int4", "bitsandbytes"),
    "int8 torchao": ("fp32", "int8", "torchao"),
    "int4 torchao (intx, CPU)": ("fp32", "int4", "torchao"),
}
BASELINE = "bf16"


# ----------------------------------------------------------------------------- worker
def measure(directory: str, docs: list[list[int]], new_tokens: int, repeats: int, speed_only: bool = False) -> dict:
    """Load `directory` as a user would and measure it (see the module docstring)."""
    import psutil
    import transformers

    try:  # import the quantization libraries first, so their own size is not counted as the load
        import bitsandbytes  # noqa: F401
        import torchao  # noqa: F401
    except ImportError:
        pass
    process = psutil.Process()
    before = process.memory_info().rss
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    load_s = time.perf_counter() - start
    with torch.no_grad():
        model(torch.tensor([docs[0]]))
        load_bytes = process.memory_info().rss - before
        nll, count = 0.0, 0
        for ids in [] if speed_only else docs:
            x = torch.tensor([ids])
            logits = model(x).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += len(ids) - 1
        prompt = torch.tensor([docs[0][:32]])
        model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            times.append(time.perf_counter() - start)
            assert out.shape[1] == prompt.shape[1] + new_tokens
    files = [p for p in Path(directory).glob("*.safetensors")]
    return {
        "load_mb": load_bytes / 2**20,
        "load_s": load_s,
        "disk_mb": sum(p.stat().st_size for p in files) / 2**20,
        "tokens_per_s": new_tokens / min(times),
        "ppl": float(torch.tensor(nll / count).exp()) if count else None,
        "tokens_scored": count,
    }


def worker(args) -> int:
    torch.set_num_threads(args.threads)
    docs = json.loads(Path(args.docs_file).read_text())
    print(
        RESULT_PREFIX + json.dumps(measure(args.worker, docs, args.new_tokens, args.repeats, args.speed_only)),
        flush=True,
    )
    return 0


# ----------------------------------------------------------------------------- driver
def held_out_docs(run: Path, n: int, seq_len: int) -> list[list[int]]:
    """The first `n` documents (of at least 64 tokens) of the run's validation shards, cut to `seq_len`."""
    from moss_train.checkpoint.sources import MossTrainCheckpoint, recipe_path
    from moss_train.data.shards import TokenShard
    from moss_train.data.token_datasets import resolve_shard_prefixes

    recipe = MossTrainCheckpoint(run).recipe()
    prefixes = resolve_shard_prefixes(
        str(recipe_path(recipe.data.root)), list(recipe.data.valid_shards), "data.valid_shards"
    )
    docs = []
    for prefix in prefixes:
        shard = TokenShard(prefix)
        docs += [shard.document(i)[:seq_len].tolist() for i in range(len(shard)) if len(shard.document(i)) >= 64]
    return docs[:: max(1, len(docs) // n)][:n]  # spread over the sources (EN, ZH, code)


def export_variants(run: Path, root: Path, variants: list[str]) -> dict[str, Path]:
    from moss_train.checkpoint.export import export_checkpoint
    from moss_train.checkpoint.quantize import quantize_export

    dirs = {}
    for name in variants:
        dtype, scheme, library = VARIANTS[name]
        out = root / "".join(c if c.isalnum() else "_" for c in name)
        if library in (None, "bitsandbytes"):  # what moss-export itself writes
            export_checkpoint(run, out, dtype=dtype, quantize=scheme)
        else:  # the same fp32 export, quantized with the other library
            export_checkpoint(run, out, dtype=dtype)
            quantize_export(out, scheme, library=library)
        dirs[name] = out
    return dirs


def run_worker(directory: Path, docs_file: Path, args, speed_only: bool = False) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        str(directory),
        "--docs-file",
        str(docs_file),
        "--threads",
        str(args.threads),
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
        *(["--speed-only"] if speed_only else []),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO / "bench"))
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if result.returncode or not lines:
        raise RuntimeError(f"worker for {directory} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def table(results: dict, argv, load_before: str, args) -> list[str]:
    import bitsandbytes
    import torchao
    import transformers

    lines = [
        "### quantized_export — load memory, greedy tokens/s, held-out perplexity against the bf16 export "
        f"({cpu_line()}, {args.threads} threads)",
        "",
        run_line(argv, load_before)
        + f"; transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}, "
        f"torchao {torchao.__version__}; generation: {args.new_tokens} new tokens, batch 1, "
        f"best of {args.repeats} x {args.rounds} rounds; "
        f"perplexity over the first {args.seq_len} tokens of {args.docs} held-out documents "
        "of the run's validation shards",
        "",
        "| model | export | weights on disk MB | load RSS MB | tokens/s | vs bf16 | perplexity | vs bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, (label, rows) in results.items():
        base = rows[BASELINE]
        for name, r in rows.items():
            lines.append(
                f"| {model} ({label}) | {name} | {r['disk_mb']:.1f} | {r['load_mb']:.0f} | {r['tokens_per_s']:.1f} | "
                f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
                f"{r['ppl']:.2f} | {r['ppl'] / base['ppl'] - 1:+.2%} |"
            )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="NAME=RUN_DIR (a moss-train run; repeat)")
    p.add_argument("--docs", type=int, default=48)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="subprocesses per export for the speed figure")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--variants",
        default=";".join(VARIANTS),
        help=f"separated by ';', {BASELINE!r} among them; of: {'; '.join(VARIANTS)}",
    )
    p.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--docs-file", help=argparse.SUPPRESS)
    p.add_argument("--speed-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    variants = [name.strip() for name in args.variants.split(";")]
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown or BASELINE not in variants:
        p.error(f"--variants: {unknown or 'no ' + BASELINE!r} (the names are: {'; '.join(VARIANTS)})")
    load_before = load_line()
    results = {}
    with tempfile.TemporaryDirectory(prefix="quantized-export-") as tmp:
        for spec in args.model:
            name, run = spec.split("=", 1)
            root = Path(tmp) / name
            docs_file = root / "docs.json"
            root.mkdir()
            docs_file.write_text(json.dumps(held_out_docs(Path(run), args.docs, args.seq_len)))
            dirs = export_variants(Path(run), root, variants)
            from moss_train.checkpoint.sources import MossTrainCheckpoint
            from moss_train.model.config import num_parameters

            cfg = MossTrainCheckpoint(run).model_config
            label = (
                f"{num_parameters(cfg) / 1e6:.1f}M, n_embd {cfg.n_embd} x {cfg.n_layer} layers, vocab {cfg.vocab_size}"
            )
            rows = {variant: run_worker(d, docs_file, args) for variant, d in dirs.items()}
            for k in range(1, args.rounds):  # more speed rounds, the other way round every other time
                for variant in list(dirs)[:: -1 if k % 2 else 1]:
                    speed = run_worker(dirs[variant], docs_file, args, speed_only=True)["tokens_per_s"]
                    rows[variant]["tokens_per_s"] = max(rows[variant]["tokens_per_s"], speed)
            results[name] = (label, rows)
    publish(table(results, argv, load_before, args), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
