"""Stage `preference`: tag-conditioned SFT (the third MOSS stage, with stage=reward and stage=tag).

The data is what stage=tag wrote to ``{tag run}/conditioned/shards``: one conversation per
scored turn, its quality tag as a line of the meta instruction (``- Response quality: 4/5``,
``preference.quality_template`` at tagging time), loss on that turn only. Training is SFT's
(stages/dialogue.py, shared with stage=sft) on those shards; the stage checks that they carry
tags and keeps the tag form with the run (``quality.json``: levels, template, thresholds), so
inference asks for a tag the way training saw it (``moss_train.format.with_quality``; moss-chat
``--quality``, default the best level).
"""

from __future__ import annotations

import json
from pathlib import Path

from moss_train import format as fmt
from moss_train.engine.stage import LossTerms, StageContext, StageData, TrainingStage
from moss_train.errors import ConfigError
from moss_train.stages import dialogue, lm


class PreferenceStage(TrainingStage):
    name = "preference"

    build_model = staticmethod(lm.build_causal_lm)

    def build_data(self, ctx: StageContext) -> StageData:
        quality = tag_form(ctx)
        if ctx.is_main:
            out = Path(ctx.cfg.run.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / fmt.QUALITY_FILE).write_text(json.dumps(quality, indent=1) + "\n")
        return dialogue.dialogue_data(ctx, self.name)

    def loss(self, ctx: StageContext, model, batch: dict) -> LossTerms:
        return dialogue.dialogue_loss(ctx, model, batch)


def tag_form(ctx: StageContext) -> dict:
    """The tag form of the data (every shard must carry the same one)."""
    found = {}
    for key in ("data.train_shards", "data.valid_shards"):
        patterns = getattr(ctx.cfg.data, key.split(".")[1])
        for shard in dialogue.dialogue_shards(ctx.cfg, patterns, key, ctx.tokenizer) if patterns else []:
            quality = shard.manifest.get("provenance", {}).get("quality")
            if quality is None:
                raise ConfigError(
                    key,
                    f"shard {shard.prefix!r} carries no quality tags: "
                    "stage=preference trains on {stage=tag run}/conditioned/shards",
                )
            found[shard.prefix] = quality
    forms = {json.dumps(q, sort_keys=True) for q in found.values()}
    if len(forms) > 1:
        raise ConfigError("data.train_shards", f"the shards were tagged differently: {sorted(forms)}")
    return next(iter(found.values()))
