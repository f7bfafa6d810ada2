"""Packing whole documents (``packing: documents``): boundaries, long documents, padding, sources."""

from __future__ import annotations

import numpy as np
import pytest

from moss_train.data.packed import IGNORE_INDEX, DocumentPackedDataset, PackedSequenceDataset
from moss_train.data.shards import ShardWriter, open_shards

PAD = 3


def _write(prefix, docs, source="en"):
    with ShardWriter(prefix, "uint16", "h" * 64, source) as w:
        for d in docs:
            w.add_document(d)


@pytest.fixture
def shards(tmp_path):
    # A = 10..12 (3), B = 20..25 (6), [empty], C = 30..31 (2) | second shard (zh): D = 40..49 (10), E = 50
    _write(tmp_path / "s1", [[10, 11, 12], [20, 21, 22, 23, 24, 25], [], [30, 31]])
    _write(tmp_path / "s2", [list(range(40, 50)), [50]], source="zh")
    return open_shards([tmp_path / "s1", tmp_path / "s2"])


def _lists(x):
    return {k: v.tolist() for k, v in x.items()}


def test_documents_are_never_cut_and_samples_are_padded(shards):
    ds = DocumentPackedDataset(shards, 6, PAD, shard_sources=[0, 1])
    # pieces A(3) B(6) C(2) D[0:6] D[6:10] E(1), next-fit into 6: [A] [B] [C] [D0] [D1 E]
    assert ds.stats == {
        "documents": 5,
        "documents_split": 1,
        "pieces": 6,
        "samples": 5,
        "padding_fraction": 1 - 22 / 30,
    }
    assert _lists(ds[0]) == {
        "input_ids": [10, 11, 12, PAD, PAD, PAD],
        "labels": [11, 12, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
        "segment_ids": [0, 0, 0, 1, 1, 1],  # padding is a segment of its own
        "position_ids": [0, 1, 2, 0, 1, 2],
        "source_ids": [0, 0, 0, -1, -1, -1],
    }
    assert _lists(ds[1])["input_ids"] == [20, 21, 22, 23, 24, 25]  # exactly one full document
    assert _lists(ds[1])["labels"] == [21, 22, 23, 24, 25, IGNORE_INDEX]
    assert _lists(ds[2])["input_ids"] == [30, 31, PAD, PAD, PAD, PAD]  # C, then D does not fit
    # D (10 tokens) is longer than seq_len: split into 6 + 4; the first piece keeps its last label.
    assert _lists(ds[3]) == {
        "input_ids": [40, 41, 42, 43, 44, 45],
        "labels": [41, 42, 43, 44, 45, 46],
        "segment_ids": [0] * 6,
        "position_ids": [0, 1, 2, 3, 4, 5],
        "source_ids": [1] * 6,
    }
    assert _lists(ds[4]) == {  # D's tail and E share a sample, as two segments
        "input_ids": [46, 47, 48, 49, 50, PAD],
        "labels": [47, 48, 49, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
        "segment_ids": [0, 0, 0, 0, 1, 2],
        "position_ids": [0, 1, 2, 3, 0, 0],
        "source_ids": [1, 1, 1, 1, 1, -1],
    }
    with pytest.raises(IndexError):
        ds[5]


def test_every_token_is_trained_on_once_in_either_packing(shards):
    """The same targets as the stream windows give, minus nothing: each document's tokens after
    its first are labels exactly once (documents packing loses no label at a split)."""
    docs = DocumentPackedDataset(shards, 4, PAD, [0, 1])
    labels = np.concatenate([docs[i]["labels"].numpy() for i in range(len(docs))])
    expected = [t for d in ([10, 11, 12], list(range(20, 26)), [30, 31], list(range(40, 50)), [50]) for t in d[1:]]
    assert sorted(labels[labels != IGNORE_INDEX].tolist()) == sorted(expected)
    for i in range(len(docs)):  # no sample mixes a document's tokens into another segment
        x = docs[i]
        seg, ids = x["segment_ids"].numpy(), x["input_ids"].numpy()
        for s in np.unique(seg):
            run = ids[seg == s]
            if run[0] != PAD:
                assert np.all(np.diff(run) == 1), run  # one contiguous piece of one document


def test_stream_packing_reports_the_source_of_every_token(shards):
    ds = PackedSequenceDataset(shards, 5, shard_sources=[0, 1])
    x = ds[2]  # stream positions 10..14: C's last token (31) | the zh shard's D (40..43)
    assert x["input_ids"].tolist() == [31, 40, 41, 42, 43]
    assert x["source_ids"].tolist() == [0, 1, 1, 1, 1]
    assert x["labels"].tolist() == [IGNORE_INDEX, 41, 42, 43, 44]
