"""Stage `pretrain`: causal language modelling on packed documents from token shards."""

from __future__ import annotations

from moss_train.data.packed import PackedSequenceDataset, collate_packed
from moss_train.data.shards import open_shards
from moss_train.stages import lm
from moss_train.stages.base import StageData


class PretrainStage:
    name = "pretrain"

    load_tokenizer = staticmethod(lm.load_tokenizer)
    build_model = staticmethod(lm.build_causal_lm)
    loss = staticmethod(lm.causal_lm_loss)

    def build_data(self, cfg, tokenizer) -> StageData:
        data = cfg.data
        train = self._dataset(data, data.train_shards, "data.train_shards", tokenizer)
        valid = self._dataset(data, data.valid_shards, "data.valid_shards", tokenizer) if data.valid_shards else None
        return StageData(
            train=train,
            eval=valid,
            collate=collate_packed,
            count_targets=lm.count_label_targets,
            tokens_per_sample=data.seq_len,
        )

    @staticmethod
    def _dataset(data, patterns, key, tokenizer) -> PackedSequenceDataset:
        prefixes = lm.resolve_shards(data.root, patterns, key, data.prepare_hint)
        shards = open_shards(prefixes, expect_tokenizer_hash=tokenizer.hash)
        return PackedSequenceDataset(shards, data.seq_len)
