"""Stage `reward`: a reward model from preference pairs (Bradley-Terry, optional margin).

The model is the SFT backbone with a scalar head (moss_train/model/reward.py), started from an
SFT checkpoint by ``stage.init_from`` (its ``lm_head`` stays unused; the head starts fresh). Each
response is scored at its last token — the end of the compared assistant turn — and the loss
per pair is ``-log sigmoid(r_chosen - r_rejected - preference.margin_scale * margin)``.
The loss is the mean over all pairs of the global batch (LossTerms counts pairs). Reported:
``accuracy`` (share of pairs ranked right) and ``margin`` (mean r_chosen - r_rejected), on the
held-out pairs as ``eval_accuracy`` and ``eval_margin``.

Data: pair shards written by ``moss-data pairs`` (moss_train/data/pairs.py), from data.train_shards.
"""

from __future__ import annotations

import torch

from moss_train import losses
from moss_train.engine.stage import LossTerms, StageContext, StageData, TrainingStage
from moss_train.stages import lm


class RewardStage(TrainingStage):
    name = "reward"

    build_model = staticmethod(lm.build_reward_model)

    def build_data(self, ctx: StageContext) -> StageData:
        return lm.pair_data(ctx, self.name, count_head_rows=lm.no_head_rows)

    def loss(self, ctx: StageContext, model, batch: dict) -> LossTerms:
        rewards = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], read_positions=batch["read_positions"]
        ).float()
        chosen, rejected = rewards.chunk(2)
        per_pair = losses.bradley_terry(chosen, rejected, ctx.cfg.preference.margin_scale * batch["margin"])
        difference = (chosen - rejected).detach()
        return LossTerms(
            loss_sum=per_pair.sum(),
            num_targets=torch.tensor(len(chosen), device=rewards.device),
            sums={"accuracy": (difference > 0).sum().double(), "margin": difference.sum().double()},
        )
