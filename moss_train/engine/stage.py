"""The stage contract: what a stage gets from the engine, and what it provides.

A stage is a thin module: it declares its data, its model and how a micro-batch turns into a
loss. The engine (moss_train/engine/loop.py) does everything else — process groups, DeepSpeed,
batching, accumulation, the global token-mean, evaluation, checkpoints and metrics — the same
way for every stage.

Two kinds, declared by the stage (``kind``):

- :class:`TrainingStage` (``"train"``): ``build_model``, ``build_data`` and ``loss``; the engine's
  one training loop trains it (pretrain, sft, reward, preference, dpo).
- :class:`JobStage` (``"job"``): trains nothing; ``run`` does its work with the models the
  engine built for it (tag: score dialogues with a frozen reward model).

What a stage gets is a :class:`StageContext`: the recipe, the tokenizer, the ranks, and — where
it declared them with ``frozen_models`` — models it only runs forward (a DPO reference, the
reward model that tags), built by the engine under the run's ZeRO config. Every method the
engine calls is declared here, with its default; the engine never probes a stage for hooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from moss_train.config import recipe_tokenizer
from moss_train.distributed import DistInfo

TRAIN, JOB = "train", "job"


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
    # Counts the positions of a collated micro-batch where the model computes vocabulary logits
    # (for MFU: the lm_head runs only where the loss needs them). None: count_targets, which is
    # that count wherever the loss is over labelled tokens (pretrain, SFT, preference).
    count_head_rows: Optional[Callable[[dict], int]] = None
    # False when the dataset's own index order is already the training order (e.g. a blend
    # whose interleaving keeps source proportions exact); True: a seeded permutation per epoch.
    shuffle: bool = True
    # Names of the groups a batch's per-token group ids index (pretraining sources, SFT
    # categories), for the loss's per-group metrics; one list for train and eval.
    group_names: Sequence[str] = ()

    def __post_init__(self):
        if self.count_head_rows is None:
            self.count_head_rows = self.count_targets


@dataclass(frozen=True)
class FrozenModel:
    """A model a stage only runs forward: `build(cfg, tokenizer)` with `init_from`'s
    architecture and weights (engine/setup.py: frozen_model)."""

    build: Callable[[Any, Any], nn.Module]
    init_from: str


@dataclass
class StageContext:
    """What the engine hands a stage. `frozen` holds the models the stage declared (by name) in
    use_frozen_models (a training stage: before its trained model exists; they are dropped
    after it) and in run (a job); `data` is what build_data returned, once it exists; `engine`
    the trained model's DeepSpeed engine, once it exists."""

    cfg: Any  # MossTrainConfig
    tokenizer: Any
    dist: DistInfo = field(default_factory=lambda: DistInfo(0, 1, 0, 1, torch.device("cpu")))  # one process
    frozen: dict[str, nn.Module] = field(default_factory=dict)
    data: Optional[StageData] = None
    engine: Any = None

    @property
    def is_main(self) -> bool:
        return self.dist.is_main


class Stage(ABC):
    """What every stage declares: its recipe name, its kind, its tokenizer and frozen models."""

    name: ClassVar[str]
    kind: ClassVar[str]

    def load_tokenizer(self, cfg):
        return recipe_tokenizer(cfg)

    def frozen_models(self, ctx: StageContext) -> dict[str, FrozenModel]:
        """The models to build frozen for this recipe, by name (none by default). Every rank
        calls it; it may check the recipe's checkpoints and raise a ConfigError."""
        return {}


class TrainingStage(Stage):
    """A stage the one training loop trains."""

    kind = TRAIN

    @abstractmethod
    def build_model(self, cfg, tokenizer) -> nn.Module: ...

    @abstractmethod
    def build_data(self, ctx: StageContext) -> StageData: ...

    @abstractmethod
    def loss(self, ctx: StageContext, model: nn.Module, batch: dict) -> LossTerms: ...

    def use_frozen_models(self, ctx: StageContext) -> None:
        """Called after build_data with ctx.frozen holding the declared frozen models (only when
        there are any), before the trained model is built; e.g. DPO scores its pairs with the
        reference here, so memory never holds both models."""

    def use_engine(self, ctx: StageContext) -> None:
        """Called once ctx.engine (the trained model's DeepSpeed engine) exists, before the first
        step; e.g. DPO with LoRA scores its reference as the policy with its adapters off."""


class JobStage(Stage):
    """A stage that trains nothing: the engine sets up the ranks and the frozen models it
    declared, then calls run."""

    kind = JOB

    @abstractmethod
    def run(self, ctx: StageContext) -> list[dict]: ...
