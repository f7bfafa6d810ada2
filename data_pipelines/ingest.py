"""Reading raw corpora: files and folders of jsonl / json / parquet / txt, compressed or not, and
Hugging Face datasets (a ``save_to_disk`` directory, a local data directory, or a name already in
the local cache — never a download: HF offline mode is on unless the user turns it off).

Reading is streaming and memory-bounded: every input yields :class:`Batch` es of about
``batch_bytes`` raw records, in a deterministic order (folders are walked in sorted order). A
record that cannot even be delimited or decoded (invalid UTF-8, a line over ``max_record_bytes``,
a JSON array element that does not parse, an unreadable or corrupt file) is passed on as a
:class:`Bad` item with its reason, so the tokenizer counts it like any other reject.

What becomes of a record (JSON parsing, the text field, cleaning) is decided in the worker
processes, see :func:`record_text`; this module only reads.

Inputs are named by *specs*: a file, a folder, a glob, ``hf:NAME_OR_PATH`` (``datasets``), or a
folder written by ``Dataset.save_to_disk`` (recognised by its files). :func:`expand_inputs` turns
specs into :class:`InputUnit` s; a large HF dataset is cut into row ranges so that it can be
split over parts and nodes like a folder of files.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Never reach a hub from data preparation unless the user says so (HF_DATASETS_OFFLINE=0).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "txt"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
TXT_UNITS = ("line", "paragraph", "document")
DEFAULT_BATCH_BYTES = 1 << 20
DEFAULT_MAX_RECORD_BYTES = 64 << 20
HF_ROWS_PER_UNIT = 1_000_000
MAX_SNIPPET_CHARS = 2000


class InputError(ValueError):
    """An input spec names nothing readable (missing path, unknown format); names the spec."""


@dataclass(frozen=True)
class Bad:
    """A record rejected while reading (before any parsing), with what we could see of it."""

    reason: str
    snippet: str = ""


@dataclass
class Batch:
    """Consecutive records of one input unit. ``kind`` says what the items are:

    - ``lines``:   raw ``bytes`` lines of a jsonl file (the worker decodes and parses them);
    - ``records``: parsed JSON values (elements of a .json file);
    - ``values``:  the value of the text field's first path component (parquet / HF columns,
                   txt units as ``str``); ``MISSING`` where the row has no such column.
    """

    unit: int
    kind: str
    start: int  # record number of items[0] within its unit (0-based)
    items: list
    nbytes: int


MISSING = "\x00<missing field>\x00"  # a str sentinel: pickles cheaply, never a real field value


@dataclass(frozen=True)
class InputUnit:
    """One readable input: a file, or a row range of a HF dataset."""

    kind: str  # "file" or "hf"
    path: str  # absolute file path; for hf the dataset path or name
    fmt: str  # jsonl / json / parquet / txt / hf
    compression: str | None = None
    size: int = 0  # bytes on disk (hf: estimated bytes of the row range)
    mtime_ns: int = 0
    rows: tuple[int, int] | None = None  # hf: [start, stop)
    hf_split: str | None = None
    hf_config: str | None = None
    hf_fingerprint: str | None = None

    def identity(self) -> dict:
        """What must be unchanged for a finished part to be reused (cheap: no content hash)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def label(self) -> str:
        if self.kind == "hf":
            return f"hf:{self.path}[{self.hf_split}][{self.rows[0]}:{self.rows[1]}]"
        return self.path


@dataclass
class ExpandResult:
    units: list[InputUnit]
    ignored_files: list[str] = field(default_factory=list)  # files in folders with no known format


# ==================================================================== specs -> units
def file_format(path: str | os.PathLike) -> tuple[str, str | None] | None:
    """(format, compression) from a file name (``x.jsonl.gz`` -> ("jsonl", ".gz")), else None."""
    name = Path(path).name.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    if compression:
        name = name[: -len(compression)]
    fmt = FORMATS.get(Path(name).suffix)
    return (fmt, compression) if fmt else None


def is_saved_hf_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def _file_unit(path: Path) -> InputUnit | None:
    found = file_format(path)
    if found is None:
        return None
    st = path.stat()
    return InputUnit("file", str(path.resolve()), found[0], found[1], st.st_size, st.st_mtime_ns)


