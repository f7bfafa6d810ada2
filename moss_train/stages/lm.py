"""Pieces the stages share (not a stage): the models a recipe describes, the language-modelling
loss and sequence log-probabilities. Stage modules import this and never each other."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial

import torch

from moss_train import losses
from moss_train.data.pairs import collate_pairs, count_pairs, pair_datasets
from moss_train.engine.stage import LossTerms, StageContext, StageData
from moss_train.errors import ConfigError
from moss_train.losses import IGNORE_INDEX, token_cross_entropy
from moss_train.model.codegen import CodeGenForCausalLM
from moss_train.model.config import padded_vocab_size
from moss_train.model.reward import RewardModel
from moss_train.tokenizer import MossTokenizer


def resolve_model_config(cfg, tokenizer: MossTokenizer):
    """The model recipe with its vocabulary sized for the tokenizer (vocab_size 0 = from it)."""
    model_cfg = cfg.model
    if model_cfg.vocab_size == 0:
        return replace(
            model_cfg, vocab_size=padded_vocab_size(tokenizer.vocab_size, model_cfg.pad_vocab_to_multiple_of)
        )
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{model_cfg.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})",
        )
    return model_cfg


def build_causal_lm(cfg, tokenizer: MossTokenizer) -> CodeGenForCausalLM:
    return CodeGenForCausalLM(resolve_model_config(cfg, tokenizer))


def build_reward_model(cfg, tokenizer: MossTokenizer) -> RewardModel:
    """The causal LM's backbone with a scalar head (model/reward.py)."""
    return RewardModel(resolve_model_config(cfg, tokenizer))


def pair_data(ctx: StageContext, stage_name: str, count_head_rows) -> StageData:
    """Train and held-out preference pairs (data/pairs.py), as batches of chosen + rejected rows
    (stage=reward and stage=dpo); `count_head_rows`: see StageData."""
    train, valid = pair_datasets(ctx.cfg, ctx.tokenizer, stage_name, ctx.is_main)
    return StageData(
        train=train,
        eval=valid,
        collate=partial(collate_pairs, pad_id=ctx.tokenizer.pad_id),
        count_targets=count_pairs,
        tokens_per_sample=max(1, round(2 * train.mean_length)),  # both responses of a pair
        count_head_rows=count_head_rows,
    )


def target_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, labels, targets): the logits (N, V) and labels (N,) of the N target positions
    only (labels != -100), and the (B, T) target mask; no logits are computed elsewhere."""
    labels = batch["labels"]
    targets = labels != IGNORE_INDEX
    logits = model(
        input_ids=batch["input_ids"],
        position_ids=batch.get("position_ids"),
        segment_ids=batch.get("segment_ids"),
        logits_at=targets,
    )
    return logits, labels[targets], targets


def causal_lm_loss(model, batch: dict, group_names: Sequence[str] = ()) -> LossTerms:
    """Summed next-token cross-entropy over labels != -100, and the count of those labels.

    With `group_names`, ``batch["source_ids"]`` (per token, an index into `group_names`) adds
    ``loss_<name>``: the loss summed over that group's targets, counted by them (reported as
    the per-source mean over all micro-batches and ranks).
    """
    logits, labels, targets = target_logits(model, batch)
    token_loss, is_top = token_cross_entropy(logits, labels)
    sums, counts = {}, {}
    if group_names:
        groups = batch["source_ids"][targets]
        for g, name in enumerate(group_names):
            in_group = groups == g
            if in_group.any():
                sums[f"loss_{name}"] = token_loss.detach()[in_group].sum().double()
                counts[f"loss_{name}"] = in_group.sum()
    sums["accuracy"] = is_top.sum().to(torch.float64)
    return LossTerms(loss_sum=token_loss.sum(), num_targets=targets.sum(), sums=sums, counts=counts)


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """Per row: the summed log-probability of its labelled tokens (labels != -100), in fp32,
    from the target positions' logits only (losses.sequence_logps)."""
    return losses.sequence_logps(*target_logits(model, batch))


def count_label_targets(batch: dict) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def no_head_rows(batch: dict) -> int:
    """The reward model reads one scalar per response (its `score` head), no vocabulary logits."""
    return 0
