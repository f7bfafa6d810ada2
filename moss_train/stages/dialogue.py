"""Pieces the dialogue stages share (not a stage): stage=sft and stage=preference both train
next-token cross-entropy on rendered MOSS dialogues (shards with a mask stream, written by
``moss-data sft`` or by stage=tag), fitted to ``data.seq_len``, packed or padded, with per
category metrics (``loss_cat_<name>``, ``accuracy_cat_<name>``) where the data has categories.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch

from moss_train.data.packed import collate_packed
from moss_train.data.rendering import LOSS_MASKS
from moss_train.data.sft import PackedSFTDataset, PaddedSFTDataset, SFTConversations, collate_padded
from moss_train.data.shards import open_shards
from moss_train.data.token_datasets import resolve_shard_prefixes
from moss_train.engine.stage import LossTerms, StageContext, StageData
from moss_train.errors import ConfigError
from moss_train.stages import lm


def dialogue_data(ctx: StageContext, stage_name: str) -> StageData:
    """The recipe's dialogue shards as packed sequences or padded rows (sft.packing)."""
    cfg, tokenizer = ctx.cfg, ctx.tokenizer
    train, valid, categories = _conversations(ctx, stage_name)
    bit, pad, seed = LOSS_MASKS[cfg.sft.loss_mask], tokenizer.pad_id, cfg.trainer.seed
    if cfg.sft.packing == "packed":
        make = partial(PackedSFTDataset, seq_len=cfg.data.seq_len, loss_bit=bit, pad_id=pad, seed=seed)
        return StageData(
            train=make(train),
            eval=make(valid) if valid else None,
            collate=collate_packed,
            count_targets=lm.count_label_targets,
            tokens_per_sample=cfg.data.seq_len,
            group_names=categories,
        )
    make = partial(PaddedSFTDataset, loss_bit=bit, pad_id=pad, seed=seed)
    return StageData(
        train=make(train, order=cfg.sft.padded_order, global_batch_size=cfg.trainer.global_batch_size),
        eval=make(valid, order="random") if valid else None,
        collate=partial(collate_padded, pad_id=pad),
        count_targets=lm.count_label_targets,
        tokens_per_sample=max(1, round(float(train.lengths.mean()))),  # mean row length, for tokens/s
        shuffle=cfg.sft.padded_order == "random",  # a length-grouped order is already the training order
        group_names=categories,
    )


def _conversations(ctx: StageContext, stage_name: str):
    """Train and held-out conversations fitted to data.seq_len (counts reported), and the
    category names their category ids index."""
    cfg, data = ctx.cfg, ctx.cfg.data
    if not data.train_shards:
        raise ConfigError(
            "data.train_shards",
            f"stage={stage_name} reads dialogue shards from data.train_shards "
            "(data.sources blends are for pretraining)",
        )
    train_shards = dialogue_shards(cfg, data.train_shards, "data.train_shards", ctx.tokenizer)
    valid_shards = (
        dialogue_shards(cfg, data.valid_shards, "data.valid_shards", ctx.tokenizer) if data.valid_shards else []
    )
    # Each shard is one category; one table for train and eval so an id means the same in both.
    categories = sorted({s.source for s in train_shards + valid_shards})
    fit = partial(SFTConversations, max_length=data.seq_len, truncation=cfg.sft.truncation, categories=categories)
    train = fit(train_shards)
    valid = fit(valid_shards) if valid_shards else None
    _report(ctx, {"train": train.report.as_dict(), "valid": valid.report.as_dict() if valid else None})
    if len(train) == 0:
        raise ConfigError(
            "data.seq_len", f"no training conversation fits in {data.seq_len} tokens: {train.report.as_dict()}"
        )
    return train, valid if valid is not None and len(valid) else None, categories


def dialogue_shards(cfg, patterns, key: str, tokenizer) -> list:
    """The shards the patterns name, each checked to carry a loss-mask stream."""
    prefixes = resolve_shard_prefixes(cfg.data.root, list(patterns), key, cfg.data.prepare_hint)
    shards = open_shards(prefixes, expect_tokenizer_hash=tokenizer.hash)
    plain = [s.prefix for s in shards if not s.has_mask]
    if plain:
        raise ConfigError(
            key,
            f"shard {plain[0]!r} has no loss-mask stream: "
            "stage=sft reads dialogue shards written by moss-data sft (e.g. data=sft_demo)",
        )
    return shards


def _report(ctx: StageContext, report: dict) -> None:
    """Print what fitting into seq_len did, and keep it with the run (rank 0)."""
    if not ctx.is_main:
        return
    seq_len = ctx.cfg.data.seq_len
    for split, counts in report.items():
        if counts:
            print(
                f"[moss-train] sft {split}: {counts['kept']}/{counts['conversations']} conversations, "
                f"{counts['truncated']} truncated to whole turns ({counts['turns_dropped']} turns dropped), "
                f"skipped {counts['skipped'] or 'none'} (seq_len {seq_len})",
                flush=True,
            )
    out = Path(ctx.cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft_data.json").write_text(json.dumps({"seq_len": seq_len, **report}, indent=1) + "\n")


def dialogue_loss(ctx: StageContext, model, batch: dict) -> LossTerms:
    """Cross-entropy and token accuracy on the labelled tokens; per category too
    (sft.per_category_metrics) where the batch carries category ids."""
    logits, labels, targets = lm.target_logits(model, batch)
    token_loss, correct = lm.token_cross_entropy(logits, labels)
    sums = {"accuracy": correct.sum().to(torch.float64)}
    counts: dict[str, torch.Tensor] = {}
    if ctx.cfg.sft.per_category_metrics and "category_ids" in batch:
        category_ids = batch["category_ids"][targets]
        for c in torch.unique(category_ids).tolist():
            chosen = category_ids == c
            name = ctx.data.group_names[c]
            sums[f"loss_cat_{name}"] = token_loss[chosen].sum().detach()
            sums[f"accuracy_cat_{name}"] = correct[chosen].sum().to(torch.float64)
            counts[f"loss_cat_{name}"] = counts[f"accuracy_cat_{name}"] = chosen.sum()
    return LossTerms(loss_sum=token_loss.sum(), num_targets=targets.sum(), sums=sums, counts=counts)