def expand_inputs(
    specs: Sequence[str],
    hf_split: str = "train",
    hf_config: str | None = None,
    hf_rows_per_unit: int = HF_ROWS_PER_UNIT,
) -> ExpandResult:
    """Input units of `specs`, in spec order (folders and globs sorted); raises InputError."""
    result = ExpandResult([])
    for spec in specs:
        if spec.startswith("hf:"):
            result.units.extend(_hf_units(spec[3:], hf_split, hf_config, hf_rows_per_unit))
            continue
        path = Path(spec)
        if is_saved_hf_dataset(path):
            result.units.extend(_hf_units(str(path), hf_split, hf_config, hf_rows_per_unit))
        elif path.is_dir():
            n_before = len(result.units)
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if name.startswith("."):
                        continue
                    unit = _file_unit(Path(dirpath, name))
                    if unit is None:
                        result.ignored_files.append(str(Path(dirpath, name)))
                    else:
                        result.units.append(unit)
            if len(result.units) == n_before:
                raise InputError(f"{spec}: folder has no jsonl/json/parquet/txt files (compressed or not)")
        elif path.is_file():
            unit = _file_unit(path)
            if unit is None:
                raise InputError(
                    f"{spec}: unknown format; expected .jsonl/.json/.parquet/.txt, optionally {'/'.join(COMPRESSIONS)}"
                )
            result.units.append(unit)
        elif glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            units = [u for u in (_file_unit(Path(m)) for m in matches if Path(m).is_file()) if u is not None]
            if not units:
                raise InputError(f"{spec}: the pattern matches no input file")
            result.units.extend(units)
        else:
            raise InputError(f"{spec}: no such file or folder (HF datasets: hf:NAME_OR_PATH)")
    return result


def load_hf_dataset(name_or_path: str, split: str, config: str | None = None):
    """A ``datasets.Dataset``: ``load_from_disk`` for a saved folder, else ``load_dataset``
    (a local data folder, or a name in the local cache; offline unless HF_DATASETS_OFFLINE=0)."""
    import datasets

    path = Path(name_or_path)
    try:
        if is_saved_hf_dataset(path):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise InputError(f"{name_or_path}: no split {split!r} (has {sorted(ds)})")
                ds = ds[split]
            return ds
        return datasets.load_dataset(name_or_path, config, split=split)
    except InputError:
        raise
    except Exception as e:  # datasets raises many kinds; one message naming the input
        raise InputError(f"hf:{name_or_path}: cannot load (split {split!r}, offline): {type(e).__name__}: {e}") from e


def _hf_units(name_or_path: str, split: str, config: str | None, rows_per_unit: int) -> list[InputUnit]:
    ds = load_hf_dataset(name_or_path, split, config)
    n = len(ds)
    nbytes = int(ds.data.nbytes)
    path = str(Path(name_or_path).resolve()) if Path(name_or_path).exists() else name_or_path
    fingerprint = getattr(ds, "_fingerprint", None)
    units = []
    for start in range(0, max(n, 1), rows_per_unit):
        stop = min(n, start + rows_per_unit)
        size = nbytes * (stop - start) // max(n, 1)
        units.append(InputUnit("hf", path, "hf", None, size, 0, (start, stop), split, config, fingerprint))
    return units


# ===================================================================== reading
class _HashingReader(io.RawIOBase):
    """Passes a binary file through while hashing (sha256) the bytes read, compressed or not."""

    def __init__(self, raw):
        self.raw = raw
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        if n:
            self.sha256.update(memoryview(buffer)[:n])
        return n or 0

    def close(self) -> None:
        self.raw.close()
        super().close()


def _decompressed(fileobj, compression: str | None):
    if compression is None:
        return io.BufferedReader(fileobj, 1 << 20)
    if compression == ".gz":
        return gzip.GzipFile(fileobj=io.BufferedReader(fileobj, 1 << 20), mode="rb")
    if compression == ".bz2":
        return bz2.BZ2File(io.BufferedReader(fileobj, 1 << 20), mode="rb")
    if compression == ".xz":
        return lzma.LZMAFile(io.BufferedReader(fileobj, 1 << 20), mode="rb")
    if compression == ".zst":
        try:
            import zstandard
        except ImportError:
            raise OSError("reading .zst needs the zstandard package: pip install zstandard") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fileobj, read_across_frames=True), 1 << 20)
    raise OSError(f"unknown compression {compression}")


