"""The weighted blend: exact proportions over any window, O(1) access, per-source epochs,
repeat / stop when a source runs out, rank partitioning of the training loop's batches."""

from __future__ import annotations

import numpy as np
import pytest

from moss_train.data.blend import (
    BlendedDataset,
    Permutation,
    SourceExhaustedError,
    largest_deficit_schedule,
    slot_counts,
)
from moss_train.data.sampler import GlobalBatchPlan


class Tagged:
    """A stand-in per-source dataset whose sample j is (name, j), so the blend's picks are visible."""

    def __init__(self, name: str, n: int):
        self.name, self.n = name, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int):
        assert 0 <= j < self.n
        return self.name, j


MIX = {"en": 360, "zh": 100, "code": 220}


def blend(sizes: dict[str, int], seed: int = 0, on_exhausted: str = "repeat", weights=MIX) -> BlendedDataset:
    names = list(sizes)
    return BlendedDataset([Tagged(n, sizes[n]) for n in names], names, [weights[n] for n in names], seed, on_exhausted)


def test_slot_counts_and_schedule():
    assert slot_counts([360, 100, 220]) == [18, 5, 11]
    assert sum(slot_counts([0.7, 0.2, 0.1])) == 10_000 and slot_counts([0.7, 0.2, 0.1]) == [7000, 2000, 1000]
    counts = slot_counts([3.3, 1.1, 5.5, 0.01])
    assert counts[3] >= 1 and sum(counts) == 10_000
    with pytest.raises(ValueError, match="positive"):
        slot_counts([1, 0])
    sources, ranks = largest_deficit_schedule([18, 5, 11])
    assert np.bincount(sources).tolist() == [18, 5, 11]
    for s in range(3):  # ranks number each source's slots 0, 1, 2, ...
        assert ranks[sources == s].tolist() == list(range([18, 5, 11][s]))


@pytest.mark.parametrize("weights", [MIX, {"en": 0.7, "zh": 0.2, "code": 0.1}, {"en": 1, "zh": 999, "code": 3}])
def test_proportions_within_one_percent_over_any_window(weights):
    ds = blend({"en": 10**6, "zh": 10**6, "code": 10**6}, weights=weights)
    n = 60_000
    which = np.array([ds.locate(i)[0] for i in range(n)])
    total = sum(weights.values())
    for s, name in enumerate(ds.names):
        share = weights[name] / total
        cum = np.concatenate([[0], np.cumsum(which == s)])
        for window in (10_000, 25_000):
            counts = cum[window:] - cum[:-window]  # every window of this length, at every offset
            assert np.abs(counts - window * share).max() <= 2, (name, window)  # ±2 samples: far inside ±1%
    assert np.array_equal(ds.source_counts(0, n), np.bincount(which, minlength=3))


def test_random_access_is_deterministic_and_covers_each_source_once_per_epoch():
    sizes = {"en": 500, "zh": 37, "code": 120}
    ds = blend(sizes, seed=3)
    again = blend(sizes, seed=3)
    other = blend(sizes, seed=4)
    picks = [ds[i] for i in range(len(ds))]
    order = np.random.default_rng(0).permutation(len(ds))
    assert [again[int(i)] for i in order] == [picks[int(i)] for i in order]  # any access order, same answers
    assert [other[i] for i in range(200)] != picks[:200]  # the seed matters
    for name in ds.names:
        drawn = [j for n, j in picks if n == name]
        n = sizes[name]
        for e in range(len(drawn) // n):  # every full epoch of a source: each sample exactly once...
            assert sorted(drawn[e * n : (e + 1) * n]) == list(range(n)), (name, e)
        if len(drawn) >= 2 * n:  # ...and a new order each epoch
            assert drawn[:n] != drawn[n : 2 * n]
    # repeat: the blend ends when every source has been read at least once
    assert len([1 for n, _ in picks if n == "en"]) == sizes["en"]
    assert len(ds) == ds.position_of(0, sizes["en"] - 1) + 1


def test_stop_ends_at_the_first_exhausted_source_with_a_clear_message():
    ds = blend({"en": 500, "zh": 37, "code": 120}, on_exhausted="stop")
    picks = [ds[i] for i in range(len(ds))]
    assert sum(1 for n, _ in picks if n == "zh") == 37  # zh is used up exactly at the end
    assert sorted(j for n, j in picks if n == "zh") == list(range(37))
    with pytest.raises(IndexError):
        ds[len(ds)]
    ds.check_enough(len(ds))
    with pytest.raises(
        SourceExhaustedError, match="data source 'zh' runs out after .* data.on_exhausted=repeat"
    ) as err:
        ds.check_enough(len(ds) + 1)
    assert err.value.source == "zh"
    blend({"en": 500, "zh": 37, "code": 120}).check_enough(10**9)  # repeat never runs out


def test_ranks_split_the_blend_without_overlap_or_gaps():
    """The training loop walks a blend in order (shuffle=False); ranks take disjoint slices."""
    ds = blend({"en": 300, "zh": 50, "code": 200})
    n = len(ds)
    for world in (1, 2, 4):
        plans = [GlobalBatchPlan(n, 16, 2, world, r, seed=0, shuffle=False) for r in range(world)]
        seen = []
        for position in range(0, 3 * n, 16):  # three passes, crossing the end of the blend
            parts = [np.concatenate(p.micro_batches_at(position)) for p in plans]
            whole = np.concatenate(parts)
            assert whole.tolist() == [(position + k) % n for k in range(16)]
            seen.extend(whole.tolist())
        assert seen[:n] == list(range(n))


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 17, 1000, 4097):
        perm = Permutation(n, "k", n)
        assert sorted(perm.array().tolist()) == list(range(n))
    a, b = Permutation(1000, "a").array(), Permutation(1000, "b").array()
    assert a.tolist() != b.tolist() and a.tolist() != list(range(1000))
    with pytest.raises(IndexError):
        Permutation(5, "x")(5)
