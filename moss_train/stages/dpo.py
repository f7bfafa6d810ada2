"""Stage `dpo`: direct preference optimisation on the same pair shards as stage=reward.

The policy starts from ``stage.init_from`` (an SFT checkpoint); the frozen reference is
``preference.reference`` (default: the same checkpoint). Reference log-probabilities are
computed once, in a first pass before training: the reference is a frozen model the stage
declares (``frozen_models``), built by the engine under the run's ZeRO config (engine/setup.py:
frozen_model); every rank scores its share of the pairs, the scores are gathered, and the
engine drops the reference before the policy exists — so a step costs one
forward and backward of the policy, and memory never holds both models' activations. With LoRA
(``lora.r``) there is no second model at all: the reference is the policy with its adapters
disabled (its base, stage.init_from), scoring the pairs once the engine exists.

A response's log-probability sums over the tokens the model generates in the last turn
(moss_train/data/pairs.py). Loss per pair: DPO ``-log sigmoid(beta * h)`` or IPO
``(h - 1/(2 beta))^2`` (``preference.dpo_loss``), h the log-ratio difference; the mean is over
all pairs of the global batch. Reported: ``accuracy`` (h > 0), ``margin`` (beta * h),
``chosen_reward`` / ``rejected_reward`` (beta * the policy/reference log-ratio of each).
"""

from __future__ import annotations

import numpy as np
import torch

from moss_train import losses
from moss_train.data.pairs import PairDataset
from moss_train.distributed import score_sharded
from moss_train.engine.stage import FrozenModel, LossTerms, StageContext, StageData, TrainingStage
from moss_train.stages import lm

REFERENCE = "reference"


class DPOStage(TrainingStage):
    name = "dpo"

    build_model = staticmethod(lm.build_causal_lm)

    def frozen_models(self, ctx: StageContext) -> dict[str, FrozenModel]:
        """The reference, a second model; none with LoRA (the policy with its adapters off)."""
        if ctx.cfg.lora.r:
            return {}
        return {REFERENCE: FrozenModel(lm.build_causal_lm, ctx.cfg.preference.reference or ctx.cfg.stage.init_from)}

    def build_data(self, ctx: StageContext) -> StageData:
        return lm.pair_data(ctx, self.name, count_head_rows=lm.count_label_targets)  # the answers' logits

    def use_frozen_models(self, ctx: StageContext) -> None:
        _score_reference(ctx.frozen[REFERENCE], ctx)

    def use_engine(self, ctx: StageContext) -> None:
        """With LoRA: the reference log-probabilities from the policy with its adapters off."""
        if ctx.cfg.lora.r:
            from moss_train.model.lora import adapters_disabled

            ctx.engine.eval()
            with adapters_disabled(ctx.engine.module):
                _score_reference(ctx.engine, ctx)
            ctx.engine.train()
            if ctx.is_main:
                print(
                    "[moss-train] dpo reference: the policy with its LoRA adapters disabled (no second model)",
                    flush=True,
                )

    def loss(self, ctx: StageContext, model, batch: dict) -> LossTerms:
        beta = ctx.cfg.preference.beta
        policy_chosen, policy_rejected = lm.sequence_logps(model, batch).chunk(2)
        ref = batch["reference"].to(policy_chosen.device)
        h = losses.log_ratio_difference(policy_chosen, policy_rejected, ref[:, 0], ref[:, 1])
        per_pair = losses.dpo(h, beta, ctx.cfg.preference.dpo_loss)
        detached = h.detach().double()
        return LossTerms(
            loss_sum=per_pair.sum(),
            num_targets=torch.tensor(len(h), device=h.device),
            sums={
                "accuracy": (detached > 0).sum().double(),
                "margin": beta * detached.sum(),
                "chosen_reward": beta * (policy_chosen.detach().double() - ref[:, 0]).sum(),
                "rejected_reward": beta * (policy_rejected.detach().double() - ref[:, 1]).sum(),
            },
        )


def _score_reference(model, ctx: StageContext) -> None:
    for dataset in (ctx.data.train, ctx.data.eval):
        if dataset is not None:
            dataset.set_reference(reference_logps(model, dataset, ctx.data.collate, ctx.cfg.trainer.micro_batch_size))


@torch.no_grad()
def reference_logps(model, dataset: PairDataset, collate, micro_batch_size: int) -> np.ndarray:
    """(pairs, 2) log-probabilities of each pair's chosen and rejected response under `model`,
    computed over all ranks (distributed.score_sharded) and held by every rank."""
    device = getattr(model, "device", torch.device("cpu"))

    def score(indices: list[int]) -> list[tuple[float, float]]:
        batch = {name: value.to(device) for name, value in collate([dataset[i] for i in indices]).items()}
        chosen, rejected = lm.sequence_logps(model, batch).double().cpu().chunk(2)
        return list(zip(chosen.tolist(), rejected.tolist()))

    return np.array(score_sharded(len(dataset), micro_batch_size, score), dtype=np.float64).reshape(len(dataset), 2)