class UnitReader:
    """Streams one input unit as Batches; afterwards ``sha256`` holds the file's digest."""

    def __init__(
        self,
        unit: InputUnit,
        unit_index: int,
        text_field: str,
        txt_unit: str = "line",
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    ):
        if txt_unit not in TXT_UNITS:
            raise ValueError(f"txt_unit must be one of {TXT_UNITS}, got {txt_unit!r}")
        self.unit = unit
        self.index = unit_index
        self.field = text_field.split(".")[0]
        self.txt_unit = txt_unit
        self.batch_bytes = batch_bytes
        self.max_record_bytes = max_record_bytes
        self.sha256: str | None = None
        self.records = 0

    def batches(self) -> Iterator[Batch]:
        """All records of the unit; an unreadable or corrupt file ends in one Bad record."""
        buffer: list = []
        size = 0
        start = 0
        try:
            for item, nbytes in self._items():
                buffer.append(item)
                size += nbytes
                if size >= self.batch_bytes:
                    yield self._batch(start, buffer, size)
                    start += len(buffer)
                    buffer, size = [], 0
        except Exception as e:  # noqa: BLE001 - any reading error (gzip, zstd, pyarrow, datasets, OS)
            # Never fatal: records read so far stand; the rest of the file is one reject naming
            # the error (so records in = kept + rejected still holds).
            buffer.append(Bad("unreadable_file", f"{type(e).__name__}: {e}"))
        if buffer:
            yield self._batch(start, buffer, size)

    def _batch(self, start: int, items: list, nbytes: int) -> Batch:
        self.records += len(items)
        return Batch(self.index, self.kind, start, items, nbytes)

    @property
    def kind(self) -> str:
        return {"jsonl": "lines", "json": "records"}.get(self.unit.fmt, "values")

    def _items(self) -> Iterator[tuple[Any, int]]:
        fmt = self.unit.fmt
        if fmt == "hf":
            yield from self._hf_items()
        elif fmt == "parquet":
            yield from self._parquet_items()
        else:
            with open(self.unit.path, "rb", buffering=0) as raw:
                hashing = _HashingReader(raw)
                stream = _decompressed(hashing, self.unit.compression)
                if fmt == "jsonl":
                    yield from self._line_items(stream)
                elif fmt == "json":
                    yield from self._json_items(stream)
                else:
                    yield from self._txt_items(stream)
                while hashing.readinto(bytearray(1 << 20)):  # rest of a file (e.g. after a json array)
                    pass
                self.sha256 = hashing.sha256.hexdigest()

    # ---- jsonl: one raw line per record ---------------------------------------------------
    def _lines(self, stream) -> Iterator[bytes | Bad]:
        limit = self.max_record_bytes
        while True:
            line = stream.readline(limit + 1)
            if not line:
                return
            if len(line) > limit and not line.endswith(b"\n"):
                head = line[:200]
                while line and not line.endswith(b"\n"):  # skip the rest of the huge line
                    line = stream.readline(1 << 20)
                yield Bad("record_too_large", head.decode("utf-8", "replace") + "...")
                continue
            yield line

    def _line_items(self, stream) -> Iterator[tuple[Any, int]]:
        for line in self._lines(stream):
            yield line, (len(line) if isinstance(line, bytes) else 0)

    # ---- txt: lines, paragraphs (blank-line separated) or the whole file ---------------------
    def _txt_items(self, stream) -> Iterator[tuple[Any, int]]:
        if self.txt_unit == "line":
            for line in self._lines(stream):
                yield (
                    (_decode(line.rstrip(b"\r\n")) if isinstance(line, bytes) else line),
                    len(line) if isinstance(line, bytes) else 0,
                )
        elif self.txt_unit == "paragraph":
            para: list[bytes] = []
            for line in self._lines(stream):
                if isinstance(line, Bad):
                    yield line, 0
                elif line.strip():
                    para.append(line)
                elif para:
                    yield _decode(b"".join(para).rstrip(b"\r\n")), sum(map(len, para))
                    para = []
            if para:
                yield _decode(b"".join(para).rstrip(b"\r\n")), sum(map(len, para))
        else:
            data = stream.read(self.max_record_bytes + 1)
            if len(data) > self.max_record_bytes:
                yield Bad("record_too_large", data[:200].decode("utf-8", "replace") + "..."), 0
            else:
                yield _decode(data), len(data)

    # ---- json: an array of records (or concatenated values), parsed incrementally ------------
    def _json_items(self, stream) -> Iterator[tuple[Any, int]]:
        decoder = json.JSONDecoder()
        text_decoder = codecs.getincrementaldecoder("utf-8")("strict")
        buf, pos, eof, in_array = "", 0, False, None

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = stream.read(1 << 20)
            try:
                text = text_decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise ValueError(f"invalid UTF-8 at byte {e.start} of a chunk: {e.reason}") from None
            eof = not chunk
            buf = buf[pos:] + text
            pos = 0
            return bool(chunk)

        def skip(chars: str) -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in chars:
                    pos += 1
                if pos < len(buf) or not more():
                    return

        skip(" \t\r\n")
        if pos >= len(buf):
            return  # an empty file holds no records
        in_array = buf[pos] == "["
        if in_array:
            pos += 1
        while True:
            skip(" \t\r\n," if in_array else " \t\r\n")
            if pos >= len(buf):
                if in_array:
                    yield Bad("invalid_json", "unterminated JSON array"), 0
                return
            if in_array and buf[pos] == "]":
                return
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    if len(buf) - pos > self.max_record_bytes:
                        yield Bad("record_too_large", buf[pos : pos + 200] + "..."), 0
                        return
                    if not more():  # malformed: the array cannot be resynchronised
                        yield Bad("invalid_json", f"{e.msg} near: {buf[pos : pos + 200]}"), 0
                        return
            yield value, end - pos
            pos = end

    # ---- parquet / HF: the text field's column, in batches ----------------------------------
    def _parquet_items(self) -> Iterator[tuple[Any, int]]:
        import pyarrow.parquet as pq

        with open(self.unit.path, "rb") as f:
            h = hashlib.sha256()
            while block := f.read(1 << 22):
                h.update(block)
        pf = pq.ParquetFile(self.unit.path)
        if self.field not in pf.schema_arrow.names:
            for _ in range(pf.metadata.num_rows):
                yield MISSING, 0
        else:
            for batch in pf.iter_batches(batch_size=4096, columns=[self.field]):
                for value in batch.column(0).to_pylist():
                    yield value, (len(value) if isinstance(value, str) else 16)
        self.sha256 = h.hexdigest()

    def _hf_items(self) -> Iterator[tuple[Any, int]]:
        ds = load_hf_dataset(self.unit.path, self.unit.hf_split, self.unit.hf_config)
        start, stop = self.unit.rows
        if self.field not in ds.column_names:
            for _ in range(start, stop):
                yield MISSING, 0
            return
        column = ds.select_columns([self.field]).with_format("arrow")
        for lo in range(start, stop, 4096):
            for value in column[lo : min(stop, lo + 4096)].column(0).to_pylist():
                yield value, (len(value) if isinstance(value, str) else 16)


