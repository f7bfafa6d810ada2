"""``moss-data tokenize``: raw corpora -> cleaned, de-duplicated token shards of one source.

Output folder (a *token dataset*, what a recipe's source points at)::

    part-00000.bin/.idx/.json    a token shard (moss_train/data/shards.py), one per *part*
    part-00000.rejects.jsonl     every rejected record of the part: where, why, what
    part-00000.hashes.npy        content hashes of the part's kept documents (de-duplication)
    manifest.json                tokenizer hash, settings, counts, checksums of every part
                                 (``manifest.shard-IIIII-of-NNNNN.json`` for one of N nodes;
                                 ``moss-data merge-manifests`` joins them)

Inputs (files, folders, HF datasets; see :mod:`data_pipelines.ingest`) are expanded in a fixed
order and grouped into parts of about ``part_bytes``. Part ``k`` belongs to node ``k %
num_shards``, so ``--num-shards/--shard-index`` splits the work over nodes with no overlap.

The main process reads records in batches and keeps a bounded window of batches in flight in
worker processes (parse, clean, encode), one stream over all the parts it writes (no idle
workers at part boundaries); results are taken in submission order, so the output is
byte-identical for any number of workers. The main process de-duplicates (first copy kept, in
input order) and writes. Memory is bounded by the window, except the de-duplication set: one
Python int per kept document (~70 bytes; 7 GB for 100M documents on one node — spread a larger
source over more shard indices, or ``--no-dedup``).

Resumable: a part is written under temporary names and its shard manifest goes last; a part
whose manifest exists and records the same inputs (path, size, mtime) and settings is skipped
(its content hashes are reloaded for de-duplication), as long as every part before it was
skipped too; the rest is rewritten from the start. A run killed at any point and restarted
therefore produces byte-identical files.

Accounting: every record is kept or rejected with a reason (cleaning rules, malformed input,
``duplicate``): ``records_in == docs + rejected`` per part and in total, checked here.
De-duplication covers the parts one run (one shard index) writes, across its files; the merge
reports how many duplicates remain between shard indices.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_pipelines.clean import Cleaner, CleaningConfig, content_hash
from data_pipelines.ingest import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_MAX_RECORD_BYTES,
    Batch,
    InputUnit,
    UnitReader,
    expand_inputs,
    record_text,
    snippet,
)
from moss_train.data.shards import ShardError, ShardWriter, TokenShard, dtype_for_vocab
from moss_train.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DATASET_FORMAT = "moss-token-dataset"
DATASET_VERSION = 1
DEFAULT_PART_BYTES = 256 << 20
WINDOW_PER_WORKER = 4


@dataclass(frozen=True)
class TokenizeSettings:
    """Everything besides the inputs that decides the output bytes (fingerprinted per part)."""

    source: str
    text_field: str = "text"
    txt_unit: str = "line"
    append_eos: bool = True
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)

    def to_json(self) -> dict:
        return asdict(self)


def part_name(k: int) -> str:
    return f"part-{k:05d}"


def shard_manifest_name(shard_index: int, num_shards: int) -> str:
    return MANIFEST if num_shards == 1 else f"manifest.shard-{shard_index:05d}-of-{num_shards:05d}.json"


def plan_parts(units: Sequence[InputUnit], part_bytes: int) -> list[list[int]]:
    """Consecutive units grouped into parts of about `part_bytes` (a bigger unit is one part)."""
    parts: list[list[int]] = []
    size = 0
    for i, unit in enumerate(units):
        if not parts or (size + unit.size > part_bytes and parts[-1]):
            parts.append([])
            size = 0
        parts[-1].append(i)
        size += unit.size
    return parts


# ====================================================================== workers
@dataclass
class BatchResult:
    reasons: list  # per item: None (a document) or the reject reason
    hashes: np.ndarray  # uint64 per document
    lengths: np.ndarray  # int64 tokens per document (eos included)
    tokens: np.ndarray  # uint32, all documents' tokens
    changed: collections.Counter


class BatchProcessor:
    """Parse, clean and encode one batch (runs in a worker, or inline with one worker)."""

    def __init__(self, tokenizer_dir: str, settings: TokenizeSettings):
        self.tok = load_tokenizer(tokenizer_dir)
        self.cleaner = Cleaner(settings.cleaning)
        self.path = settings.text_field.split(".")
        self.eos = [self.tok.eos_id] if settings.append_eos else []

    def __call__(self, batch: Batch) -> BatchResult:
        reasons, texts, hashes = [], [], []
        changed: collections.Counter = collections.Counter()
        for item in batch.items:
            text, reason = record_text(batch.kind, item, self.path)
            if reason is None:
                text, reason, rules = self.cleaner(text)
                changed.update(rules)
            reasons.append(reason)
            if reason is None:
                texts.append(text)
                hashes.append(content_hash(text))
        ids = self.tok.encode_batch(texts, num_threads=1) if texts else []
        lengths = np.fromiter((len(x) + len(self.eos) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.empty(int(lengths.sum()), dtype=np.uint32)
        pos = 0
        for x in ids:
            flat[pos : pos + len(x)] = x
            pos += len(x)
            if self.eos:
                flat[pos] = self.eos[0]
                pos += 1
        return BatchResult(reasons, np.asarray(hashes, dtype=np.uint64), lengths, flat, changed)


_processor: BatchProcessor | None = None


def _worker_init(tokenizer_dir: str, settings: TokenizeSettings) -> None:
    global _processor
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _processor = BatchProcessor(tokenizer_dir, settings)


def _worker_run(batch: Batch) -> BatchResult:
    return _processor(batch)


class _Encoder:
    """Batches in, results out in submission order, at most `window` batches in flight."""

    def __init__(self, tokenizer_dir: str, settings: TokenizeSettings, workers: int):
        self.workers = workers
        if workers <= 1:
            self.inline = BatchProcessor(tokenizer_dir, settings)
            self.pool = None
        else:
            self.inline = None
            self.pool = mp.get_context("spawn").Pool(workers, _worker_init, (tokenizer_dir, settings))

    def map(self, tagged: Iterator[tuple[int, Batch]]) -> Iterator[tuple[int, Batch, BatchResult]]:
        """(tag, batch) in, (tag, batch, result) out in the same order."""
        if self.pool is None:
            for tag, batch in tagged:
                yield tag, batch, self.inline(batch)
            return
        window: collections.deque = collections.deque()
        for tag, batch in tagged:
            window.append((tag, batch, self.pool.apply_async(_worker_run, (batch,))))
            if len(window) >= WINDOW_PER_WORKER * self.workers:
                tag, done, result = window.popleft()
                yield tag, done, result.get()
        while window:
            tag, done, result = window.popleft()
            yield tag, done, result.get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# ===================================================================== one part
@dataclass
class PartStats:
    records_in: int = 0
    docs: int = 0
    tokens: int = 0
    rejected: collections.Counter = field(default_factory=collections.Counter)
    changed: collections.Counter = field(default_factory=collections.Counter)

    def add(self, other: PartStats) -> None:
        self.records_in += other.records_in
        self.docs += other.docs
        self.tokens += other.tokens
        self.rejected.update(other.rejected)
        self.changed.update(other.changed)

    def to_json(self) -> dict:
        return {
            "records_in": self.records_in,
            "docs": self.docs,
            "tokens": self.tokens,
            "rejected": dict(sorted(self.rejected.items())),
            "cleaning_changed": dict(sorted(self.changed.items())),
        }

    @classmethod
    def from_json(cls, d: dict) -> PartStats:
        return cls(
            d["records_in"],
            d["docs"],
            d["tokens"],
            collections.Counter(d["rejected"]),
            collections.Counter(d["cleaning_changed"]),
        )


def _fingerprint(settings: TokenizeSettings, tokenizer_hash: str, units: Sequence[InputUnit]) -> str:
    key = {"settings": settings.to_json(), "tokenizer": tokenizer_hash, "inputs": [u.identity() for u in units]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _finished_part(prefix: Path, fingerprint: str) -> dict | None:
    """The provenance of a complete part made from these inputs and settings, else None."""
    try:
        shard = TokenShard(prefix)
    except (ShardError, OSError, KeyError, ValueError):
        return None
    prov = shard.manifest.get("provenance", {})
    if prov.get("fingerprint") != fingerprint:
        return None
    hashes = Path(f"{prefix}.hashes.npy")
    if not Path(f"{prefix}.rejects.jsonl").is_file() or not hashes.is_file():
        return None
    return {**prov, "bin_sha256": shard.manifest["bin_sha256"], "idx_sha256": shard.manifest["idx_sha256"]}


def _write_atomic(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return  # unchanged (a re-run that reused every part leaves the folder untouched)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class PartWriter:
    """Tokenize one part's units into its shard, rejects file and hashes file."""

    def __init__(
        self,
        out_dir: Path,
        k: int,
        units: Sequence[InputUnit],
        settings: TokenizeSettings,
        tokenizer,
        fingerprint: str,
        batch_bytes: int,
    ):
        self.prefix = out_dir / part_name(k)
        self.k = k
        self.units = units
        self.settings = settings
        self.tok = tokenizer
        self.fingerprint = fingerprint
        self.stats = PartStats()
        self.readers = [
            UnitReader(u, i, settings.text_field, settings.txt_unit, batch_bytes, settings.max_record_bytes)
            for i, u in enumerate(units)
        ]

    def batches(self) -> Iterator[Batch]:
        """The part's records in batches, then an empty batch that marks the part's end (so a
        part of empty files still gets its, empty, shard)."""
        for reader in self.readers:
            yield from reader.batches()
        yield Batch(0, "values", 0, [], 0)

    def write(self, results: Iterator[tuple[int, Batch, BatchResult]], seen: set, progress=None) -> dict:
        """Write the shard from this part's results (all of them, in order)."""
        readers = self.readers
        rejects_path = Path(f"{self.prefix}.rejects.jsonl")
        rejects_tmp = rejects_path.with_name(rejects_path.name + ".tmp")
        kept_hashes: list[int] = []
        writer = ShardWriter(self.prefix, dtype_for_vocab(self.tok.vocab_size), self.tok.hash, self.settings.source)
        with open(rejects_tmp, "w", encoding="utf-8") as rejects, writer:
            for _, batch, result in results:
                self._take(batch, result, writer, rejects, seen, kept_hashes)
                if progress is not None:
                    progress.update(batch.nbytes)
            inputs = [{**u.identity(), "sha256": r.sha256, "records": r.records} for u, r in zip(self.units, readers)]
            writer.provenance = {
                "part": self.k,
                "fingerprint": self.fingerprint,
                "inputs": inputs,
                **self.stats.to_json(),
                "rejects_file": rejects_path.name,
                "hashes_file": f"{self.prefix.name}.hashes.npy",
            }
            # The rejects and hashes go into place before the shard manifest (written on close),
            # which is what marks the part complete.
            rejects.flush()
            os.replace(rejects_tmp, rejects_path)
            with open(f"{self.prefix}.hashes.npy.tmp", "wb") as f:
                np.save(f, np.asarray(kept_hashes, dtype=np.uint64), allow_pickle=False)
            os.replace(f"{self.prefix}.hashes.npy.tmp", f"{self.prefix}.hashes.npy")
        s = self.stats
        if s.records_in != s.docs + sum(s.rejected.values()):
            raise AssertionError(f"{self.prefix}: record accounting is broken: {s.to_json()}")
        return {
            **writer.provenance,
            "bin_sha256": writer.manifest["bin_sha256"],
            "idx_sha256": writer.manifest["idx_sha256"],
        }

    def _take(
        self, batch: Batch, result: BatchResult, writer: ShardWriter, rejects, seen: set, kept_hashes: list
    ) -> None:
        unit = self.units[batch.unit]
        dedup = self.settings.cleaning.dedup
        line_based = unit.fmt == "jsonl" or (unit.fmt == "txt" and self.settings.txt_unit == "line")
        self.stats.records_in += len(batch.items)
        self.stats.changed.update(result.changed)
        doc = 0
        offset = 0
        for i, reason in enumerate(result.reasons):
            if reason is None:
                h = int(result.hashes[doc])
                n = int(result.lengths[doc])
                ids = result.tokens[offset : offset + n]
                doc += 1
                offset += n
                if dedup and h in seen:
                    reason = "duplicate"
                else:
                    seen.add(h)
                    kept_hashes.append(h)
                    writer.add_document(ids)
                    self.stats.docs += 1
                    self.stats.tokens += n
                    continue
            self.stats.rejected[reason] += 1
            record = {"input": unit.label(), "index": batch.start + i}
            if line_based:
                record["line"] = batch.start + i + 1
            record.update(reason=reason, record=snippet(batch.kind, batch.items[i]))
            rejects.write(json.dumps(record, ensure_ascii=False) + "\n")


