"""What a training stage hands to the one training loop.

A stage is a thin module: it builds the model and the datasets and says how a micro-batch
turns into a loss. The engine (moss_train/engine/loop.py) does everything else — DeepSpeed,
batching, accumulation, the global token-mean, evaluation, checkpoints and metrics — the
same way for every stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass
class LossTerms:
    """A micro-batch's loss as a SUM over its targets, and how many targets there were.

    The engine divides the sum over all micro-batches and ranks by the total count, so the
    optimizer sees the mean over every target token of the global batch.
    """

    loss_sum: torch.Tensor
    num_targets: torch.Tensor
    # Extra sums to report as means (e.g. correct predictions -> accuracy). Each is divided by
    # its entry in `counts` (e.g. a per-source loss over that source's tokens), else by
    # num_targets; all summed over micro-batches and ranks first.
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StageData:
    train: Dataset
    eval: Optional[Dataset]
    collate: Callable[[list], dict]
    # Counts the targets of a collated micro-batch without running the model, so the engine can
    # know the global token count before the first backward of a step.
    count_targets: Callable[[dict], int]
    # Tokens the model computes per sample (for tokens/s and MFU).
    tokens_per_sample: int
    # False when the dataset's own index order is already the training order (e.g. a blend
    # whose interleaving keeps source proportions exact); True: a seeded permutation per epoch.
    shuffle: bool = True


class Stage(Protocol):
    """Optional hooks the engine calls when a stage has them: ``use_frozen_models(factory)``
    before build_data (a model it only runs forward, e.g. DPO's reference), ``use_engine(engine,
    cfg)`` once the trained model's engine exists (DPO with LoRA scores its reference with it), and
    ``run(cfg)`` instead of the training loop (stage=tag)."""

    name: str

    def load_tokenizer(self, cfg): ...

    def build_model(self, cfg, tokenizer) -> nn.Module: ...

    def build_data(self, cfg, tokenizer) -> StageData: ...

    def loss(self, model: nn.Module, batch: dict) -> LossTerms: ...
