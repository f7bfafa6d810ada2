"""A weighted blend of per-source datasets: exact proportions, deterministic, O(1) random access.

Sample ``i`` of the blend is computed, never looked up in a table (nothing grows with the
corpus or the run):

1. **Which source.** The weights become integer slot counts ``c_s`` per period of ``P = sum(c)``
   samples (integer weights are reduced by their gcd: en 360 / zh 100 / code 220 -> 18 / 5 / 11,
   P = 34; other weights are rounded to parts of ``QUANTUM``). One period is scheduled once,
   Megatron style, by *largest deficit*: slot ``r`` goes to the source furthest behind its share
   (``c_s * (r + 1) - P * taken_s``, ties to the first source). The schedule repeats every
   period, so every source is exactly on its share at each period end and within one sample
   of it inside a period: any window of ``W`` consecutive samples holds ``c_s / P * W ± 2``
   samples of source ``s`` (±0.02% at W = 10k).
2. **Which of the source's samples.** Position ``i`` is the ``j``-th draw from source ``s``
   (``j = (i // P) * c_s + rank of slot i % P``); draw ``j`` is sample ``perm_e(j % n_s)`` of
   the source's dataset, in its epoch ``e = j // n_s``. ``perm_e`` is a seeded pseudo-random
   permutation of ``[0, n_s)`` (a 4-round Feistel network with cycle walking), a new one per
   (seed, source, epoch): O(1) time and memory, no materialised shuffle.

When a source has no samples left (its first epoch is used up), ``on_exhausted`` decides:
``repeat`` starts its next epoch (a fresh permutation); ``stop`` ends the blend there.
``len()`` is where the blend ends: with ``stop`` the first position that would need a sample a
source does not have; with ``repeat`` the position where every source has been read at least
once (one *blend epoch*). :meth:`BlendedDataset.check_enough` raises a clear message naming
the source when a run needs more samples than that.

The training loop must not shuffle a blend (``StageData(shuffle=False)``): it walks positions in
order and splits each global batch over ranks, and its data position (samples consumed, saved
in every checkpoint) is all the state a resume needs.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch

QUANTUM = 10_000  # slot resolution for non-integer weights (proportions within 1e-4)
MAX_INTEGER_PERIOD = 100_000
ON_EXHAUSTED = ("repeat", "stop")
_M64 = (1 << 64) - 1


class SourceExhaustedError(RuntimeError):
    """A run needs more samples of a source than it has (``on_exhausted: stop``)."""

    def __init__(self, source: str, message: str):
        super().__init__(message)
        self.source = source


# ================================================================== schedule
def slot_counts(weights: Sequence[float]) -> list[int]:
    """Integer slots per period, proportional to `weights` (all must be > 0)."""
    if not weights or any(not (w > 0) or not math.isfinite(w) for w in weights):
        raise ValueError(f"blend weights must be positive and finite, got {list(weights)}")
    if all(float(w).is_integer() for w in weights):
        ints = [int(w) for w in weights]
        g = math.gcd(*ints)
        if sum(ints) // g <= MAX_INTEGER_PERIOD:
            return [w // g for w in ints]
    total = sum(weights)
    exact = [Fraction(w / total) * QUANTUM for w in weights]
    counts = [max(1, int(x)) for x in exact]
    # Largest remainders take the slots that rounding down left over.
    for s in sorted(range(len(weights)), key=lambda s: (-(exact[s] - int(exact[s])), s))[: QUANTUM - sum(counts)]:
        counts[s] += 1
    return counts


def largest_deficit_schedule(counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(source of each slot, its rank among that source's slots) for one period."""
    period = sum(counts)
    taken = [0] * len(counts)
    sources = np.empty(period, dtype=np.int64)
    ranks = np.empty(period, dtype=np.int64)
    for r in range(period):
        # Integer deficits (c_s * (r+1) - P * taken_s): exact, no float ties.
        best = max(range(len(counts)), key=lambda s: (counts[s] * (r + 1) - period * taken[s], -s))
        sources[r] = best
        ranks[r] = taken[best]
        taken[best] += 1
    return sources, ranks


# =============================================================== permutation
def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijective 64-bit mixer."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _M64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _M64
    return x ^ (x >> 31)


