"""Stage `sft`: supervised fine-tuning on rendered MOSS dialogues (shards with a mask stream).

Data comes from ``moss-data sft`` (one shard per split and category, see
moss_train/data/sft.py). The loss is next-token cross-entropy on the tokens the recipe's
``sft.loss_mask`` selects; evaluation adds token accuracy on those tokens, and both per
category (``loss_cat_<name>``, ``accuracy_cat_<name>``) where the data has categories.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from moss_train.data.packed import collate_packed
from moss_train.data.sft import (
    LOSS_MASKS,
    PackedSFTDataset,
    PaddedSFTDataset,
    SFTConversations,
    collate_padded,
)
from moss_train.data.shards import open_shards
from moss_train.engine.stage import LossTerms, StageData
from moss_train.errors import ConfigError
from moss_train.stages import lm


class SFTStage:
    name = "sft"

    load_tokenizer = staticmethod(lm.load_tokenizer)
    build_model = staticmethod(lm.build_causal_lm)

    def __init__(self):
        self.categories: list[str] = []
        self.per_category = True

    def build_data(self, cfg, tokenizer) -> StageData:
        self.per_category = cfg.sft.per_category_metrics
        train, valid = self._conversations(cfg, tokenizer)
        bit, pad, seed = LOSS_MASKS[cfg.sft.loss_mask], tokenizer.pad_id, cfg.trainer.seed
        if cfg.sft.packing == "packed":
            make = partial(PackedSFTDataset, seq_len=cfg.data.seq_len, loss_bit=bit, pad_id=pad, seed=seed)
            return StageData(
                train=make(train),
                eval=make(valid) if valid else None,
                collate=collate_packed,
                count_targets=lm.count_label_targets,
                tokens_per_sample=cfg.data.seq_len,
            )
        make = partial(PaddedSFTDataset, loss_bit=bit, pad_id=pad, seed=seed)
        return StageData(
            train=make(train, order=cfg.sft.padded_order, global_batch_size=cfg.trainer.global_batch_size),
            eval=make(valid, order="random") if valid else None,
            collate=partial(collate_padded, pad_id=pad),
            count_targets=lm.count_label_targets,
            tokens_per_sample=max(1, round(float(train.lengths.mean()))),  # mean row length, for tokens/s
            shuffle=cfg.sft.padded_order == "random",  # a length-grouped order is already the training order
        )

    def _conversations(self, cfg, tokenizer) -> tuple[SFTConversations, SFTConversations | None]:
        """Train and held-out conversations fitted to data.seq_len (counts reported)."""
        data = cfg.data
        if not data.train_shards:
            raise ConfigError("data.train_shards", "stage=sft reads dialogue shards from data.train_shards (data.sources blends are for pretraining)")
        train_shards = self._shards(cfg, data.train_shards, "data.train_shards", tokenizer)
        valid_shards = self._shards(cfg, data.valid_shards, "data.valid_shards", tokenizer) if data.valid_shards else []
        # Each shard is one category; one table for train and eval so an id means the same in both.
        self.categories = sorted({s.source for s in train_shards + valid_shards})
        fit = partial(SFTConversations, max_length=data.seq_len, truncation=cfg.sft.truncation, categories=self.categories)
        train = fit(train_shards)
        valid = fit(valid_shards) if valid_shards else None
        self._report(cfg, {"train": train.report.as_dict(), "valid": valid.report.as_dict() if valid else None})
        if len(train) == 0:
            raise ConfigError("data.seq_len", f"no training conversation fits in {data.seq_len} tokens: {train.report.as_dict()}")
        return train, valid if valid is not None and len(valid) else None

    @staticmethod
    def _shards(cfg, patterns, key, tokenizer) -> list:
        prefixes = lm.resolve_shards(cfg.data.root, patterns, key, cfg.data.prepare_hint)
        shards = open_shards(prefixes, expect_tokenizer_hash=tokenizer.hash)
        plain = [s.prefix for s in shards if not s.has_mask]
        if plain:
            raise ConfigError(key, f"shard {plain[0]!r} has no loss-mask stream: stage=sft reads dialogue shards written by moss-data sft (e.g. data=sft_demo)")
        return shards

    @staticmethod
    def _report(cfg, report: dict) -> None:
        """Print what fitting into seq_len did, and keep it with the run (rank 0)."""
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        for split, counts in report.items():
            if counts:
                print(
                    f"[moss-train] sft {split}: {counts['kept']}/{counts['conversations']} conversations, "
                    f"{counts['truncated']} truncated to whole turns ({counts['turns_dropped']} turns dropped), "
                    f"skipped {counts['skipped'] or 'none'} (seq_len {cfg.data.seq_len})",
                    flush=True,
                )
        out = Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sft_data.json").write_text(json.dumps({"seq_len": cfg.data.seq_len, **report}, indent=1) + "\n")

    def loss(self, model, batch: dict) -> LossTerms:
        logits, labels, targets = lm.target_logits(model, batch)
        token_loss, predicted = lm.token_cross_entropy(logits, labels)
        correct = predicted == labels
        sums = {"accuracy": correct.sum().to(torch.float64)}
        counts: dict[str, torch.Tensor] = {}
        if self.per_category and "category_ids" in batch:
            self._per_category(batch["category_ids"][targets], token_loss, correct, sums, counts)
        return LossTerms(loss_sum=token_loss.sum(), num_targets=targets.sum(), sums=sums, counts=counts)

    def _per_category(self, category_ids, token_loss, correct, sums, counts) -> None:
        """category_ids, token_loss, correct: per target token."""
        for c in torch.unique(category_ids).tolist():
            chosen = category_ids == c
            name = self.categories[c]
            sums[f"loss_cat_{name}"] = token_loss[chosen].sum().detach()
            sums[f"accuracy_cat_{name}"] = correct[chosen].sum().to(torch.float64)
            counts[f"loss_cat_{name}"] = counts[f"accuracy_cat_{name}"] = chosen.sum()
