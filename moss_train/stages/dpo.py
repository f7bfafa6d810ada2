"""Stage `dpo`: direct preference optimisation on the same pair shards as stage=reward.

The policy starts from ``stage.init_from`` (an SFT checkpoint); the frozen reference is
``preference.reference`` (default: the same checkpoint). Reference log-probabilities are
computed once, in a first pass before training: the reference is built under the run's ZeRO
config (engine/setup.py: frozen_model), every rank scores its share of the pairs, the scores
are gathered, and the reference is dropped before the policy exists — so a step costs one
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
from moss_train.engine.stage import LossTerms, StageData
from moss_train.stages import lm
from moss_train.stages.reward import pair_data, score_sharded


class DPOStage:
    name = "dpo"

    load_tokenizer = staticmethod(lm.load_tokenizer)
    build_model = staticmethod(lm.build_causal_lm)

    def __init__(self):
        self.beta = 0.1
        self.variant = "sigmoid"
        self.frozen_model = None

    def use_frozen_models(self, frozen_model) -> None:
        self.frozen_model = frozen_model  # engine/setup.py: frozen_model(build, init_from)

    def build_data(self, cfg, tokenizer) -> StageData:
        self.beta, self.variant = cfg.preference.beta, cfg.preference.dpo_loss
        self.data = data = pair_data(cfg, tokenizer, self.name)
        if not cfg.lora.r:  # LoRA: the reference is the policy's base, scored in use_engine
            reference = self.frozen_model(lm.build_causal_lm, cfg.preference.reference or cfg.stage.init_from)
            self._score_reference(reference, cfg.trainer.micro_batch_size)
            del reference
        return data

    def use_engine(self, engine, cfg) -> None:
        """With LoRA: the reference log-probabilities from the policy with its adapters off."""
        if cfg.lora.r:
            from moss_train.model.lora import adapters_disabled

            engine.eval()
            with adapters_disabled(engine.module):
                self._score_reference(engine, cfg.trainer.micro_batch_size)
            engine.train()
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                print("[moss-train] dpo reference: the policy with its LoRA adapters disabled (no second model)", flush=True)

    def _score_reference(self, model, micro_batch_size: int) -> None:
        for dataset in (self.data.train, self.data.eval):
            if dataset is not None:
                dataset.set_reference(reference_logps(model, dataset, self.data.collate, micro_batch_size))

    def loss(self, model, batch: dict) -> LossTerms:
        policy_chosen, policy_rejected = lm.sequence_logps(model, batch).chunk(2)
        ref = batch["reference"].to(policy_chosen.device)
        h = losses.log_ratio_difference(policy_chosen, policy_rejected, ref[:, 0], ref[:, 1])
        per_pair = losses.dpo(h, self.beta, self.variant)
        detached = h.detach().double()
        return LossTerms(
            loss_sum=per_pair.sum(),
            num_targets=torch.tensor(len(h), device=h.device),
            sums={
                "accuracy": (detached > 0).sum().double(),
                "margin": self.beta * detached.sum(),
                "chosen_reward": self.beta * (policy_chosen.detach().double() - ref[:, 0]).sum(),
                "rejected_reward": self.beta * (policy_rejected.detach().double() - ref[:, 1]).sum(),
            },
        )


@torch.no_grad()
def reference_logps(model, dataset: PairDataset, collate, micro_batch_size: int) -> np.ndarray:
    """(pairs, 2) log-probabilities of each pair's chosen and rejected response under `model`,
    computed over all ranks (stages/reward.py: score_sharded) and held by every rank."""
    device = getattr(model, "device", torch.device("cpu"))

    def score(indices: list[int]) -> list[tuple[float, float]]:
        batch = {name: value.to(device) for name, value in collate([dataset[i] for i in indices]).items()}
        chosen, rejected = lm.sequence_logps(model, batch).double().cpu().chunk(2)
        return list(zip(chosen.tolist(), rejected.tolist()))

    return np.array(score_sharded(len(dataset), micro_batch_size, score), dtype=np.float64).reshape(len(dataset), 2)
