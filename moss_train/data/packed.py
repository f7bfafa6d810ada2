"""Packed pretraining samples over token shards: two ways to cut documents into samples.

The shards are one concatenated token stream (documents end with ``</s>``). Every sample is a
dict of ``[seq_len]`` int64 tensors: ``input_ids``, ``labels``, ``segment_ids``,
``position_ids`` and ``source_ids``. Documents stay separate inside a sample: ``segment_ids``
number the documents of the sample from 0 (the model keeps attention within a segment),
``position_ids`` restart at 0 at every document start (and at the sample start), and the label
of the last token of a document is -100 (nothing is learned from predicting the next
document's first token; the document's own ``</s>`` *is* predicted). ``source_ids`` says which
source (by index) each token comes from, for per-source losses.

- :class:`PackedSequenceDataset` (``packing: stream``, Megatron style): sample ``i`` covers
  stream tokens ``[i*L, i*L + L + 1)``: inputs the first ``L``, labels the last ``L``
  (consecutive samples share one token); documents are cut wherever a window ends; no padding,
  ``len == (n_tokens - 1) // L``.
- :class:`DocumentPackedDataset` (``packing: documents``): a document is never cut, except one
  longer than ``L`` tokens, which is *split* into pieces of ``L`` tokens (its last piece
  shorter; no token is dropped and every piece keeps the label of its last token, the next
  token of the same document). Pieces go into samples whole, next-fit in stream order; the
  rest of a sample is padding (``pad_id``, label -100, a segment of its own). ``stats``
  counts the split documents, the pieces and the padding.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from moss_train.data.shards import TokenShard
from moss_train.losses import IGNORE_INDEX


class _ShardStream:
    """The shards' tokens as one stream, with each shard's source index."""

    def __init__(self, shards: Sequence[TokenShard], seq_len: int, shard_sources: Sequence[int] | None):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.shards = list(shards)
        self.seq_len = int(seq_len)
        sizes = np.array([s.n_tokens for s in self.shards], dtype=np.int64)
        # Token offset of each shard in the stream (length n_shards + 1).
        self.shard_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n_tokens = int(self.shard_starts[-1])
        self.shard_sources = np.asarray(
            shard_sources if shard_sources is not None else [0] * len(self.shards), dtype=np.int64
        )
        if len(self.shard_sources) != len(self.shards):
            raise ValueError("shard_sources needs one source index per shard")

    def stream_tokens(self, start: int, stop: int) -> np.ndarray:
        """Stream tokens ``[start, stop)`` as int64 (may span shards)."""
        out = np.empty(stop - start, dtype=np.int64)
        k = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            base = int(self.shard_starts[k])
            end = min(stop, int(self.shard_starts[k + 1]))
            if end > pos:
                out[pos - start : end - start] = self.shards[k].tokens[pos - base : end - base]
            pos = max(pos, end)
            k += 1
        return out

    def sources_at(self, positions: np.ndarray) -> np.ndarray:
        return self.shard_sources[np.searchsorted(self.shard_starts, positions, side="right") - 1]

    def document_starts(self) -> tuple[np.ndarray, np.ndarray]:
        """Stream offsets and lengths of the non-empty documents, in stream order."""
        starts = [s.doc_offsets.astype(np.int64) + base for s, base in zip(self.shards, self.shard_starts[:-1])]
        if not starts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        lengths = np.concatenate([np.diff(o) for o in starts])
        begins = np.concatenate([o[:-1] for o in starts])
        keep = lengths > 0
        return begins[keep], lengths[keep]

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        return i % n


class PackedSequenceDataset(_ShardStream, torch.utils.data.Dataset):
    """Fixed-length windows of the stream, documents cut at window ends (``packing: stream``)."""

    def __init__(self, shards: Sequence[TokenShard], seq_len: int, shard_sources: Sequence[int] | None = None):
        super().__init__(shards, seq_len, shard_sources)
        # Stream offsets where a non-empty document starts (shard starts are document starts).
        self.doc_starts = self.document_starts()[0]

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = self._check_index(i)
        L = self.seq_len
        start = i * L
        tokens = self.stream_tokens(start, start + L + 1)
        pos = np.arange(start, start + L + 1, dtype=np.int64)
        doc = np.searchsorted(self.doc_starts, pos, side="right") - 1  # document of each token
        labels = tokens[1:].copy()
        labels[doc[1:] != doc[:-1]] = IGNORE_INDEX
        d = doc[:-1]
        return {
            "input_ids": torch.from_numpy(tokens[:-1].copy()),
            "labels": torch.from_numpy(labels),
            "segment_ids": torch.from_numpy(d - d[0]),
            "position_ids": torch.from_numpy(pos[:-1] - np.maximum(self.doc_starts[d], start)),
            "source_ids": torch.from_numpy(self.sources_at(pos[:-1])),
        }


class DocumentPackedDataset(_ShardStream, torch.utils.data.Dataset):
    """Whole documents per sample, padded; only documents longer than seq_len are split."""

    def __init__(
        self, shards: Sequence[TokenShard], seq_len: int, pad_id: int, shard_sources: Sequence[int] | None = None
    ):
        super().__init__(shards, seq_len, shard_sources)
        self.pad_id = int(pad_id)
        L = self.seq_len
        begins, lengths = self.document_starts()
        n_pieces = -(-lengths // L)  # ceil
        doc_of_piece = np.repeat(np.arange(len(lengths)), n_pieces)
        first_piece = np.concatenate([[0], np.cumsum(n_pieces)[:-1]]).astype(np.int64)
        k = np.arange(len(doc_of_piece), dtype=np.int64) - np.repeat(first_piece, n_pieces)  # piece # in its doc
        self.piece_start = begins[doc_of_piece] + k * L
        self.piece_len = np.minimum(L, lengths[doc_of_piece] - k * L)
        self.piece_doc_end = begins[doc_of_piece] + lengths[doc_of_piece]
        self.sample_bounds = self._next_fit(self.piece_len.tolist(), L)
        n_samples = len(self.sample_bounds) - 1
        self.stats = {
            "documents": int(len(lengths)),
            "documents_split": int((lengths > L).sum()),
            "pieces": int(len(self.piece_len)),
            "samples": n_samples,
            "padding_fraction": 1.0 - float(lengths.sum()) / max(1, n_samples * L),
        }

    @staticmethod
    def _next_fit(lengths: list[int], capacity: int) -> np.ndarray:
        """Sample boundaries (piece indices): start a new sample when the next piece won't fit."""
        bounds = [0]
        fill = 0
        for i, n in enumerate(lengths):
            if fill + n > capacity:
                bounds.append(i)
                fill = 0
            fill += n
        if lengths:
            bounds.append(len(lengths))
        return np.asarray(bounds, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sample_bounds) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = self._check_index(i)
        pieces = []
        for p in range(int(self.sample_bounds[i]), int(self.sample_bounds[i + 1])):
            start, n = int(self.piece_start[p]), int(self.piece_len[p])
            # One token more when the document goes on: the label of the piece's last token.
            tokens = self.stream_tokens(start, min(start + n + 1, int(self.piece_doc_end[p])))
            pieces.append((tokens[:n], tokens[1:], self.shard_sources_of(start)))
        return packed_row(pieces, self.seq_len, self.pad_id, "source_ids")

    def shard_sources_of(self, position: int) -> int:
        return int(self.shard_sources[int(np.searchsorted(self.shard_starts, position, side="right")) - 1])