def _decode(raw: bytes) -> str | Bad:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Bad(
            "undecodable_utf8", raw[:MAX_SNIPPET_CHARS].decode("utf-8", "replace") + f"  [{e.reason} at {e.start}]"
        )


# ============================================================== record -> text
def _is_missing(value: Any) -> bool:
    return isinstance(value, str) and value == MISSING  # equality: pickling makes a new object


def lookup(value: Any, path: Sequence[str]) -> Any:
    """``value[path[0]][path[1]]...``, or MISSING when a key is absent (or not a dict)."""
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return MISSING
        value = value[key]
    return value


def record_text(kind: str, item: Any, field_path: Sequence[str]) -> tuple[str | None, str | None]:
    """(text, None) for a usable record, else (None, reason). Runs in the worker processes."""
    if isinstance(item, Bad):
        return None, item.reason
    if kind == "lines":
        if not item.strip():
            return None, "blank_line"
        try:
            item = item.decode("utf-8")
        except UnicodeDecodeError:
            return None, "undecodable_utf8"
        try:
            item = json.loads(item)
        except json.JSONDecodeError:
            return None, "invalid_json"
    if kind in ("lines", "records"):
        if not isinstance(item, dict):
            return None, "not_an_object"
        value = lookup(item, field_path)
    else:
        value = MISSING if _is_missing(item) else lookup(item, field_path[1:])
    if _is_missing(value):
        return None, "missing_text_field"
    if not isinstance(value, str):
        return None, "text_not_a_string" if value is not None else "null_text"
    if not value:
        return None, "empty_text"
    return value, None


def snippet(kind: str, item: Any) -> str:
    """What the rejects file shows of a record."""
    if isinstance(item, Bad):
        return item.snippet[:MAX_SNIPPET_CHARS]
    if isinstance(item, bytes):
        return item.rstrip(b"\r\n")[:MAX_SNIPPET_CHARS].decode("utf-8", "replace")
    if isinstance(item, str):
        return item[:MAX_SNIPPET_CHARS]
    try:
        return json.dumps(item, ensure_ascii=False)[:MAX_SNIPPET_CHARS]
    except (TypeError, ValueError):
        return repr(item)[:MAX_SNIPPET_CHARS]


def iter_texts(
    specs: Sequence[str], text_field: str = "text", txt_unit: str = "line", hf_split: str = "train"
) -> Iterator[str]:
    """Usable texts of `specs` in order, in this process (tokenizer sampling); rejects are skipped
    here because the tokenize step counts them."""
    path = text_field.split(".")
    for i, unit in enumerate(expand_inputs(specs, hf_split).units):
        for batch in UnitReader(unit, i, text_field, txt_unit).batches():
            for item in batch.items:
                text, _ = record_text(batch.kind, item, path)
                if text is not None:
                    yield text
