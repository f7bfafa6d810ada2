"""`moss-train`: compose a recipe with Hydra overrides, validate it, run its stage.

    moss-train stage=pretrain model=tiny data=pretrain_demo trainer.max_steps=300
    python -m moss_train ...                      (the same)
    deepspeed --num_gpus 8 -m moss_train ...      (the launcher's --local_rank is accepted)
    moss-train --cfg model=moss-16b               (print the composed recipe and exit)
"""

from __future__ import annotations

import os
import sys

USAGE = __doc__


def split_launcher_args(argv: list[str]) -> tuple[list[str], int | None]:
    """Remove `--local_rank=N` / `--local_rank N` (added by the deepspeed launcher) from argv."""
    rest, local_rank, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(("--local_rank=", "--local-rank=")):
            local_rank = int(arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            local_rank = int(argv[i + 1])
            i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, local_rank


def main(argv: list[str] | None = None) -> int:
    args, local_rank = split_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    print_only = "--cfg" in args
    config_name = "config"
    overrides = []
    for arg in args:
        if arg.startswith("--config-name="):
            config_name = arg.split("=", 1)[1]
        elif arg != "--cfg":
            overrides.append(arg)

    from moss_train.config import compose, to_object, validate
    from moss_train.errors import ConfigError

    try:
        composed = compose(overrides, config_name)
        cfg = to_object(composed)
        validate(cfg)
        if print_only:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(composed))
            return 0
        from moss_train.engine.loop import train
        from moss_train.stages import get_stage

        stage = get_stage(cfg.stage.name)
        train(cfg, stage)
    except ConfigError as error:
        print(f"moss-train: recipe error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
