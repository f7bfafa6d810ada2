"""Stage `sft`: supervised fine-tuning on rendered MOSS dialogues (shards with a mask stream).

Data comes from ``moss-data sft`` (one shard per split and category: records parsed by
moss_train/data/parsing.py, rendered by moss_train/data/rendering.py; datasets in
moss_train/data/sft.py). The loss is next-token cross-entropy on the tokens the recipe's
``sft.loss_mask`` selects; evaluation adds token accuracy on those tokens, and both per
category (``loss_cat_<name>``, ``accuracy_cat_<name>``) where the data has categories
(stages/dialogue.py, shared with stage=preference).
"""

from __future__ import annotations

from moss_train.engine.stage import LossTerms, StageContext, StageData, TrainingStage
from moss_train.stages import dialogue, lm


class SFTStage(TrainingStage):
    name = "sft"

    build_model = staticmethod(lm.build_causal_lm)

    def build_data(self, ctx: StageContext) -> StageData:
        return dialogue.dialogue_data(ctx, self.name)

    def loss(self, ctx: StageContext, model, batch: dict) -> LossTerms:
        return dialogue.dialogue_loss(ctx, model, batch)
