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

import json
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from moss_train import losses
from moss_train.data.pairs import PairDataset, collate_pairs, count_pairs, pairs_path
from moss_train.data.shards import open_shards
from moss_train.engine.stage import LossTerms, StageData
from moss_train.errors import ConfigError
from moss_train.model.reward import RewardModel
from moss_train.stages import lm


def build_reward_model(cfg, tokenizer) -> RewardModel:
    return RewardModel(lm.resolve_model_config(cfg, tokenizer))


def open_pair_shards(cfg, patterns, key: str, tokenizer) -> list:
    prefixes = lm.resolve_shards(cfg.data.root, patterns, key, cfg.data.prepare_hint)
    shards = open_shards(prefixes, expect_tokenizer_hash=tokenizer.hash)
    for shard in shards:
        if not shard.has_mask or not pairs_path(shard.prefix).is_file():
            raise ConfigError(key, f"{shard.prefix!r} is not a pair shard (mask stream + {pairs_path(shard.prefix).name}) written by moss-data pairs")
    return shards


def pair_data(cfg, tokenizer, stage_name: str) -> StageData:
    """Train and held-out pairs fitted to data.seq_len, as batches of chosen + rejected rows."""
    data = cfg.data
    if not data.train_shards:
        raise ConfigError("data.train_shards", f"stage={stage_name} reads pair shards (moss-data pairs) from data.train_shards")
    fit = partial(PairDataset, max_length=data.seq_len)
    train = fit(open_pair_shards(cfg, data.train_shards, "data.train_shards", tokenizer))
    valid = fit(open_pair_shards(cfg, data.valid_shards, "data.valid_shards", tokenizer)) if data.valid_shards else None
    report = {"train": train.report.as_dict(), "valid": valid.report.as_dict() if valid else None}
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[moss-train] {stage_name} pairs (seq_len {data.seq_len}): {report}", flush=True)
        out = Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "pair_data.json").write_text(json.dumps({"seq_len": data.seq_len, **report}, indent=1) + "\n")
    if len(train) == 0:
        raise ConfigError("data.seq_len", f"no training pair fits in {data.seq_len} tokens: {report['train']}")
    return StageData(
        train=train,
        eval=valid if valid is not None and len(valid) else None,
        collate=partial(collate_pairs, pad_id=tokenizer.pad_id),
        count_targets=count_pairs,
        tokens_per_sample=max(1, round(2 * train.mean_length)),  # both responses of a pair
    )


class RewardStage:
    name = "reward"

    load_tokenizer = staticmethod(lm.load_tokenizer)
    build_model = staticmethod(build_reward_model)

    def __init__(self):
        self.margin_scale = 0.0

    def build_data(self, cfg, tokenizer) -> StageData:
        self.margin_scale = cfg.preference.margin_scale
        return pair_data(cfg, tokenizer, self.name)

    def loss(self, model, batch: dict) -> LossTerms:
        rewards = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], read_positions=batch["read_positions"]
        ).float()
        chosen, rejected = rewards.chunk(2)
        per_pair = losses.bradley_terry(chosen, rejected, self.margin_scale * batch["margin"])
        difference = (chosen - rejected).detach()
        return LossTerms(
            loss_sum=per_pair.sum(),
            num_targets=torch.tensor(len(chosen), device=rewards.device),
            sums={"accuracy": (difference > 0).sum().double(), "margin": difference.sum().double()},
        )


def score_sharded(n: int, micro_batch_size: int, score_batch) -> list:
    """`score_batch(indices) -> one result per index` over items 0..n-1, spread over the ranks:
    each rank takes every world_size-th micro-batch; all ranks run the same number of batches
    (a ZeRO-3 forward is collective; a rank with nothing left repeats the first items and drops
    the result). The results are gathered, so every rank returns all n of them in order."""
    import math

    from moss_train.distributed import all_gather_objects

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine: dict[int, object] = {}
    for p in range(math.ceil(n / (micro_batch_size * world))):
        start = (p * world + rank) * micro_batch_size
        indices = list(range(start, min(start + micro_batch_size, n)))
        results = score_batch(indices or list(range(min(micro_batch_size, n))))
        mine.update(zip(indices, results))
    merged: dict[int, object] = {}
    for part in all_gather_objects(mine):
        merged.update(part)
    return [merged[i] for i in range(n)]
