"""What ``moss-data sft`` and ``moss-data pairs`` share: records in, mask-carrying shards out.

:func:`render_records` drives a run: it reads every record of the inputs, splits train/valid by
content hash, parses each record with the caller's `parse` (a :class:`RecordError` is a counted
reject), renders the parsed records in chunks with the caller's `render_chunk` into a
:class:`ShardOutputs` subclass, and on success installs the shard directory as a whole, then
``rejects.jsonl`` and ``summary.json``. On any failure the shards being written and the
temporary files are removed and the earlier run's outputs are left as they were; a run killed
outright leaves them behind, and the next run starts by clearing them.

Inputs are named as for ``moss-data tokenize`` and resolved by the same code
(:mod:`data_pipelines.ingest`): files, folders, globs, compressed with .gz / .bz2 / .xz / .zst.
Records are the lines of jsonl files or the elements of json arrays. A line that is not UTF-8
(``undecodable_utf8``), not JSON (``invalid_json``) or larger than the reader's limit
(``record_too_large``) is a counted reject naming its file and line, never the end of the run.
An input without any record is reported as a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from data_pipelines.ingest import Bad, InputError, InputUnit, UnitReader, expand_inputs
from moss_train.data.parsing import RecordError
from moss_train.data.shards import ShardWriter, dtype_for_vocab
from moss_train.tokenizer import load_tokenizer

INVALID_JSON = "invalid_json"
UNDECODABLE_UTF8 = "undecodable_utf8"  # the name moss-data tokenize gives it
RECORD_FORMATS = ("jsonl", "json")  # a record is a whole JSON value
MAX_REJECT_RECORD_CHARS = 2000
log = logging.getLogger("moss-data")


class ParsedRecord(NamedTuple):
    where: tuple[str, str, int]  # (file, "line" (jsonl) or "record" (json array), its number from 1)
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
        self.empty_inputs: list[str] = []  # input files that held no record

    def reject(self, where: tuple[str, str, int], reason: str, detail: str, raw: str) -> None:
        self.rejected[reason] += 1
        file, unit, number = where
        record = {
            "file": file,
            unit: number,
            "reason": reason,
            "detail": detail,
            "record": raw[:MAX_REJECT_RECORD_CHARS],
        }
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
    units = [(unit, None) for unit in record_units(source.inputs)] + [
        (unit, "valid") for unit in record_units(source.valid_inputs)
    ]
    tokenizer = load_tokenizer(tokenizer_dir)  # a MOSS or any HF tokenizer directory
    tmp_dir = out / "shards.tmp"
    rejects_path = out / "rejects.jsonl"
    rejects_tmp = rejects_path.with_name(rejects_path.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)  # what a killed run left
    tmp_dir.mkdir(parents=True)
    try:
        with open(rejects_tmp, "w", encoding="utf-8") as rejects_file:
            outputs = make_outputs(tmp_dir, tokenizer, provenance, rejects_file)
            try:
                _render_all(_records(units, source, outputs), outputs, parse, render_chunk, chunk_size)
                shards = outputs.close()
            except BaseException:
                outputs.abort()
                raise
        install(tmp_dir, out / "shards")
        rejects_tmp.replace(rejects_path)
    finally:  # after a failure: no temporary file stays behind
        shutil.rmtree(tmp_dir, ignore_errors=True)
        rejects_tmp.unlink(missing_ok=True)
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
        "empty_inputs": outputs.empty_inputs,
        "rejects_file": str(rejects_path),
        "tokenizer_hash": outputs.tokenizer.hash,
        "seconds": round(time.time() - started, 2),
    }


def record_units(specs: Sequence[str | Path]) -> list[InputUnit]:
    """The jsonl / json files that `specs` name (files, folders, globs; see ingest.expand_inputs)."""
    if not specs:
        return []
    expanded = expand_inputs([str(spec) for spec in specs])
    for path in expanded.ignored_files:
        log.warning("warning: ignoring %s (not jsonl or json)", path)
    for unit in expanded.units:
        if unit.fmt not in RECORD_FORMATS:
            raise InputError(
                f"{unit.label()}: records are read from jsonl or json files (compressed or not), not {unit.fmt}"
            )
    return expanded.units


def _records(
    units: Sequence[tuple[InputUnit, str | None]], source: RecordSource, outputs: ShardOutputs
) -> Iterator[tuple]:
    """(where, split, raw text, parsed JSON) for every record; what cannot be read or parsed is
    rejected here. Blank lines are not records."""
    for unit, fixed_split in units:
        counted = outputs.records_in
        for where, item in _unit_items(unit):
            if isinstance(item, bytes) and not item.strip():
                continue
            outputs.records_in += 1
            if isinstance(item, Bad):
                outputs.reject(where, item.reason, item.snippet[:200], item.snippet)
                continue
            raw, record = _decoded(item, where, outputs)
            if raw is None:
                continue
            split = fixed_split or ("valid" if held_out(raw, source.seed, source.valid_fraction) else "train")
            yield where, split, raw, record
        if outputs.records_in == counted:
            outputs.empty_inputs.append(unit.path)
            log.warning("warning: %s holds no records", unit.path)


def _unit_items(unit: InputUnit) -> Iterator[tuple[tuple[str, str, int], Any]]:
    """((file, "line" or "record", number), item) for each item ingest's reader yields."""
    reader = UnitReader(unit, 0, text_field="text")  # the text field is not used: whole records
    key = "line" if unit.fmt == "jsonl" else "record"
    for batch in reader.batches():
        for i, item in enumerate(batch.items):
            yield (unit.path, key, batch.start + i + 1), item


def _decoded(item, where, outputs: ShardOutputs) -> tuple[str | None, Any]:
    """(raw text, JSON value) of a jsonl line (bytes) or a json array element; (None, None)
    after rejecting a line that is not UTF-8 or not JSON."""
    if not isinstance(item, bytes):
        return json.dumps(item, ensure_ascii=False), item
    try:
        line = item.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        outputs.reject(
            where,
            UNDECODABLE_UTF8,
            f"{error.reason} at byte {error.start}",
            item.decode("utf-8", "replace").rstrip("\r\n"),
        )
        return None, None
    try:
        return line, json.loads(line)
    except ValueError as error:
        outputs.reject(where, INVALID_JSON, str(error), line)
        return None, None


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
