"""Stage `pretrain`: causal language modelling on packed documents from token shards.

Two ways to feed it (see recipes/data/):

- ``data.train_shards``: one token stream over all shards, in a seeded order per epoch;
- ``data.sources``: a weighted blend of sources (``data/moss_mix.yaml``: en 360, zh 100,
  code 220), interleaved by :class:`~moss_train.data.blend.BlendedDataset` in exact
  proportions; the training loop walks it in order (``shuffle=False``).

Either way each token knows its source (a shard manifest's ``source``), and the loss reports
``loss_<source>`` next to ``loss`` whenever there is more than one source (``eval_loss_<source>``
on the held-out data). ``data.packing`` picks stream windows or whole documents
(moss_train/data/packed.py).
"""

from __future__ import annotations

import logging

from moss_train.data.blend import BlendedDataset, SourceExhaustedError
from moss_train.data.packed import DocumentPackedDataset, PackedSequenceDataset, collate_packed
from moss_train.data.shards import open_shards
from moss_train.data.token_datasets import resolve_shard_prefixes
from moss_train.engine.stage import LossTerms, StageContext, StageData, TrainingStage
from moss_train.errors import ConfigError
from moss_train.stages import lm

log = logging.getLogger(__name__)


class PretrainStage(TrainingStage):
    name = "pretrain"

    build_model = staticmethod(lm.build_causal_lm)

    def loss(self, ctx: StageContext, model, batch: dict) -> LossTerms:
        sources = ctx.data.group_names  # source index -> name, for loss_<source>
        return lm.causal_lm_loss(model, batch, group_names=sources if len(sources) > 1 else ())

    def build_data(self, ctx: StageContext) -> StageData:
        cfg, tokenizer, data = ctx.cfg, ctx.tokenizer, ctx.cfg.data
        if data.sources:
            train, valid, sources = self._blend(cfg, tokenizer)
        else:
            train, valid, sources = self._stream(data, tokenizer)
        return StageData(
            train=train,
            eval=valid,
            collate=collate_packed,
            count_targets=lm.count_label_targets,
            tokens_per_sample=data.seq_len,
            shuffle=not data.sources,  # a blend's order is its interleaving: never re-shuffled
            group_names=sources,
        )

    # ---------------------------------------------------------------- one stream
    def _stream(self, data, tokenizer):
        train_shards = self._open(data, data.train_shards, "data.train_shards", tokenizer)
        valid_shards = self._open(data, data.valid_shards, "data.valid_shards", tokenizer) if data.valid_shards else []
        sources = sorted({s.source for s in train_shards + valid_shards})
        index = {name: i for i, name in enumerate(sources)}
        train = self._packed(data, train_shards, [index[s.source] for s in train_shards], tokenizer)
        valid = (
            self._packed(data, valid_shards, [index[s.source] for s in valid_shards], tokenizer)
            if valid_shards
            else None
        )
        return train, valid, sources

    # --------------------------------------------------------------------- blend
    def _blend(self, cfg, tokenizer):
        data = cfg.data
        sources = list(data.sources)
        train_sets, valid_sets = [], []
        for i, (name, source) in enumerate(data.sources.items()):
            shards = self._open(data, source.train_shards, f"data.sources.{name}.train_shards", tokenizer)
            train_sets.append(self._packed(data, shards, [i] * len(shards), tokenizer))
            if source.valid_shards:
                shards = self._open(data, source.valid_shards, f"data.sources.{name}.valid_shards", tokenizer)
                valid_sets.append(self._packed(data, shards, [i] * len(shards), tokenizer))
        weights = [s.weight for s in data.sources.values()]
        try:
            train = BlendedDataset(train_sets, sources, weights, cfg.trainer.seed, data.on_exhausted)
            train.check_enough(cfg.trainer.max_steps * cfg.trainer.global_batch_size)
        except SourceExhaustedError as e:
            raise ConfigError(f"data.sources.{e.source}", str(e)) from None
        except ValueError as e:
            raise ConfigError("data.sources", str(e)) from None
        log.info("pretraining blend: %s", train.describe())
        valid = None
        if valid_sets:
            if len(valid_sets) != len(train_sets):
                missing = [n for n, s in data.sources.items() if not s.valid_shards]
                raise ConfigError(
                    f"data.sources.{missing[0]}.valid_shards", "every source of the blend needs valid_shards, or none"
                )
            # Held-out data: the same weights, so the first eval_samples hold every source in
            # proportion; a small valid set simply repeats.
            valid = BlendedDataset(valid_sets, sources, weights, seed=0, on_exhausted="repeat")
        return train, valid, sources

    # ------------------------------------------------------------------- pieces
    @staticmethod
    def _open(data, patterns, key, tokenizer):
        prefixes = resolve_shard_prefixes(data.root, list(patterns), key, data.prepare_hint)
        return open_shards(prefixes, expect_tokenizer_hash=tokenizer.hash)

    @staticmethod
    def _packed(data, shards, shard_sources, tokenizer):
        if data.packing == "documents":
            dataset = DocumentPackedDataset(shards, data.seq_len, tokenizer.pad_id, shard_sources)
            log.info("packing whole documents: %s", dataset.stats)
            return dataset
        return PackedSequenceDataset(shards, data.seq_len, shard_sources)
