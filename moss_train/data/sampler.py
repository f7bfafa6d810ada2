"""Which samples each rank trains on at each step: a pure function of (seed, position).

The whole sample order is a per-epoch permutation drawn from the seed, so the data position is
just the number of samples consumed so far: resume needs no iterator state, and one process or
many see the same global batch at every step (each rank takes its own contiguous slice of it,
no overlap and no gaps). With ``shuffle=False`` the order is the dataset's own index order (a
blend whose interleaving is already the training order, moss_train/data/blend.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class GlobalBatchPlan:
    num_samples: int
    global_batch_size: int
    micro_batch_size: int
    world_size: int
    rank: int
    seed: int
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.num_samples <= 0:
            raise ValueError("the dataset has no samples")
        if self.global_batch_size % (self.micro_batch_size * self.world_size):
            raise ValueError("global_batch_size must be a multiple of micro_batch_size * world_size")

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def epoch_at(self, position: int) -> float:
        return position / self.num_samples

    def global_batch_at(self, position: int) -> np.ndarray:
        """Dataset indices of the global batch that starts `position` samples into the order."""
        positions = np.arange(position, position + self.global_batch_size)
        epochs, offsets = np.divmod(positions, self.num_samples)
        if not self.shuffle:  # the dataset's own order: no permutation to materialise
            return offsets
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            out[chosen] = self._order(int(epoch))[offsets[chosen]]
        return out

    def micro_batches_at(self, position: int) -> list[np.ndarray]:
        """This rank's micro-batches of that global batch: its contiguous slice, split evenly."""
        per_rank = self.global_batch_size // self.world_size
        mine = self.global_batch_at(position)[self.rank * per_rank : (self.rank + 1) * per_rank]
        return np.split(mine, self.accumulation_steps)

    def _order(self, epoch: int) -> np.ndarray:
        return _permutation(self.num_samples, self.seed, epoch, self.shuffle)


@lru_cache(maxsize=2)
def _permutation(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)
