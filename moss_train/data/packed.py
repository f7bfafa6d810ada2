"""Packed pretraining samples over token shards (Megatron style, document-aware).

The shards are one concatenated token stream. Sample ``i`` of length ``L`` covers stream tokens
``[i*L, i*L + L + 1)``: inputs are the first ``L``, labels the last ``L`` (consecutive samples
share one token), and ``len == (n_tokens - 1) // L``.

Documents stay separate inside a sample: ``segment_ids`` number the documents of the sample
from 0 (the model keeps attention within a segment), ``position_ids`` restart at 0 at every
document start (and at the sample start), and the label of the last token of a document is
-100 (nothing is learned from predicting the next document's first token; the document's own
``</s>`` *is* predicted).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moss_train.data.shards import TokenShard

IGNORE_INDEX = -100


class PackedSequenceDataset(torch.utils.data.Dataset):
    """Fixed-length samples of ``seq_len`` tokens cut from a list of shards, in stream order."""

    def __init__(self, shards: Sequence[TokenShard], seq_len: int):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.shards = list(shards)
        self.seq_len = int(seq_len)
        sizes = np.array([s.n_tokens for s in self.shards], dtype=np.int64)
        # Token offset of each shard in the stream (length n_shards + 1).
        self.shard_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n_tokens = int(self.shard_starts[-1])
        # Stream offsets where a non-empty document starts (shard starts are document starts;
        # empty documents collapse into their neighbour's start and are dropped by unique()).
        starts = [s.doc_offsets[:-1].astype(np.int64) + base for s, base in zip(self.shards, self.shard_starts[:-1])]
        all_starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        self.doc_starts = np.unique(all_starts[all_starts < self.n_tokens])

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.seq_len)

    def stream_tokens(self, start: int, stop: int) -> np.ndarray:
        """Stream tokens ``[start, stop)`` as int64 (may span shards)."""
        out = np.empty(stop - start, dtype=np.int64)
        first = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        pos = start
        k = first
        while pos < stop:
            base = int(self.shard_starts[k])
            end = min(stop, int(self.shard_starts[k + 1]))
            if end > pos:
                out[pos - start : end - start] = self.shards[k].tokens[pos - base : end - base]
            pos = max(pos, end)
            k += 1
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        i %= n
        L = self.seq_len
        start = i * L
        tokens = self.stream_tokens(start, start + L + 1)
        pos = np.arange(start, start + L + 1, dtype=np.int64)
        doc = np.searchsorted(self.doc_starts, pos, side="right") - 1  # document of each token
        labels = tokens[1:].copy()
        labels[doc[1:] != doc[:-1]] = IGNORE_INDEX
        d = doc[:-1]
        segment_ids = d - d[0]
        position_ids = pos[:-1] - np.maximum(self.doc_starts[d], start)
        return {
            "input_ids": torch.from_numpy(tokens[:-1].copy()),
            "labels": torch.from_numpy(labels),
            "segment_ids": torch.from_numpy(segment_ids),
            "position_ids": torch.from_numpy(position_ids),
        }


def collate_packed(batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of samples into ``[batch, seq_len]`` tensors, key by key."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}
