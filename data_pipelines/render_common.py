"""What ``moss-data sft`` and ``moss-data pairs`` share: jsonl records in, mask-carrying shards out.

:func:`render_records` drives a run: it reads every non-blank line of the inputs (bad JSON is
rejected), splits train/valid by content hash, parses each record with the caller's `parse`
(a :class:`RecordError` is a counted reject), renders the parsed records in chunks with the
caller's `render_chunk` into a :class:`ShardOutputs` subclass, and on success installs the shard
directory as a whole, then ``rejects.jsonl`` and ``summary.json``. On any failure the shards
being written are aborted and the earlier run's outputs are left as they were.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from moss_train.data.sft import RecordError
from moss_train.data.shards import ShardWriter, dtype_for_vocab
from moss_train.tokenizer import load_tokenizer

INVALID_JSON = "invalid_json"
MAX_REJECT_RECORD_CHARS = 2000


class ParsedRecord(NamedTuple):
    where: tuple[str, int]  # (file, line number)
    split: str  # "train" or "valid"
    raw: str  # the line as read, for the rejects file
    parsed: Any  # what the caller's parse returned


class ShardOutputs:
    """Shard writers filled in a temporary directory, the rejects file, and the accounting.
    Subclasses set ``written_key`` and add ``write`` (their records into :meth:`writer`),
    ``close`` (-> the summary's ``shards``), ``count_written`` and, where they keep more counts,
    ``extra_counts`` (summary entries after ``rejected_by_reason``)."""

    written_key: str  # the summary's name for the number of records written (set by subclasses)

    def __init__(self, tmp_dir: Path, tokenizer, provenance: dict, rejects_file):
        self.tmp_dir = tmp_dir
        self.tokenizer = tokenizer
        self.provenance = provenance
        self.rejects_file = rejects_file
        self.writers: dict[Hashable, ShardWriter] = {}
        self.records_in = 0
        self.rejected: Counter = Counter()

    def reject(self, where: tuple[str, int], reason: str, detail: str, raw: str) -> None:
        self.rejected[reason] += 1
        record = {"file": where[0], "line": where[1], "reason": reason, "detail": detail, "record": raw[:MAX_REJECT_RECORD_CHARS]}
        self.rejects_file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def writer(self, key: Hashable, name: str, source: str) -> ShardWriter:
        """The writer of shard `name` under `key`, opened on first use."""
        if key not in self.writers:
            self.writers[key] = ShardWriter(
                self.tmp_dir / name,
                dtype_for_vocab(self.tokenizer.vocab_size),
                self.tokenizer.hash,
                source=source,
                provenance=self.provenance,
                with_mask=True,
            )
        return self.writers[key]

    def close(self) -> dict:
        raise NotImplementedError

    def count_written(self, shards: dict) -> int:
        raise NotImplementedError

    def extra_counts(self) -> dict:
        return {}

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


class RecordSource(NamedTuple):
    """The jsonl files to read, and how records of `inputs` are held out for the valid split."""

    inputs: Sequence[str | Path]
    valid_inputs: Sequence[str | Path] = ()
    valid_fraction: float = 0.0
    seed: int = 0


def render_records(
    source: RecordSource,
    tokenizer_dir: str | Path,
    out: str | Path,
    *,
    provenance: dict,
    make_outputs: Callable[..., ShardOutputs],
    parse: Callable[[dict], Any],
    render_chunk: Callable[[list[ParsedRecord], ShardOutputs], None],
    chunk_size: int,
) -> dict:
    """Render the records of `source` into ``out/shards`` (via `make_outputs`); the summary."""
    if not 0.0 <= source.valid_fraction < 1.0:
        raise ValueError(f"--valid-fraction must be in [0, 1), got {source.valid_fraction}")
    started, out = time.time(), Path(out)
    tokenizer = load_tokenizer(tokenizer_dir)  # a MOSS or any HF tokenizer directory
    tmp_dir = out / "shards.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    rejects_path = out / "rejects.jsonl"
    rejects_tmp = rejects_path.with_name(rejects_path.name + ".tmp")
    with open(rejects_tmp, "w", encoding="utf-8") as rejects_file:
        outputs = make_outputs(tmp_dir, tokenizer, provenance, rejects_file)
        try:
            _render_all(_records(source, outputs), outputs, parse, render_chunk, chunk_size)
            shards = outputs.close()
        except BaseException:
            outputs.abort()
            raise
    install(tmp_dir, out / "shards")
    rejects_tmp.replace(rejects_path)
    summary = _summary(out, outputs, shards, rejects_path, started)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return summary


def _render_all(records: Iterator[tuple], outputs: ShardOutputs, parse, render_chunk, chunk_size: int) -> None:
    """Parse each record (a RecordError is a counted reject) and render them `chunk_size` at a time."""
    pending: list[ParsedRecord] = []
    for where, split, raw, record in records:
        try:
            pending.append(ParsedRecord(where, split, raw, parse(record)))
        except RecordError as error:
            outputs.reject(where, error.reason, error.detail, raw)
        if len(pending) >= chunk_size:
            render_chunk(pending, outputs)
            pending = []
    render_chunk(pending, outputs)


def _summary(out: Path, outputs: ShardOutputs, shards: dict, rejects_path: Path, started: float) -> dict:
    written = outputs.count_written(shards)
    n_rejected = sum(outputs.rejected.values())
    assert outputs.records_in == written + n_rejected, "record accounting is broken"
    return {
        "out": str(out),
        "records_in": outputs.records_in,
        outputs.written_key: written,
        "rejected": n_rejected,
        "rejected_by_reason": dict(sorted(outputs.rejected.items())),
        **outputs.extra_counts(),
        "shards": shards,
        "rejects_file": str(rejects_path),
        "tokenizer_hash": outputs.tokenizer.hash,
        "seconds": round(time.time() - started, 2),
    }


def _records(source: RecordSource, outputs: ShardOutputs) -> Iterator[tuple]:
    """(where, split, raw line, parsed JSON) for every non-blank line; bad JSON is rejected here."""
    files = [(Path(p), None) for p in source.inputs] + [(Path(p), "valid") for p in source.valid_inputs]
    for path, fixed_split in files:
        with open(path, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                outputs.records_in += 1
                where = (str(path), lineno)
                try:
                    record = json.loads(line)
                except ValueError as error:
                    outputs.reject(where, INVALID_JSON, str(error), line.rstrip("\n"))
                    continue
                split = fixed_split or ("valid" if held_out(line, source.seed, source.valid_fraction) else "train")
                yield where, split, line.rstrip("\n"), record


def held_out(line: str, seed: int, fraction: float) -> bool:
    """A deterministic split by content: the same record always lands in the same split."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}\0{line.strip()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def install(new: Path, final: Path) -> None:
    """Replace the shard directory as a whole (old one moved aside first, then removed)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)
