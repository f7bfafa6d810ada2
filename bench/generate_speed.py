"""Generation speed: moss-chat's batched KV-cache generator against transformers' `generate`.

Both sides decode the same moss-export (a `model=` recipe with random weights, seed 0, written by
the project's own export functions): transformers loads it with
``AutoModelForCausalLM.from_pretrained`` (``trust_remote_code`` off) and runs
``generate(do_sample=False, num_beams=1, use_cache=True, max_new_tokens=N)`` with an attention
mask and a pad id; moss-train loads it with ``moss_train.checkpoint.export.load_model`` and runs
``generate_batch``. Greedy, no end-of-sequence id on either side, so every row generates exactly
``--new-tokens``; the tokens of the two sides must be identical, and the table says they were.
Prompts: ``--prompt-len`` random token ids per row (seeded), the same for both sides.

Both sides run in one worker subprocess with the same torch thread count (``--threads``), their
timed runs interleaved (the order flipped every repeat) so that the machine's load hits both
alike; the ratio is the median of the interleaved pairs' ratios (by wall time, and by the
process's CPU time, which other processes on a shared CPU do not inflate), tok/s the medians of
all timed runs of ``--rounds`` workers. This replaces the earlier cache-vs-no-cache comparison: the KV
cache has been the default since issue 8, and transformers is the baseline that matters now.

``--sample T,P`` decodes with temperature T and top_p P on both sides (MOSS 003's 0.7,0.8; top_k
off) instead of greedy. The two sides then draw different tokens, so "tokens identical" compares
each moss-train version with this tree's tokens (same seed). ``--trained DIR`` decodes a trained
moss-export (e.g. runs/quickstart/export) instead of random weights: random weights give flat
next-token distributions, unlike a trained model's.

``--ours-at REV,...`` adds rows for moss-train as of earlier commits (``git archive`` of
``moss_train/`` into a temporary directory, first on the workers' PYTHONPATH; the workers of all
versions alternate): the generator's speed-ups, one commit at a time, in the same run, each
against the same transformers baseline.

    python bench/generate_speed.py                         # tiny and small, batch 1 and 32, 1 thread
    python bench/generate_speed.py --models tiny --ours-at main --write
    python bench/generate_speed.py --trained runs/quickstart/export --sample 0.7,0.8 --ours-at main --batches 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench_report import checkout, cpu_line, publish, source_env
from train_throughput import load_line, run_line

VOCAB = 8000
RESULT_PREFIX = "BENCH_RESULT "
HF, OURS = "transformers", "moss-train"


# ----------------------------------------------------------------------------- the export
def trained_parameters(directory: Path) -> int:
    from moss_train.checkpoint.export import load_model

    model = load_model(str(directory))
    if model.config.vocab_size < VOCAB:
        raise SystemExit(f"--trained {directory}: vocabulary {model.config.vocab_size} < the prompts' {VOCAB}")
    return sum(p.numel() for p in model.parameters())


def write_export(model_name: str, directory: Path) -> int:
    """`model=<name>` with random weights (seed 0), as an HF directory written by moss-export's
    own functions (config.json, model.safetensors). Returns the parameter count."""
    from moss_train.checkpoint.export import write_safetensors
    from moss_train.config import compose, to_object
    from moss_train.model.codegen import CodeGenForCausalLM
    from moss_train.model.config import num_parameters, to_hf_config

    cfg = replace(to_object(compose([f"model={model_name}"])).model, vocab_size=VOCAB)
    torch.manual_seed(0)
    model = CodeGenForCausalLM(cfg)
    with torch.no_grad():  # biases and LayerNorms random too: varied, non-degenerate continuations
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    write_safetensors(
        directory, {n: tuple(t.shape) for n, t in state.items()}, state.__getitem__, torch.float32, "10GB"
    )
    hf = to_hf_config(cfg)
    hf.architectures, hf.pad_token_id = ["CodeGenForCausalLM"], 0  # no bos / eos: nothing stops early
    hf.save_pretrained(str(directory))
    return num_parameters(cfg)


def prompts(batch: int, length: int) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(batch))


# ----------------------------------------------------------------------------- the worker
def sample_setting(text: str) -> tuple[float, float]:
    """--sample's "T,P" -> (temperature, top_p)."""
    temperature, top_p = (float(x) for x in text.split(","))
    return temperature, top_p


