"""Training stages by recipe name (`stage=...`)."""

from __future__ import annotations

from moss_train.errors import ConfigError


def get_stage(name: str):
    from moss_train.stages.pretrain import PretrainStage
    from moss_train.stages.sft import SFTStage

    stages = {"pretrain": PretrainStage, "sft": SFTStage}
    if name not in stages:
        raise ConfigError("stage.name", f"unknown stage {name!r}; available: {', '.join(sorted(stages))}")
    return stages[name]()