# ==================================================================== the run
def tokenize_corpus(
    inputs: Sequence[str],
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: TokenizeSettings,
    workers: int = 2,
    num_shards: int = 1,
    shard_index: int = 0,
    part_bytes: int = DEFAULT_PART_BYTES,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    hf_split: str = "train",
    hf_config: str | None = None,
    progress: bool = False,
) -> dict:
    """Tokenize `inputs` into the token dataset `out_dir` (this node's parts); return a summary."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index must be in [0, {num_shards}), got {shard_index}")
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer_dir)
    expanded = expand_inputs(list(inputs), hf_split, hf_config)
    for path in expanded.ignored_files:
        log.warning("tokenize %s: ignoring %s (not jsonl/json/parquet/txt)", settings.source, path)
    parts = plan_parts(expanded.units, part_bytes)
    mine = [k for k in range(len(parts)) if k % num_shards == shard_index]
    total_bytes = sum(expanded.units[i].size for k in mine for i in parts[k])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=total_bytes, unit="B", unit_scale=True, desc=f"tokenize {settings.source}", leave=False, disable=None
        )
    seen: set[int] = set()
    totals = PartStats()
    entries, todo = [], []
    for k in mine:
        units = [expanded.units[i] for i in parts[k]]
        fingerprint = _fingerprint(settings, tok.hash, units)
        # Finished parts are reused only up to the first one that must be written: the parts
        # after it were de-duplicated against what it held, so they are written again too.
        entry = None if todo else _finished_part(out_dir / part_name(k), fingerprint)
        if entry is None:
            todo.append(PartWriter(out_dir, k, units, settings, tok, fingerprint, batch_bytes))
            continue
        seen.update(int(h) for h in np.load(out_dir / f"{part_name(k)}.hashes.npy"))
        if bar is not None:
            bar.update(sum(u.size for u in units))
        totals.add(PartStats.from_json(entry))
        entries.append({"name": part_name(k), "shard_index": shard_index, **entry})
    skipped = len(entries)
    encoder = _Encoder(str(tokenizer_dir), settings, workers) if todo else None
    try:
        # One stream of batches over every part still to write, so the workers never wait at a
        # part boundary; each part's writer takes its own results, in order.
        tagged = ((i, batch) for i, part in enumerate(todo) for batch in part.batches())
        for i, results in itertools.groupby(encoder.map(tagged) if encoder else (), key=lambda r: r[0]):
            entry = todo[i].write(results, seen, bar)
            totals.add(PartStats.from_json(entry))
            entries.append({"name": part_name(todo[i].k), "shard_index": shard_index, **entry})
    finally:
        if encoder is not None:
            encoder.close()
        if bar is not None:
            bar.close()
    manifest = {
        "format": DATASET_FORMAT,
        "format_version": DATASET_VERSION,
        "source": settings.source,
        "tokenizer_hash": tok.hash,
        "vocab_size": tok.vocab_size,
        "settings": settings.to_json(),
        "num_shards": num_shards,
        "shard_indices": [shard_index],
        "num_parts_total": len(parts),
        "parts": entries,
        "totals": totals.to_json(),
    }
    manifest_path = out_dir / shard_manifest_name(shard_index, num_shards)
    _write_atomic(manifest_path, (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode())
    seconds = time.time() - t0
    summary = {
        "out": str(out_dir),
        "manifest": str(manifest_path),
        "source": settings.source,
        "parts": len(entries),
        "parts_skipped": skipped,
        **totals.to_json(),
        "input_bytes": total_bytes,
        "ignored_files": expanded.ignored_files,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(totals.tokens / max(seconds, 1e-9)),
    }
    n_rejected = sum(totals.rejected.values())
    log.info(
        "tokenized %s: %d records -> %d docs, %d tokens; %d rejected %s; %d of %d parts reused (%.1fs)",
        settings.source,
        totals.records_in,
        totals.docs,
        totals.tokens,
        n_rejected,
        dict(sorted(totals.rejected.items())) or "",
        skipped,
        len(entries),
        seconds,
    )
    return summary


# ======================================================================== merge
def merge_manifests(paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> dict:
    """Join the per-node manifests of one token dataset into one ``manifest.json``.

    `paths` are manifest files or folders (all ``manifest.shard-*.json`` in them). They must
    agree on source, tokenizer and settings, and together cover every shard index once. Part
    paths in the result are relative to its folder (default: the first manifest's). Counts the
    documents duplicated between shard indices (each node de-duplicated only its own parts).
    """
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.glob("manifest.shard-*-of-*.json")) if p.is_dir() else [p])
    if not files:
        raise ValueError(f"no manifest.shard-*.json found in {', '.join(map(str, paths))}")
    manifests = [(f, json.loads(f.read_text(encoding="utf-8"))) for f in files]
    first = manifests[0][1]
    out_path = Path(out) if out else files[0].parent / MANIFEST
    for f, m in manifests:
        for key in ("format", "source", "tokenizer_hash", "settings", "num_shards", "num_parts_total"):
            if m.get(key) != first.get(key):
                raise ValueError(f"{f}: {key} differs from {files[0]} ({m.get(key)!r} vs {first.get(key)!r})")
    indices = sorted(i for _, m in manifests for i in m["shard_indices"])
    if indices != list(range(first["num_shards"])):
        raise ValueError(f"shard indices {indices} do not cover 0..{first['num_shards'] - 1} exactly once")
    parts, totals = [], PartStats()
    seen: set[int] = set()
    cross_duplicates = 0
    for f, m in sorted(manifests, key=lambda fm: fm[1]["shard_indices"][0]):
        hashes_here: set[int] = set()
        for entry in m["parts"]:
            prefix = Path(os.path.relpath(f.parent / entry["name"], out_path.parent))
            hashes = np.load(f.parent / f"{entry['name']}.hashes.npy")
            hashes_here.update(int(h) for h in hashes)
            parts.append({**entry, "name": prefix.as_posix()})
            totals.add(PartStats.from_json(entry))
        cross_duplicates += len(hashes_here & seen)
        seen |= hashes_here
    parts.sort(key=lambda e: e["part"])
    merged = {
        **first,
        "shard_indices": indices,
        "parts": parts,
        "totals": totals.to_json(),
        "cross_shard_duplicates": cross_duplicates,
    }
    _write_atomic(out_path, (json.dumps(merged, indent=1, ensure_ascii=False) + "\n").encode())
    return merged