def hf_generator(directory: str, temperature: float, top_p: float):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False).eval()
    model.generation_config.eos_token_id = None  # nothing stops early; no min-length processor

    def generate(ids: torch.Tensor, new_tokens: int) -> list[list[int]]:
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=temperature > 0,
                **({"temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {}),
                num_beams=1,
                use_cache=True,
                max_new_tokens=new_tokens,
                pad_token_id=0,
            )
        return out[:, ids.shape[1] :].tolist()

    return generate


def ours_generator(directory: str, temperature: float, top_p: float):
    from moss_train.chat.generate import generate_batch

    try:
        from moss_train.checkpoint.export import load_model
    except ImportError:  # --ours-at a revision from before the loaders were one (chat.generate had it)
        from moss_train.chat.generate import load_model

    model = load_model(directory)
    sampling = {"temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    return lambda ids, new_tokens: generate_batch(model, ids.tolist(), new_tokens, **sampling)


def run_worker(args) -> int:
    """Both sides in this process, their runs interleaved (the order flipped each repeat), so a
    change in the machine's load hits both alike; the ratio of each pair is what is pooled."""
    torch.set_num_threads(args.threads)
    temperature, top_p = args.sample
    sides = {HF: hf_generator(args.export, temperature, top_p), OURS: ours_generator(args.export, temperature, top_p)}
    result = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = prompts(batch, args.prompt_len)
        for generate in sides.values():
            generate(ids[:, :16], 4)  # warm-up: allocator, kernels, lazy imports
        rates, cpu_rates, tokens = {side: [] for side in sides}, {side: [] for side in sides}, {}
        for repeat in range(args.repeats):
            for side in list(sides) if repeat % 2 == 0 else list(sides)[::-1]:
                start, cpu_start = time.perf_counter(), time.process_time()
                tokens[side] = sides[side](ids, args.new_tokens)
                rates[side].append(batch * args.new_tokens / (time.perf_counter() - start))
                cpu_rates[side].append(batch * args.new_tokens / (time.process_time() - cpu_start))
        assert all(len(row) == args.new_tokens for row in tokens[HF])
        result[batch] = {"rates": rates, "cpu_rates": cpu_rates, "tokens": tokens}
    import moss_train

    print(RESULT_PREFIX + json.dumps({"result": result, "moss_train": moss_train.__file__}), flush=True)
    return 0


def spawn(source: Path | None, export: Path, args) -> dict:
    """One worker run; `source`: a directory holding an older commit's moss_train, else this tree's."""
    env = source_env(dict(os.environ, OMP_NUM_THREADS=str(args.threads)), source)
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--export",
        str(export),
        "--batches",
        args.batches,
        "--prompt-len",
        str(args.prompt_len),
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--sample",
        ",".join(map(str, args.sample)),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode or not lines:
        raise RuntimeError(f"worker failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    out = json.loads(lines[-1][len(RESULT_PREFIX) :])
    if source is not None and not out["moss_train"].startswith(str(source)):
        raise RuntimeError(f"the worker for {source} imported {out['moss_train']}")
    return {int(batch): value for batch, value in out["result"].items()}


# ----------------------------------------------------------------------------- the parent
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="tiny,small", help=f"model= recipes, each with vocabulary {VOCAB}")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="worker runs per moss-train version, alternating")
    p.add_argument("--repeats", type=int, default=4, help="interleaved timed pairs per batch size in each worker run")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides (1: steadier on a shared CPU)")
    p.add_argument(
        "--sample",
        type=sample_setting,
        default=(0.0, 1.0),
        help="T,P: temperature and top_p on both sides (0,1: greedy)",
    )
    p.add_argument("--trained", help="a trained moss-export to decode instead of --models' random weights")
    p.add_argument("--ours-at", default="", help="comma-separated git revisions: moss-train as of each, as extra rows")
    p.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--export", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        return run_worker(args)
    load_before = load_line()
    rows = []
    with tempfile.TemporaryDirectory(prefix="generate-speed-") as tmp:
        # "this tree": the moss_train this script runs with; each revision: its own copy.
        versions = {"this tree": None} | {
            rev: checkout(rev, Path(tmp) / "src") for rev in args.ours_at.split(",") if rev
        }
        greedy = args.sample[0] <= 0
        for name in [Path(args.trained).name] if args.trained else args.models.split(","):
            export = Path(args.trained) if args.trained else Path(tmp) / name
            params = trained_parameters(export) if args.trained else write_export(name, export)
            runs = {version: [] for version in versions}
            for round_index in range(args.rounds):
                for version in list(versions) if round_index % 2 == 0 else list(versions)[::-1]:
                    runs[version].append(spawn(versions[version], export, args))
            reference = runs["this tree"][0]
            for batch in [int(b) for b in args.batches.split(",")]:
                for version, worker_runs in runs.items():
                    row = summarise(
                        name,
                        params,
                        batch,
                        version,
                        [run[batch] for run in worker_runs],
                        reference[batch]["tokens"][HF if greedy else OURS],
                        sides=(HF, OURS) if greedy else (OURS,),
                    )
                    rows.append(row)
                    print(
                        f"{name} batch {batch} {version}: {row['ours']:.0f} vs {row['hf']:.0f} tok/s, "
                        f"{row['ratio']:.2f}x ({row['cpu_ratio']:.2f}x by CPU time), "
                        f"tokens identical: {row['identical']}",
                        flush=True,
                    )
    publish(render(rows, args, load_before), args.write)
    return 0 if all(row["identical"] for row in rows) else 1


def summarise(name, params, batch, version, runs: list[dict], reference_tokens, sides=(HF, OURS)) -> dict:
    """Medians over every timed run; the ratios: the medians of each interleaved pair's ratio,
    by wall time and by the process's CPU time (one thread: the time it ran, not the time other
    processes on a shared CPU took from it). `sides`' tokens must equal `reference_tokens`."""

    def pooled(key, side):
        return [r for run in runs for r in run[key][side]]

    def paired(key):
        return statistics.median(o / h for o, h in zip(pooled(key, OURS), pooled(key, HF)))

    identical = all(run["tokens"][side] == reference_tokens for run in runs for side in sides)
    return dict(
        name=name,
        params=params,
        batch=batch,
        version=version,
        ours=statistics.median(pooled("rates", OURS)),
        hf=statistics.median(pooled("rates", HF)),
        ratio=paired("rates"),
        cpu_ratio=paired("cpu_rates"),
        identical=identical,
    )


def render(rows, args, load_before: str) -> list[str]:
    temperature, top_p = args.sample
    decoding = "greedy" if temperature <= 0 else f"sampled (temperature {temperature}, top_p {top_p}, top_k off)"
    weights = f"trained weights of {args.trained}" if args.trained else "random weights"
    identical = "" if temperature <= 0 else "; tokens identical: moss-train's, to this tree's (same seed)"
    lines = [
        f"### generate_speed — moss-train generate_batch vs transformers generate, {decoding}, "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens per row, fp32, {args.threads} thread(s)",
        "",
        run_line(None, load_before) + f"; {cpu_line()}; {weights}, vocabulary {VOCAB}; {args.rounds} worker runs per "
        f"moss-train version x {args.repeats} interleaved pairs; tok/s: medians, ratio: median of the pairs' ratios"
        + identical,
        "",
        "| model | parameters | batch | moss-train version | "
        f"{OURS} tok/s | {HF} tok/s | {OURS} / {HF} | same, by CPU time | tokens identical |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['version']} | "
            f"{r['ours']:.0f} | {r['hf']:.0f} | "
            f"{r['ratio']:.2f}x | {r['cpu_ratio']:.2f}x | {'yes' if r['identical'] else 'NO'} |"
        )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