class Permutation:
    """A seeded pseudo-random permutation of ``range(n)`` computed point by point."""

    ROUNDS = 4

    def __init__(self, n: int, *key):
        if n <= 0:
            raise ValueError("a permutation needs n > 0")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits & 1  # a balanced Feistel network on an even number of bits
        self.half = bits // 2
        self.mask = (1 << self.half) - 1
        digest = hashlib.blake2b(repr(key).encode(), digest_size=8 * self.ROUNDS).digest()
        self.keys = [int.from_bytes(digest[8 * r : 8 * r + 8], "little") for r in range(self.ROUNDS)]

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} out of range for a permutation of {self.n}")
        x = i
        while True:  # cycle walking: the domain is < 4n, so ~1-4 rounds of the network
            left, right = x >> self.half, x & self.mask
            for k in self.keys:
                left, right = right, left ^ (_mix64(right ^ k) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x

    def array(self) -> np.ndarray:
        """The whole permutation (tests, small n)."""
        return np.fromiter((self(i) for i in range(self.n)), dtype=np.int64, count=self.n)


# ===================================================================== blend
class BlendedDataset(torch.utils.data.Dataset):
    """Samples of several datasets interleaved by weight; see the module docstring."""

    def __init__(
        self,
        datasets: Sequence[torch.utils.data.Dataset],
        names: Sequence[str],
        weights: Sequence[float],
        seed: int,
        on_exhausted: str = "repeat",
    ):
        if not (len(datasets) == len(names) == len(weights)) or not datasets:
            raise ValueError("one name and one weight per dataset, and at least one dataset")
        if on_exhausted not in ON_EXHAUSTED:
            raise ValueError(f"on_exhausted must be one of {ON_EXHAUSTED}, got {on_exhausted!r}")
        empty = [n for n, d in zip(names, datasets) if len(d) == 0]
        if empty:
            raise ValueError(f"blend sources with no samples: {empty} (more data, or a shorter seq_len)")
        self.datasets = list(datasets)
        self.names = list(names)
        self.weights = [float(w) for w in weights]
        self.seed = int(seed)
        self.on_exhausted = on_exhausted
        self.sizes = [len(d) for d in self.datasets]
        self.counts = slot_counts(self.weights)
        self.period = sum(self.counts)
        self.slot_source, self.slot_rank = largest_deficit_schedule(self.counts)
        # Slot of the r-th occurrence of source s within a period.
        self.slots_of = [np.flatnonzero(self.slot_source == s) for s in range(len(self.counts))]
        self._perms: dict[tuple[int, int], Permutation] = {}
        ends = [self.position_of(s, n) for s, n in enumerate(self.sizes)]  # first draw a source lacks
        self.length = (
            min(ends)
            if on_exhausted == "stop"
            else max(self.position_of(s, n - 1) + 1 for s, n in enumerate(self.sizes))
        )

    # ------------------------------------------------------------------ mapping
    def position_of(self, source: int, draw: int) -> int:
        """Blend position of the `draw`-th (0-based) sample taken from `source`."""
        c = self.counts[source]
        return (draw // c) * self.period + int(self.slots_of[source][draw % c])

    def locate(self, i: int) -> tuple[int, int]:
        """(source, sample index in that source's dataset) of blend position `i`; O(1)."""
        if i < 0:
            raise IndexError(f"negative blend position {i}")
        period, slot = divmod(i, self.period)
        s = int(self.slot_source[slot])
        draw = period * self.counts[s] + int(self.slot_rank[slot])
        epoch, offset = divmod(draw, self.sizes[s])
        if epoch and self.on_exhausted == "stop":
            raise IndexError(
                f"blend position {i} needs sample {draw} of source {self.names[s]!r}, which has {self.sizes[s]}"
            )
        return s, self._permutation(s, epoch)(offset)

    def source_counts(self, start: int, stop: int) -> np.ndarray:
        """Samples of each source among positions ``[start, stop)`` (vectorised; for checks)."""
        slots = np.arange(start, stop) % self.period
        return np.bincount(self.slot_source[slots], minlength=len(self.counts))

    def _permutation(self, source: int, epoch: int) -> Permutation:
        key = (source, epoch)
        perm = self._perms.get(key)
        if perm is None:
            if len(self._perms) > 64:
                self._perms.clear()
            perm = self._perms[key] = Permutation(self.sizes[source], "blend", self.seed, self.names[source], epoch)
        return perm

    # ------------------------------------------------------------------ dataset
    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(f"blend position {i} out of range for {self.length}")
        s, j = self.locate(i)
        return self.datasets[s][j]

    def check_enough(self, needed: int) -> None:
        """Raise SourceExhaustedError naming the source that runs out before `needed` samples."""
        if self.on_exhausted != "stop" or needed <= self.length:
            return
        s = min(range(len(self.sizes)), key=lambda s: self.position_of(s, self.sizes[s]))
        share = self.counts[s] / self.period
        raise SourceExhaustedError(
            self.names[s],
            f"data source {self.names[s]!r} runs out after {self.length} blended samples: it has "
            f"{self.sizes[s]} samples and supplies {share:.1%} of the blend (weight {self.weights[s]:g}), "
            f"but this run needs {needed} samples, about {math.ceil(needed * share)} of them from "
            f"{self.names[s]!r}. Add data to it, lower its weight, train fewer steps, or set "
            "data.on_exhausted=repeat",
        )

    def describe(self) -> dict:
        return {
            "sources": {
                n: {"weight": w, "slots_per_period": c, "samples": size, "epochs_in_blend": self._epochs(s)}
                for s, (n, w, c, size) in enumerate(zip(self.names, self.weights, self.counts, self.sizes))
            },
            "period": self.period,
            "length": self.length,
            "on_exhausted": self.on_exhausted,
        }

    def _epochs(self, s: int) -> float:
        return round(self.length * self.counts[s] / self.period / self.sizes[s], 3)
