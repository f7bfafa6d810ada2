"""Tokenize jsonl documents into one token shard (see :mod:`moss_train.data.shards`).

Documents are streamed in batches (memory holds a bounded number of batches), encoded in worker
processes, and written in input order, so the shard is byte-identical for any number of workers.
``</s>`` is appended after every document. Records that cannot be used (invalid JSON, not an
object, no text field, text not a string, empty text) are never fatal and never silent: each is
counted by reason and written to ``{out_prefix}.rejects.jsonl``;
``records_in == docs_written + rejected``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from moss_train.data.shards import ShardWriter, dtype_for_vocab
from moss_train.tokenizer import MossTokenizer

log = logging.getLogger(__name__)

DEFAULT_BATCH_DOCS = 256
DEFAULT_BATCH_BYTES = 1 << 20
MAX_REJECT_RECORD_CHARS = 2000

_worker_tok: MossTokenizer | None = None


def _worker_init(tokenizer_dir: str) -> None:
    global _worker_tok
    _worker_tok = MossTokenizer.load(tokenizer_dir)


def _worker_encode(texts: list[str]) -> list[list[int]]:
    return _worker_tok.encode_batch(texts, num_threads=1)


def _reject_reason(line: str, text_field: str) -> tuple[str | None, str | None]:
    """(text, None) for a usable record, else (None, reason)."""
    if not line.strip():
        return None, "blank_line"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None, "invalid_json"
    if not isinstance(rec, dict):
        return None, "not_an_object"
    if text_field not in rec:
        return None, "missing_text_field"
    text = rec[text_field]
    if not isinstance(text, str):
        return None, "text_not_a_string"
    if not text:
        return None, "empty_text"
    return text, None


class _Reader:
    """Streams usable texts in batches; writes rejects as it meets them; hashes its inputs."""

    def __init__(self, paths: Sequence[Path], text_field: str, rejects_file, batch_docs: int, batch_bytes: int):
        self.paths = paths
        self.text_field = text_field
        self.rejects_file = rejects_file
        self.batch_docs = batch_docs
        self.batch_bytes = batch_bytes
        self.records_in = 0
        self.rejected: collections.Counter = collections.Counter()
        self.inputs: list[dict] = []

    def batches(self) -> Iterator[tuple[list[str], int]]:
        """Yields (texts, input bytes read for them, rejects included)."""
        batch: list[str] = []
        size = 0
        for path in self.paths:
            h = hashlib.sha256()
            nbytes = 0
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    h.update(raw)
                    nbytes += len(raw)
                    size += len(raw)
                    self.records_in += 1
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        text, reason = None, "undecodable_utf8"
                        line = raw.decode("utf-8", errors="replace")
                    else:
                        text, reason = _reject_reason(line, self.text_field)
                    if reason is not None:
                        self.rejected[reason] += 1
                        rec = {"file": str(path), "line": lineno, "reason": reason, "record": line.rstrip("\n")[:MAX_REJECT_RECORD_CHARS]}
                        self.rejects_file.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        continue
                    batch.append(text)
                    if len(batch) >= self.batch_docs or size >= self.batch_bytes:
                        yield batch, size
                        batch, size = [], 0
            self.inputs.append({"path": str(path), "bytes": nbytes, "sha256": h.hexdigest()})
        if batch or size:
            yield batch, size


def tokenize_jsonl(
    jsonl_paths: Sequence[str | os.PathLike] | str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    out_prefix: str | os.PathLike,
    text_field: str = "text",
    num_workers: int = 2,
    append_eos: bool = True,
    source: str | None = None,
    provenance: Mapping | None = None,
    batch_docs: int = DEFAULT_BATCH_DOCS,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    progress: bool = False,
) -> dict:
    """Tokenize `jsonl_paths` (in order) into the shard `out_prefix`; return a summary.

    `source` (the shard's source name) defaults to the first file's name up to its first dot
    (``en.train.jsonl`` -> ``en``). `provenance` is merged into the shard manifest's provenance.
    With ``num_workers <= 1`` everything runs in this process.
    """
    if isinstance(jsonl_paths, (str, os.PathLike)):
        jsonl_paths = [jsonl_paths]
    paths = [Path(p) for p in jsonl_paths]
    if not paths:
        raise ValueError("no input files given")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: input file not found")
    t0 = time.time()
    tok = MossTokenizer.load(tokenizer_dir)
    source = source or paths[0].name.split(".")[0]
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    rejects_path = Path(f"{out_prefix}.rejects.jsonl")
    rejects_tmp = rejects_path.with_name(rejects_path.name + ".tmp")
    eos = [tok.eos_id] if append_eos else []
    total_bytes = sum(p.stat().st_size for p in paths)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenize {source}", leave=False, disable=None)

    writer = ShardWriter(out_prefix, dtype_for_vocab(tok.vocab_size), tok.hash, source)
    pool = None
    try:
        with open(rejects_tmp, "w", encoding="utf-8") as rejects_file, writer:
            reader = _Reader(paths, text_field, rejects_file, batch_docs, batch_bytes)

            def write(batch_ids: list[list[int]], batch_texts_bytes: int) -> None:
                for ids in batch_ids:
                    writer.add_document(ids + eos)
                if bar is not None:
                    bar.update(batch_texts_bytes)

            if num_workers <= 1:
                for texts, nbytes in reader.batches():
                    write(tok.encode_batch(texts, num_threads=1) if texts else [], nbytes)
            else:
                # Bounded window of in-flight batches, results taken in submission order:
                # deterministic output, memory independent of the corpus size.
                ctx = mp.get_context("spawn")
                pool = ctx.Pool(num_workers, initializer=_worker_init, initargs=(str(tokenizer_dir),))
                window: collections.deque = collections.deque()
                for texts, nbytes in reader.batches():
                    window.append((pool.apply_async(_worker_encode, (texts,)), nbytes))
                    if len(window) >= 4 * num_workers:
                        res, nb = window.popleft()
                        write(res.get(), nb)
                while window:
                    res, nb = window.popleft()
                    write(res.get(), nb)
            writer.provenance = {
                "inputs": reader.inputs,
                "text_field": text_field,
                "append_eos": append_eos,
                "tokenizer_dir": str(tokenizer_dir),
                "vocab_size": tok.vocab_size,
                "records_in": reader.records_in,
                "rejected": dict(sorted(reader.rejected.items())),
                "rejects_file": rejects_path.name,
                **dict(provenance or {}),
            }
        os.replace(rejects_tmp, rejects_path)
    except BaseException:
        rejects_tmp.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()

    n_rejected = sum(reader.rejected.values())
    assert reader.records_in == writer.n_docs + n_rejected, "record accounting is broken"
    seconds = time.time() - t0
    summary = {
        "out_prefix": str(out_prefix),
        "source": source,
        "records_in": reader.records_in,
        "docs_written": writer.n_docs,
        "rejected": n_rejected,
        "rejected_by_reason": dict(sorted(reader.rejected.items())),
        "rejects_file": str(rejects_path),
        "n_tokens": writer.n_tokens,
        "input_bytes": total_bytes,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(writer.n_tokens / max(seconds, 1e-9)),
    }
    log.info(
        "tokenized %s: %d records -> %d docs, %d tokens, %d rejected %s (%.1fs)",
        source, summary["records_in"], summary["docs_written"], summary["n_tokens"], n_rejected,
        summary["rejected_by_reason"] or "", seconds,
    )
    if n_rejected:
        log.warning("%d records rejected, see %s", n_rejected, rejects_path)
    return summary
