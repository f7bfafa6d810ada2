"""Pieces every language-modelling stage shares: tokenizer and model from the recipe, the loss."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from moss_train.errors import ConfigError
from moss_train.model.codegen import CodeGenForCausalLM
from moss_train.model.config import padded_vocab_size
from moss_train.stages.base import LossTerms
from moss_train.tokenizer import MossTokenizer
from moss_train.tokenizer import load_tokenizer as load_any_tokenizer

IGNORE_INDEX = -100


def load_tokenizer(cfg) -> MossTokenizer:
    path = Path(cfg.data.tokenizer)
    if not path.exists():
        hint = f"; prepare the data with: {cfg.data.prepare_hint}" if cfg.data.prepare_hint else ""
        raise ConfigError("data.tokenizer", f"no tokenizer at {path}{hint}")
    return load_any_tokenizer(path)  # a MOSS tokenizer directory, or any HF tokenizer directory


def resolve_model_config(cfg, tokenizer: MossTokenizer):
    """The model recipe with its vocabulary sized for the tokenizer (vocab_size 0 = from it)."""
    model_cfg = cfg.model
    if model_cfg.vocab_size == 0:
        return replace(model_cfg, vocab_size=padded_vocab_size(tokenizer.vocab_size, model_cfg.pad_vocab_to_multiple_of))
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{model_cfg.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})",
        )
    return model_cfg


def build_causal_lm(cfg, tokenizer: MossTokenizer) -> CodeGenForCausalLM:
    return CodeGenForCausalLM(resolve_model_config(cfg, tokenizer))


def resolve_shards(root: str, patterns: list[str], key: str, prepare_hint: str = "") -> list[str]:
    """Shard prefixes matching the recipe's patterns (a shard is complete once its .json exists)."""
    prefixes: list[str] = []
    for pattern in patterns:
        full = pattern if Path(pattern).is_absolute() else str(Path(root) / pattern)
        matches = sorted(m[: -len(".json")] for m in glob.glob(full + ".json"))
        if not matches:
            hint = f"; prepare the data with: {prepare_hint}" if prepare_hint else ""
            raise ConfigError(key, f"no shard matches {full!r}{hint}")
        prefixes.extend(matches)
    return prefixes


def causal_lm_loss(model, batch: dict, group_names: Sequence[str] = ()) -> LossTerms:
    """Summed next-token cross-entropy over labels != -100, and the count of those labels.

    With `group_names`, ``batch["source_ids"]`` (per token, an index into `group_names`) adds
    ``loss_<name>``: the loss summed over that group's targets, counted by them (reported as
    the per-source mean over all micro-batches and ranks).
    """
    logits = model(
        input_ids=batch["input_ids"],
        position_ids=batch.get("position_ids"),
        segment_ids=batch.get("segment_ids"),
    )
    labels = batch["labels"]
    targets = labels != IGNORE_INDEX
    flat_logits, flat_labels = logits.flatten(0, 1).float(), labels.flatten()
    sums, counts = {}, {}
    if group_names:
        token_loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="none").view_as(labels)
        loss_sum = token_loss.sum()
        groups = batch["source_ids"]
        for g, name in enumerate(group_names):
            in_group = targets & (groups == g)
            if in_group.any():
                sums[f"loss_{name}"] = token_loss.detach()[in_group].sum().double()
                counts[f"loss_{name}"] = in_group.sum()
    else:
        loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((logits.argmax(dim=-1) == labels) & targets).sum()
    sums["accuracy"] = correct.to(torch.float64)
    return LossTerms(loss_sum=loss_sum, num_targets=targets.sum(), sums=sums, counts=counts)


def count_label_targets(batch: dict) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())
