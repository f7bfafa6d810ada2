"""Token shards: THE on-disk token format of moss-train (written by data_pipelines, read here).

A shard is three files sharing a prefix:

- ``{prefix}.bin``  all token ids of all documents, concatenated; little-endian ``uint16`` when
                    the vocabulary fits (<= 65535 ids), else ``uint32``; memory-mapped on read;
- ``{prefix}.idx``  numpy ``.npy`` int64 array of document start offsets, length ``n_docs + 1``:
                    document ``i`` is ``bin[idx[i]:idx[i+1]]``, ``idx[0] == 0``,
                    ``idx[-1] == n_tokens``;
- ``{prefix}.json`` the manifest: format and version, dtype, ``n_tokens``, ``n_docs``, the
                    tokenizer hash (sha256 of ``tokenizer.model``), the source name, sha256 of
                    ``.bin`` and ``.idx``, and free-form ``provenance`` (inputs, rejects, ...).

Optionally a fourth file, for supervised fine-tuning:

- ``{prefix}.mask`` one ``uint8`` per token (same length as ``.bin``): per-token flags, e.g. the
                    SFT loss masks (bit meanings in moss_train/data/rendering.py); present exactly when
                    the manifest has a ``"mask"`` entry (dtype and sha256). Readers that do not
                    ask for it never open it.

The manifest is written last, after ``.bin`` and ``.idx`` are in place: a shard with a manifest
is complete. Readers check sizes and offsets on open (cheap) and checksums on request.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moss_train.files import sha256_file

FORMAT = "moss-token-shard"
FORMAT_VERSION = 1
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


class ShardError(ValueError):
    """A shard is missing, incomplete, inconsistent or corrupt; the message names the file."""


class ShardChecksumError(ShardError):
    """A shard file's sha256 does not match its manifest."""


class TokenizerMismatchError(ShardError):
    """Shards (or a shard and the run's tokenizer) were made with different tokenizers."""


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest shard dtype that holds every id of a `vocab_size` vocabulary."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return "uint16" if vocab_size <= 65535 else "uint32"


def _np_dtype(dtype: str | np.dtype) -> tuple[str, np.dtype]:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise ValueError(f"shard dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return name, _DTYPES[name]


def shard_paths(prefix: str | os.PathLike) -> dict[str, Path]:
    prefix = str(prefix)
    return {ext: Path(f"{prefix}.{ext}") for ext in ("bin", "idx", "json")}


MASK_EXT = "mask"
MASK_DTYPE = np.dtype("u1")


def mask_path(prefix: str | os.PathLike) -> Path:
    """The optional per-token mask stream of the shard at `prefix`."""
    return Path(f"{prefix}.{MASK_EXT}")


class _MaskStream:
    """The ``.mask`` file a ShardWriter is writing: uint8 per token, hashed as it goes."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.hash = hashlib.sha256()
        self.file = None

    @staticmethod
    def encode(mask, n_tokens: int) -> bytes:
        """A document's mask as bytes, checked against its token count (before anything is written)."""
        arr = np.asarray(mask)
        if arr.shape != (n_tokens,):
            raise ValueError(f"a mask needs one value per token ({n_tokens}), got shape {arr.shape}")
        if arr.size and (arr.dtype.kind not in "iub" or int(arr.min()) < 0 or int(arr.max()) > 255):
            raise ValueError("mask values must be integers in [0, 255]")
        return arr.astype(MASK_DTYPE).tobytes()

    def write(self, data: bytes) -> None:
        self._open().write(data)
        self.hash.update(data)

    def _open(self):
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.tmp, "wb")
        return self.file

    def finish(self) -> dict:
        """Close the temp file; the manifest entry that vouches for it."""
        self._open().close()
        return {"dtype": MASK_DTYPE.name, "sha256": self.hash.hexdigest()}

    def install(self) -> None:
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


