"""Stage `preference`: tag-conditioned SFT (the third MOSS stage, with stage=reward and stage=tag).

The data is what stage=tag wrote to ``{tag run}/conditioned/shards``: one conversation per
scored turn, its quality tag as a line of the meta instruction (``- Response quality: 4/5``,
``preference.quality_template`` at tagging time), loss on that turn only. Training is SFT
(stages/sft.py) on those shards; the stage checks that they carry tags and keeps the tag
form with the run (``quality.json``: levels, template, thresholds), so inference asks for a
tag the way training saw it (``moss_train.format.with_quality``; moss-chat ``--quality``,
default the best level).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from moss_train import format as fmt
from moss_train.engine.stage import StageData
from moss_train.errors import ConfigError
from moss_train.stages.sft import SFTStage


class PreferenceStage(SFTStage):
    name = "preference"

    def build_data(self, cfg, tokenizer) -> StageData:
        quality = self._quality(cfg, tokenizer)
        if not dist.is_initialized() or dist.get_rank() == 0:
            out = Path(cfg.run.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / fmt.QUALITY_FILE).write_text(json.dumps(quality, indent=1) + "\n")
        return super().build_data(cfg, tokenizer)

    def _quality(self, cfg, tokenizer) -> dict:
        """The tag form of the data (every shard must carry the same one)."""
        found = {}
        for key in ("data.train_shards", "data.valid_shards"):
            patterns = getattr(cfg.data, key.split(".")[1])
            for shard in self._shards(cfg, patterns, key, tokenizer) if patterns else []:
                quality = shard.manifest.get("provenance", {}).get("quality")
                if quality is None:
                    raise ConfigError(key, f"shard {shard.prefix!r} carries no quality tags: stage=preference trains on {{stage=tag run}}/conditioned/shards")
                found[shard.prefix] = quality
        forms = {json.dumps(q, sort_keys=True) for q in found.values()}
        if len(forms) > 1:
            raise ConfigError("data.train_shards", f"the shards were tagged differently: {sorted(forms)}")
        return next(iter(found.values()))
