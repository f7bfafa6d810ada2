"""Training stages by recipe name (`stage=...`)."""

from __future__ import annotations

from moss_train.errors import ConfigError


def get_stage(name: str):
    from moss_train.stages.dpo import DPOStage
    from moss_train.stages.preference import PreferenceStage
    from moss_train.stages.pretrain import PretrainStage
    from moss_train.stages.reward import RewardStage
    from moss_train.stages.sft import SFTStage
    from moss_train.stages.tag import TagStage

    stages = {
        "pretrain": PretrainStage,
        "sft": SFTStage,
        "reward": RewardStage,
        "tag": TagStage,
        "preference": PreferenceStage,
        "dpo": DPOStage,
    }
    if name not in stages:
        raise ConfigError("stage.name", f"unknown stage {name!r}; available: {', '.join(sorted(stages))}")
    return stages[name]()