class ShardWriter:
    """Write one shard, document by document; atomic (temp files renamed into place on close).

    >>> with ShardWriter("out/en.train", "uint16", tok.hash, "en") as w:
    ...     w.add_document(ids)

    On an exception inside the ``with`` block nothing is installed and the temp files are removed.
    An existing shard at `prefix` is replaced (its manifest removed first, so a crash in between
    leaves no manifest vouching for mismatched files).
    """

    def __init__(
        self,
        prefix: str | os.PathLike,
        dtype: str | np.dtype,
        tokenizer_hash: str,
        source: str,
        provenance: Mapping[str, Any] | None = None,
        buffer_tokens: int = 1 << 20,
        with_mask: bool = False,
    ):
        self.prefix = str(prefix)
        self.dtype_name, self.dtype = _np_dtype(dtype)
        self.max_id = np.iinfo(self.dtype).max
        self.tokenizer_hash = str(tokenizer_hash)
        self.source = str(source)
        self.provenance: dict[str, Any] = dict(provenance or {})
        self.paths = shard_paths(self.prefix)
        self._tmp = {ext: p.with_name(p.name + ".tmp") for ext, p in self.paths.items()}
        self._offsets: list[int] = [0]
        self._n_tokens = 0
        self._bin_hash = hashlib.sha256()
        self._buf: list[np.ndarray] = []
        self._buf_tokens = 0
        self._buffer_tokens = buffer_tokens
        self._file = None
        self._closed = False
        self.manifest: dict | None = None
        # with_mask: every document comes with one uint8 flag per token (the .mask stream).
        self._mask = _MaskStream(mask_path(self.prefix)) if with_mask else None

    # --------------------------------------------------------------- lifecycle
    def __enter__(self) -> ShardWriter:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def open(self) -> None:
        if self._file is None:
            self.paths["bin"].parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._tmp["bin"], "wb")

    def add_document(self, ids: Sequence[int] | np.ndarray, mask: Sequence[int] | np.ndarray | None = None) -> None:
        """Append one document's token ids (an empty document is recorded as empty), and its
        per-token mask when the writer was made `with_mask` (then required, else refused)."""
        if self._closed:
            raise ShardError(f"{self.prefix}: writer already closed")
        self.open()
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"a document must be a 1-D sequence of ids, got shape {arr.shape}")
        if (mask is None) != (self._mask is None):
            raise ValueError(
                f"{self.prefix}: a mask is {'required' if self._mask else 'not expected'} "
                f"(with_mask={self._mask is not None})"
            )
        mask_bytes = self._mask.encode(mask, arr.size) if self._mask is not None else None
        if arr.size:
            if arr.dtype.kind not in "iu":
                raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > self.max_id:
                raise ValueError(f"token id out of range for {self.dtype_name}: min {lo}, max {hi}")
            arr = arr.astype(self.dtype, copy=False)
            self._buf.append(arr)
            self._buf_tokens += arr.size
            if self._buf_tokens >= self._buffer_tokens:
                self._flush()
        if mask_bytes is not None:
            self._mask.write(mask_bytes)
        self._n_tokens += int(arr.size)
        self._offsets.append(self._n_tokens)

    def add_documents(self, docs: Iterable[Sequence[int]]) -> None:
        for d in docs:
            self.add_document(d)

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    @property
    def n_docs(self) -> int:
        return len(self._offsets) - 1

    def _flush(self) -> None:
        if not self._buf:
            return
        data = np.concatenate(self._buf).tobytes() if len(self._buf) > 1 else self._buf[0].tobytes()
        self._bin_hash.update(data)
        self._file.write(data)
        self._buf, self._buf_tokens = [], 0

    def close(self) -> dict:
        """Finish the shard: flush, write .idx and the manifest, rename all into place."""
        if self._closed:
            return self.manifest
        self.open()
        try:
            self._flush()
            self._file.close()
            offsets = np.asarray(self._offsets, dtype=np.int64)
            with open(self._tmp["idx"], "wb") as f:
                np.save(f, offsets, allow_pickle=False)
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "dtype": self.dtype_name,
                "byte_order": "little",
                "n_tokens": self._n_tokens,
                "n_docs": self.n_docs,
                "tokenizer_hash": self.tokenizer_hash,
                "source": self.source,
                "bin_sha256": self._bin_hash.hexdigest(),
                "idx_sha256": sha256_file(self._tmp["idx"]),
                "provenance": self.provenance,
            }
            if self._mask is not None:
                manifest["mask"] = self._mask.finish()
            self._tmp["json"].write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
            self.paths["json"].unlink(missing_ok=True)
            os.replace(self._tmp["bin"], self.paths["bin"])
            os.replace(self._tmp["idx"], self.paths["idx"])
            if self._mask is not None:
                self._mask.install()
            os.replace(self._tmp["json"], self.paths["json"])
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self.manifest = manifest
        return manifest

    def abort(self) -> None:
        """Drop everything written so far; nothing at `prefix` changes."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        for p in self._tmp.values():
            p.unlink(missing_ok=True)
        if self._mask is not None:
            self._mask.abort()
        self._closed = True


class TokenShard:
    """Read-only view of a shard: ``tokens`` is a memory map, ``doc_offsets`` an int64 array."""

    def __init__(self, prefix: str | os.PathLike, verify: bool = False):
        self.prefix = str(prefix)
        self.paths = shard_paths(self.prefix)
        mpath = self.paths["json"]
        if not mpath.is_file():
            raise ShardError(f"{mpath}: shard manifest not found (missing or incomplete shard {self.prefix!r})")
        try:
            self.manifest: dict = json.loads(mpath.read_text())
        except ValueError as e:
            raise ShardError(f"{mpath}: unreadable shard manifest: {e}") from None
        if self.manifest.get("format") != FORMAT:
            raise ShardError(f"{mpath}: not a {FORMAT} manifest")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ShardError(
                f"{mpath}: shard format version {self.manifest.get('format_version')}, "
                f"this moss-train reads version {FORMAT_VERSION}"
            )
        self.dtype_name, self.dtype = _np_dtype(self.manifest["dtype"])
        self.n_tokens = int(self.manifest["n_tokens"])
        self.n_docs = int(self.manifest["n_docs"])
        for ext in ("bin", "idx"):
            if not self.paths[ext].is_file():
                raise ShardError(f"{self.paths[ext]}: shard file missing")
        if verify:
            self.verify()
        expected = self.n_tokens * self.dtype.itemsize
        actual = self.paths["bin"].stat().st_size
        if actual != expected:
            raise ShardError(
                f"{self.paths['bin']}: {actual} bytes, manifest says {self.n_tokens} tokens x "
                f"{self.dtype.itemsize} = {expected} bytes (truncated or replaced file)"
            )
        try:
            self.doc_offsets: np.ndarray = np.load(self.paths["idx"], allow_pickle=False)
        except ValueError as e:
            raise ShardError(f"{self.paths['idx']}: unreadable index: {e}") from None
        o = self.doc_offsets
        if o.dtype != np.int64 or o.ndim != 1 or len(o) != self.n_docs + 1 or o[0] != 0 or o[-1] != self.n_tokens:
            raise ShardError(
                f"{self.paths['idx']}: index does not match the manifest "
                f"(need int64, length n_docs+1={self.n_docs + 1}, first 0, last n_tokens={self.n_tokens})"
            )
        if verify and len(o) > 1 and bool((np.diff(o) < 0).any()):
            raise ShardError(f"{self.paths['idx']}: document offsets are not non-decreasing")
        if self.n_tokens:
            self.tokens = np.memmap(self.paths["bin"], dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        else:  # numpy cannot map an empty file
            self.tokens = np.zeros(0, dtype=self.dtype)

    @property
    def tokenizer_hash(self) -> str:
        return self.manifest["tokenizer_hash"]

    @property
    def source(self) -> str:
        return self.manifest["source"]

    @property
    def has_mask(self) -> bool:
        return "mask" in self.manifest

    @property
    def mask(self) -> np.ndarray:
        """The per-token uint8 mask stream (memory-mapped, opened on first use)."""
        if not hasattr(self, "_mask"):
            path = mask_path(self.prefix)
            if not self.has_mask:
                raise ShardError(f"{self.paths['json']}: shard {self.prefix!r} has no mask stream")
            if not path.is_file() or path.stat().st_size != self.n_tokens * MASK_DTYPE.itemsize:
                raise ShardError(f"{path}: mask file missing or not one byte per token ({self.n_tokens} tokens)")
            self._mask = (
                np.memmap(path, dtype=MASK_DTYPE, mode="r", shape=(self.n_tokens,))
                if self.n_tokens
                else np.zeros(0, MASK_DTYPE)
            )
        return self._mask

    def document_mask(self, i: int) -> np.ndarray:
        """The mask values of document `i` (a view into the memory map)."""
        i %= self.n_docs
        return self.mask[self.doc_offsets[i] : self.doc_offsets[i + 1]]

    def verify(self) -> None:
        """Recompute sha256 of ``.bin``, ``.idx`` (and ``.mask``); raise ShardChecksumError naming a bad file."""
        for ext in ("bin", "idx"):
            want = self.manifest.get(f"{ext}_sha256")
            got = sha256_file(self.paths[ext])
            if got != want:
                raise ShardChecksumError(
                    f"{self.paths[ext]}: sha256 {got} does not match the manifest ({want}); "
                    "the file is corrupt or was changed after the shard was written"
                )
        if self.has_mask:
            path, want = mask_path(self.prefix), self.manifest["mask"].get("sha256")
            got = sha256_file(path) if path.is_file() else "missing"
            if got != want:
                raise ShardChecksumError(f"{path}: sha256 {got} does not match the manifest ({want})")

    def document(self, i: int) -> np.ndarray:
        """Token ids of document `i` (a view into the memory map)."""
        if not -self.n_docs <= i < self.n_docs:
            raise IndexError(f"document {i} out of range for {self.n_docs} documents in {self.prefix}")
        i %= self.n_docs
        return self.tokens[self.doc_offsets[i] : self.doc_offsets[i + 1]]

    def __len__(self) -> int:
        return self.n_docs

    def __repr__(self) -> str:
        return f"TokenShard({self.prefix!r}, source={self.source!r}, n_docs={self.n_docs}, n_tokens={self.n_tokens})"


def open_shards(
    prefixes: Iterable[str | os.PathLike],
    expect_tokenizer_hash: str | None = None,
    verify: bool = False,
) -> list[TokenShard]:
    """Open shards that must share one tokenizer (that of `expect_tokenizer_hash`, or the first's)."""
    shards = [TokenShard(p, verify=verify) for p in prefixes]
    if not shards:
        return shards
    want = expect_tokenizer_hash or shards[0].tokenizer_hash
    origin = "the expected tokenizer" if expect_tokenizer_hash else f"shard {shards[0].prefix!r}"
    for s in shards:
        if s.tokenizer_hash != want:
            raise TokenizerMismatchError(
                f"shard {s.prefix!r} ({s.paths['json']}) was tokenized with tokenizer {s.tokenizer_hash}, "
                f"but {origin} uses {want}; re-tokenize it with the same tokenizer"
            )
    return shards


def shard_is_complete(prefix: str | os.PathLike) -> bool:
    """True when the shard at `prefix` opens cleanly (manifest, sizes and index consistent)."""
    try:
        TokenShard(prefix)
        return True
    except (ShardError, OSError, KeyError):
        return False