def packed_row(pieces: Sequence[tuple], seq_len: int, pad_id: int, group_key: str) -> dict[str, torch.Tensor]:
    """One sample of `seq_len` tokens: whole pieces ``(ids, labels, group)`` end to end, then
    padding. ``segment_ids`` number the pieces from 0 (the padding is a segment of its own),
    ``position_ids`` restart at every piece and in the padding, and ``group_key`` holds each
    token's group id (a source, a category; -1 in the padding). A piece's labels may be shorter
    than its ids: the rest, like the padding's, are -100, so no label crosses a boundary."""
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    segment_ids = np.empty(seq_len, dtype=np.int64)
    position_ids = np.empty(seq_len, dtype=np.int64)
    group_ids = np.full(seq_len, -1, dtype=np.int64)
    at = 0
    for segment, (ids, piece_labels, group) in enumerate(pieces):
        n = len(ids)
        input_ids[at : at + n] = ids
        labels[at : at + len(piece_labels)] = piece_labels
        segment_ids[at : at + n] = segment
        position_ids[at : at + n] = np.arange(n)
        group_ids[at : at + n] = group
        at += n
    segment_ids[at:] = len(pieces)
    position_ids[at:] = np.arange(seq_len - at)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "segment_ids": torch.from_numpy(segment_ids),
        "position_ids": torch.from_numpy(position_ids),
        group_key: torch.from_numpy(group_ids),
    }


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each item, longest first, goes to the fullest bin it still fits.

    Deterministic (ties by index); near-optimal fill for the length mixes of dialogue data.
    """
    order = sorted(range(len(lengths)), key=lambda j: (-int(lengths[j]), j))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin id), sorted
    for j in order:
        need = int(lengths[j])
        if need > capacity:
            raise ValueError(f"item {j} of length {need} exceeds the bin capacity {capacity}")
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, b = free.pop(at)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(j)
        if space - need > 0:
            bisect.insort(free, (space - need, b))
    return bins


def collate_packed(batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of samples into ``[batch, seq_len]`` tensors, key by key."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}
