"""Supervised fine-tuning datasets: rendered conversations (shards with a ``.mask`` stream,
moss_train/data/rendering.py) fitted to ``data.seq_len`` → packed or padded batches.

Conversations longer than ``data.seq_len`` are cut after the last whole turn that fits (the
original recipe's rule) or skipped, by ``sft.truncation``; one whose first turn does not fit is
skipped; both counted. Then either packed several per sequence with document-isolated attention
(best-fit, moss_train/data/packed.py: positions restart, no attention or loss across
conversations), or one per row padded to the longest of its micro-batch, in a length-grouped or
random order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from moss_train.data.packed import pack_best_fit, packed_row
from moss_train.data.parsing import FIRST_TURN_TOO_LONG, TOO_LONG
from moss_train.data.rendering import TURN_START, kept_length, target_labels
from moss_train.losses import IGNORE_INDEX


@dataclass
class LengthReport:
    """What fitting the conversations into seq_len did (printed and saved by the sft stage)."""

    conversations: int = 0
    kept: int = 0
    truncated: int = 0
    turns_dropped: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "conversations": self.conversations,
            "kept": self.kept,
            "truncated": self.truncated,
            "turns_dropped": self.turns_dropped,
            "skipped": dict(self.skipped),
        }


class SFTConversations:
    """The conversations of mask-carrying shards, fitted to `max_length` tokens.

    Holds, per kept conversation: its shard, document index, kept length and category id.
    Each shard's `source` is its category (moss-data sft writes one shard per category).
    """

    def __init__(
        self, shards: Sequence, max_length: int, truncation: str = "turns", categories: Sequence[str] | None = None
    ):
        if truncation not in ("turns", "skip"):
            raise ValueError(f"truncation must be 'turns' or 'skip', got {truncation!r}")
        self.shards = list(shards)
        # Category names; category_ids index this list (pass one list to share ids across datasets).
        self.categories = list(categories) if categories is not None else sorted({s.source for s in self.shards})
        self.report = LengthReport()
        columns = []
        for k, shard in enumerate(self.shards):
            kept = np.diff(shard.doc_offsets)
            self.report.conversations += len(kept)
            for i in np.flatnonzero(kept > max_length):
                kept[i] = self._fit_long(shard, int(i), max_length, truncation)
            docs = np.flatnonzero(kept > 0)
            category = self.categories.index(shard.source)
            columns.append(np.stack([np.full(len(docs), k), docs, kept[docs], np.full(len(docs), category)]))
        table = np.concatenate(columns, axis=1) if columns else np.zeros((4, 0), dtype=np.int64)
        self.shard_index, self.doc_index, self.lengths, self.category_ids = table.astype(np.int64)
        self.report.kept = len(self.lengths)

    def _fit_long(self, shard, i: int, max_length: int, truncation: str) -> int:
        flags = shard.document_mask(i)
        kept = kept_length(flags, max_length) if truncation == "turns" else 0
        if kept == 0:
            self.report.skipped[FIRST_TURN_TOO_LONG if truncation == "turns" else TOO_LONG] += 1
            return 0
        self.report.truncated += 1
        self.report.turns_dropped += int(np.count_nonzero(np.asarray(flags[kept:]) & TURN_START))
        return kept

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, flags) of kept conversation `j`, cut to its kept length."""
        shard = self.shards[self.shard_index[j]]
        i, n = int(self.doc_index[j]), int(self.lengths[j])
        return np.asarray(shard.document(i)[:n], dtype=np.int64), np.asarray(shard.document_mask(i)[:n])


class PackedSFTDataset(torch.utils.data.Dataset):
    """Sequences of exactly `seq_len` tokens, each holding whole conversations (best-fit packed),
    then padding. ``segment_ids`` keep attention inside each conversation, ``position_ids``
    restart at each, and no label crosses a boundary. Bins are in a seeded order, so the first
    N samples (what evaluation reads) mix lengths and categories."""

    def __init__(self, conversations: SFTConversations, seq_len: int, loss_bit: int, pad_id: int, seed: int = 0):
        self.conversations = conversations
        self.seq_len = seq_len
        self.loss_bit = loss_bit
        self.pad_id = pad_id
        bins = pack_best_fit(conversations.lengths, seq_len)
        order = np.random.default_rng(seed).permutation(len(bins))
        self.bins = [bins[b] for b in order]

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        pieces = []
        for j in self.bins[b]:
            ids, flags = self.conversations.tokens(j)
            pieces.append((ids, target_labels(ids, flags, self.loss_bit), self.conversations.category_ids[j]))
        return packed_row(pieces, self.seq_len, self.pad_id, "category_ids")


class PaddedSFTDataset(torch.utils.data.Dataset):
    """One conversation per sample, padded to the longest of its micro-batch by
    :func:`collate_padded` (plain causal attention: right padding is never attended).

    ``order="length_grouped"``: the sample order is fixed here (the trainer must not shuffle it):
    a seeded permutation cut into mega-batches of `group_batches` global batches, each sorted by
    length, so a micro-batch holds similar lengths; then the global batches are shuffled.
    ``order="random"``: the dataset order is the document order and the trainer shuffles it (the
    original MOSS recipe: random batches padded to the longest).
    """

    def __init__(
        self,
        conversations: SFTConversations,
        loss_bit: int,
        pad_id: int,
        order: str = "length_grouped",
        global_batch_size: int = 1,
        seed: int = 0,
        group_batches: int = 16,
    ):
        self.conversations = conversations
        self.loss_bit = loss_bit
        self.pad_id = pad_id
        n = len(conversations)
        if order == "length_grouped":
            self.order = length_grouped_order(conversations.lengths, global_batch_size, seed, group_batches)
        elif order == "random":
            self.order = np.arange(n)
        else:
            raise ValueError(f"order must be 'length_grouped' or 'random', got {order!r}")

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(self.order[i])
        ids, flags = self.conversations.tokens(j)
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(target_labels(ids, flags, self.loss_bit)),
            "category_ids": torch.full((len(ids),), int(self.conversations.category_ids[j]), dtype=torch.int64),
        }


def length_grouped_order(lengths: np.ndarray, global_batch_size: int, seed: int, group_batches: int = 16) -> np.ndarray:
    """A sample order whose global batches hold similar lengths, in a seeded random order."""
    rng = np.random.default_rng([seed, 1])
    order = rng.permutation(len(lengths))
    mega = max(1, global_batch_size * group_batches)
    for start in range(0, len(order), mega):
        chunk = order[start : start + mega]
        order[start : start + mega] = chunk[np.argsort(-lengths[chunk], kind="stable")]
    full = len(order) // global_batch_size * global_batch_size
    batches = order[:full].reshape(-1, global_batch_size)[rng.permutation(full // global_batch_size)]
    return np.concatenate([batches.reshape(-1), order[full:]])


def collate_padded(samples: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest sample: ids with `pad_id`, labels with -100."""
    longest = max(len(s["input_ids"]) for s in samples)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "category_ids": -1}
    out = {key: torch.full((len(samples), longest), value, dtype=torch.int64) for key, value in fill.items()}
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        for key in fill:
            out[key][row, :n] = sample[key]
    out["position_ids"] = torch.arange(longest).expand(len(samples), longest).clone()
    return out
