"""Train the MOSS sentencepiece tokenizer on a byte-weighted mix of jsonl corpora.

The trainer settings make the tokenizer exact and reversible on code and CJK (see
:mod:`moss_train.tokenizer`): BPE, byte fallback, digits split, whitespace kept as is
(whitespace-only pieces allowed, so indentation becomes a few tokens), identity normalisation,
no dummy prefix, ``<unk> <s> </s> <pad>`` at ids 0..3, then the MOSS turn tokens and ``"\\n"``
as user-defined pieces (one id each; a space inside a special token is stored as "▁", which is
how sentencepiece sees it in the text).

Training text goes in through ``sentence_iterator`` (input files would be split at every
newline), as documents cut into line-aligned chunks of at most ``TRAIN_CHUNK_CHARS``; ``"\\n"``,
a user-defined piece, is always exactly one token and never merges with its neighbours. With a
vocabulary too small for every character the coverage asks for (CJK), the rarest characters are
kept out of training and encode with byte fallback (see :func:`rare_characters`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm

from data_pipelines.ingest import expand_inputs, iter_texts
from moss_train.tokenizer import (
    BOS,
    BOS_ID,
    EOS,
    EOS_ID,
    HF_CONFIG_FILE,
    HF_SPECIAL_TOKENS_FILE,
    HF_TOKENIZER_FILE,
    META_FILE,
    META_FORMAT,
    META_VERSION,
    MODEL_FILE,
    MOSS_SPECIAL_TOKENS,
    NEWLINE,
    PAD,
    PAD_ID,
    UNK,
    UNK_ID,
    VOCAB_FILE,
    MossTokenizer,
    TokenizerError,
    sp_piece,
)

log = logging.getLogger(__name__)

# Longest chunk (characters) of a document fed to the trainer as one "sentence". Documents are
# cut at line boundaries into chunks of at most this many characters (a single longer line is
# cut hard); sentencepiece's max_sentence_length (bytes, UTF-8 <= 4 per char) is above it.
TRAIN_CHUNK_CHARS = 4096
MAX_SENTENCE_BYTES = 1 << 16
DEFAULT_WEIGHTS = {"en": 360.0, "zh": 100.0, "code": 220.0}  # DESIGN.md blend
DEFAULT_SAMPLE_BYTES = 6 * 1024 * 1024


def _chunk_document(text: str, max_chars: int = TRAIN_CHUNK_CHARS) -> Iterator[str]:
    """Cut a document into line-aligned chunks of at most `max_chars` characters."""
    if len(text) <= max_chars:
        yield text
        return
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:  # one very long line: cut hard
            if buf:
                yield "".join(buf)
                buf, size = [], 0
            yield line[:max_chars]
            line = line[max_chars:]
        if size + len(line) > max_chars and buf:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += len(line)
    if buf:
        yield "".join(buf)


def sample_documents(
    sources: Mapping[str, Sequence[str | os.PathLike]],
    weights: Mapping[str, float],
    sample_bytes: int,
    seed: int = 0,
    text_field: str | Mapping[str, str] = "text",
) -> tuple[list[str], dict]:
    """Draw documents from each source so that bytes follow `weights`; deterministic from seed.

    `sources` maps a name to input specs (files, folders, globs, ``hf:`` datasets; any format
    :mod:`data_pipelines.ingest` reads); `text_field` is one field name or one per source.
    Each source gets ``sample_bytes * w / sum(w)`` bytes (UTF-8). Documents are kept with a
    probability estimated from the inputs' sizes (on disk: compressed inputs are sampled more
    densely from their start), in input order, until the source's share is filled (memory
    holds only the sample). A source smaller than its share is taken whole and reported as
    exhausted. Returns (documents, stats).
    """
    unknown = sorted(set(weights) - set(sources))
    if unknown:
        raise ValueError(f"weights name sources that have no files: {unknown} (sources: {sorted(sources)})")
    active = {k: float(w) for k, w in weights.items() if float(w) > 0}
    if not active:
        raise ValueError("all tokenizer sample weights are zero")
    total_w = sum(active.values())
    docs: list[str] = []
    stats: dict[str, dict] = {}
    for name in sorted(active):
        target = int(sample_bytes * active[name] / total_w)
        paths = [str(p) for p in sources[name]]
        field = text_field if isinstance(text_field, str) else text_field.get(name, "text")
        file_bytes = sum(u.size for u in expand_inputs(paths).units)  # raises InputError naming a bad spec
        keep_p = 1.0 if file_bytes <= target else min(1.0, 1.15 * target / max(file_bytes, 1))
        rng = random.Random(f"{seed}:{name}")
        got = n = 0
        for text in iter_texts(paths, field):
            if got >= target:
                break
            if keep_p < 1.0 and rng.random() >= keep_p:
                continue
            docs.append(text)
            got += len(text.encode("utf-8"))
            n += 1
        stats[name] = {
            "weight": active[name],
            "target_bytes": target,
            "sampled_bytes": got,
            "sampled_docs": n,
            "exhausted": got < target,
            "files": paths,
        }
        if got < target:
            log.warning("tokenizer sample: source %r has only %d of its %d bytes", name, got, target)
    rng = random.Random(seed)
    rng.shuffle(docs)
    return docs, stats


def rare_characters(docs: Sequence[str], coverage: float, vocab_size: int, n_reserved: int) -> str:
    """Characters to keep out of training so that the single-character pieces fit the vocab.

    sentencepiece makes every character within `coverage` of the sample a piece of its own and
    fails when they do not fit the vocabulary (it also refuses a coverage below 0.98). With a
    small vocabulary and CJK text (thousands of distinct characters) they don't. Characters may
    take at most half of the room left after the `n_reserved` fixed pieces; when `coverage`
    needs more, the rarest characters are returned (the trainer then never sees them, and they
    are encoded with byte fallback). Returns "" when nothing needs to be left out.
    """
    counts: Counter = Counter()
    for d in docs:
        counts.update(d)
    for ws in (" ", "\n"):  # a space is "▁" (one character either way); "\n" is a symbol
        counts.pop(ws, None)
    allowed = max(1, (vocab_size - n_reserved) // 2)
    if len(counts) <= allowed:
        return ""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    total = sum(counts.values())
    covered = 0
    for n_needed, (_, c) in enumerate(ranked, 1):  # noqa: B007 (read after the loop)
        covered += c
        if covered / total >= coverage:
            break
    if n_needed <= allowed:
        return ""
    return "".join(ch for ch, _ in ranked[allowed:])


def _canonical_model(proto: bytes) -> bytes:
    """The model with machine-dependent trainer settings (thread count) reset.

    The trainer records its ``num_threads`` in the model; the vocabulary does not depend on it,
    but the tokenizer hash (sha256 of the file) would, and then differ between machines.
    """
    if not _protobuf_available():
        return proto
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    model.trainer_spec.ClearField("num_threads")
    return model.SerializeToString(deterministic=True)


def _protobuf_available() -> bool:
    try:
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401  (needs protobuf)
    except ImportError:
        return False
    return True


def train_tokenizer(
    sources: Mapping[str, Sequence[str | os.PathLike]],
    weights: Mapping[str, float],
    vocab_size: int,
    out_dir: str | os.PathLike,
    sample_bytes: int = DEFAULT_SAMPLE_BYTES,
    seed: int = 0,
    text_field: str | Mapping[str, str] = "text",
    character_coverage: float = 0.9995,
    num_threads: int | None = None,
    extra_meta: Mapping | None = None,
) -> MossTokenizer:
    """Train a sentencepiece BPE tokenizer on a byte-weighted mix of jsonl sources.

    Deterministic: the same sources, weights, settings and seed give a byte-identical
    ``tokenizer.model`` (hence the same tokenizer hash) on any machine and thread count.

    `sources` maps a source name to its input specs (see :func:`sample_documents`), `weights`
    maps source names to relative byte shares of the training sample. Writes
    ``out_dir/tokenizer.model``, ``tokenizer.vocab``, the Hugging Face files (``tokenizer.json``,
    ``tokenizer_config.json``, ``special_tokens_map.json``: ``AutoTokenizer`` loads the directory)
    and ``tokenizer_meta.json`` (the meta last, atomically; an existing tokenizer in `out_dir` is
    replaced) and returns the loaded tokenizer.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    docs, sample_stats = sample_documents(sources, weights, sample_bytes, seed, text_field)
    if not docs:
        raise ValueError("no documents to train the tokenizer on (are the source files empty?)")
    user_symbols = [*(sp_piece(t) for t in MOSS_SPECIAL_TOKENS), NEWLINE]
    n_reserved = 4 + len(user_symbols) + 256  # meta pieces, user symbols, byte-fallback pieces
    if vocab_size <= n_reserved + 16:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: {n_reserved} ids are reserved (specials and 256 bytes)"
        )
    rare = rare_characters(docs, float(character_coverage), int(vocab_size), n_reserved)
    split_rare = re.compile("[" + re.escape(rare) + "]+") if rare else None
    if rare:
        log.warning(
            "tokenizer: %d rare characters left out of training so that single characters fit a "
            "vocabulary of %d (they encode with byte fallback; raise vocab_size to keep them)",
            len(rare),
            vocab_size,
        )
    n_chunks = 0

    def sentences() -> Iterator[str]:
        nonlocal n_chunks
        for doc in docs:
            for chunk in _chunk_document(doc):
                for part in split_rare.split(chunk) if split_rare else (chunk,):
                    if part:
                        n_chunks += 1
                        yield part

    trainer_args = dict(
        model_type="bpe",
        vocab_size=int(vocab_size),
        byte_fallback=True,
        split_digits=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        character_coverage=float(character_coverage),
        normalization_rule_name="identity",
        max_sentence_length=MAX_SENTENCE_BYTES,
        input_sentence_size=0,  # we sampled already: use every sentence given
        shuffle_input_sentence=False,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        pad_piece=PAD,
        user_defined_symbols=user_symbols,
        # Without protobuf the thread count cannot be reset in the model (see _canonical_model):
        # train single-threaded then, so the hash stays machine-independent.
        num_threads=int(num_threads or os.cpu_count() or 1) if _protobuf_available() else 1,
        seed_sentencepiece_size=1_000_000,
        minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=out_dir))
    try:
        # model_writer, not model_prefix: the trainer records model_prefix (a temp path) in the
        # model proto, which would make the tokenizer hash differ between identical runs.
        model_bytes = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=model_bytes, **trainer_args)
        except RuntimeError as e:
            raise TokenizerError(f"sentencepiece training failed (vocab_size {vocab_size}): {e}") from e
        model_path = tmp / MODEL_FILE
        model_path.write_bytes(_canonical_model(model_bytes.getvalue()))
        tok = MossTokenizer(model_path)
        with open(tmp / VOCAB_FILE, "w", encoding="utf-8") as f:  # for people: piece<TAB>score
            for i in range(tok.vocab_size):
                piece = tok.sp.id_to_piece(i).replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
                f.write(f"{piece}\t{tok.sp.get_score(i):g}\n")
        meta = {
            "format": META_FORMAT,
            "format_version": META_VERSION,
            "hash": tok.hash,
            "vocab_size": tok.vocab_size,
            "special_ids": tok.special_ids,
            "newline_id": tok.token_to_id(NEWLINE),
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "bos_id": tok.bos_id,
            "unk_id": tok.unk_id,
            "training": {
                "seed": seed,
                "sample_bytes": int(sample_bytes),
                "rare_characters_left_out": len(rare),
                "weights": {k: float(v) for k, v in weights.items()},
                "sources": sample_stats,
                "documents": len(docs),
                "sentences": n_chunks,
                "chunk_chars": TRAIN_CHUNK_CHARS,
                "sentencepiece_version": spm.__version__,
                "trainer_args": {k: v for k, v in trainer_args.items() if k != "num_threads"},
                "seconds": round(time.time() - t0, 2),
            },
        }
        if extra_meta:
            meta["provenance"] = dict(extra_meta)
        tok.save_pretrained(tmp)  # tokenizer.json & co. next to the model (tok.model_path is in tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        # Install: remove the old meta first (a model without meta is visibly incomplete), then
        # model, vocab and HF files, then the meta that vouches for them.
        (out_dir / META_FILE).unlink(missing_ok=True)
        for name in (MODEL_FILE, VOCAB_FILE, HF_TOKENIZER_FILE, HF_CONFIG_FILE, HF_SPECIAL_TOKENS_FILE, META_FILE):
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tok = MossTokenizer.load(out_dir)
    log.info("trained tokenizer: vocab %d, hash %s, %.1fs", tok.vocab_size, tok.hash[:12], time.time() - t0)
    return tok


def corpus_sources(corpus_dir: str | os.PathLike, split: str = "train") -> dict[str, list[str]]:
    """``{source: [jsonl path]}`` for every ``{source}.{split}.jsonl`` in a demo corpus dir."""
    corpus_dir = Path(corpus_dir)
    suffix = f".{split}.jsonl"
    return {p.name[: -len(suffix)]: [str(p)] for p in sorted(corpus_dir.glob(f"*{suffix}"))}


def parse_weights(text: str) -> dict[str, float]:
    """``"en=360,zh=100,code=220"`` -> ``{"en": 360.0, ...}``."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"bad weight {part!r}: expected name=number, e.g. en=360,zh=100,code=220")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"bad weight {part!r}: {value!r} is not a number") from None
        if out[name.strip()] < 0:
            raise ValueError(f"bad weight {part!r}: must be >= 0")
    if not out:
        raise ValueError("no weights given")
    return out
