"""`moss-train`: compose a recipe with Hydra overrides, validate it, run its stage.

moss-train stage=pretrain model=tiny data=pretrain_demo trainer.max_steps=300
python -m moss_train ...                      (the same)
deepspeed --num_gpus 8 -m moss_train ...      (the launcher's --local_rank is accepted)
moss-train --cfg model=moss-16b               (print the composed recipe and exit)
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

USAGE = __doc__


def main(argv: list[str] | None = None) -> int:
    from moss_train.config import parse_recipe_args

    args = parse_recipe_args(sys.argv[1:] if argv is None else argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if args.help:
        print(USAGE)
        return 0

    from moss_train.config import check_paths, compose, to_object, validate
    from moss_train.distributed import launch_rank, stop_with_launcher
    from moss_train.errors import CheckpointError, ConfigError

    stop_with_launcher()
    try:
        composed = compose(args.overrides, args.config_name)
        cfg = to_object(composed)
        validate(cfg)
        if args.print_only:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(composed))
            return 0
        check_paths(cfg)  # before the process group: a missing data root fails in seconds
        from moss_train.distributed import init_distributed, shutdown_distributed
        from moss_train.engine.loop import train
        from moss_train.engine.run_lock import run_directory_lock
        from moss_train.stages import get_stage

        stage = get_stage(cfg.stage.name)
        with run_directory_lock(cfg.run.output_dir) if launch_rank() == 0 else contextlib.nullcontext():
            init_distributed(timeout_s=cfg.cluster.collective_timeout_s)
            stop_on_sigterm()
            train(cfg, with_test_failure(stage))
            shutdown_distributed()
    except ConfigError as error:
        return recipe_failed(error)
    except CheckpointError as error:  # corrupt checkpoint, no disk space: the message says which
        print(f"moss-train: checkpoint error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # anything else that fails this rank must end the whole job
        return rank_failed(error)
    return finished()


def finished() -> int:
    """Status 0; a rank of a job of several leaves without the interpreter's teardown.

    By now its process group is destroyed and its files, wandb run and run lock are closed. But
    torch or DeepSpeed may still hold gloo's worker threads behind a process-group object kept
    alive elsewhere, and the teardown can destroy them while joinable, which aborts the finished
    rank ("terminate called without an active exception", status -6; seen in a test of 2 ranks
    after its "done" line, 2026-12-07). rank_failed leaves the same way."""
    from moss_train.distributed import launch_world_size

    if launch_world_size() <= 1:
        return 0
    leave_now(0)


def leave_now(status: int) -> NoReturn:
    """Exit with `status` at once, skipping the interpreter's teardown (see finished), with what
    this rank printed or logged flushed first."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# How long a rank other than torchrun's local rank 0 waits for it to end their launcher.
LAUNCHER_END_WAIT_S = 10.0


def recipe_failed(error: Exception) -> int:
    """Report a recipe error once, then exit with status 2.

    The error is the same on every rank, so rank 0 prints it and the others stay quiet. torchrun
    answers any failed rank with a report of its own (46 lines that add nothing to a recipe
    error), so under torchrun local rank 0 ends its launcher first, with SIGKILL (every other
    signal torchrun turns into a traceback; the job's status is then 137), and the other ranks
    wait for that before they exit. It ends its sibling ranks just before, with SIGKILL too: one
    still on its way to the same error would otherwise get the launcher's death as a SIGTERM
    (stop_with_launcher) and print a traceback of its own."""
    import signal
    import time

    from moss_train.distributed import child_processes, launch_rank, launch_world_size, torchrun_agent

    if launch_rank() == 0:
        print(f"moss-train: recipe error: {error}", file=sys.stderr, flush=True)
    if launch_world_size() <= 1:
        return 2
    launcher = torchrun_agent()
    if launcher is not None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's death ends this rank quietly
        if os.environ.get("LOCAL_RANK") == "0":
            for sibling in child_processes(launcher):
                if sibling != os.getpid():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(sibling, signal.SIGKILL)
            os.kill(launcher, signal.SIGKILL)
        deadline = time.monotonic() + LAUNCHER_END_WAIT_S
        while os.getppid() == launcher and time.monotonic() < deadline:
            time.sleep(0.05)
    leave_now(2)


class Terminated(Exception):
    """The launcher or the scheduler stopped this rank (SIGTERM)."""


def stop_on_sigterm() -> None:
    """Turn SIGTERM into an exception, so a rank that the launcher stops (because another rank
    failed, or the scheduler preempts the job) still leaves through rank_failed: the reason in
    the log, and its wandb run flushed instead of cut off."""
    import signal

    def handler(signum, frame):
        raise Terminated(
            "stopped by SIGTERM (the launcher ends the job when another rank fails, or the scheduler does)"
        )

    signal.signal(signal.SIGTERM, handler)


def rank_failed(error: Exception) -> int:
    """Say which rank failed and why, then exit non-zero at once.

    The launcher (torchrun, the deepspeed launcher, `srun --kill-on-bad-exit`) sees the status
    and stops the other ranks, which would otherwise wait in a collective for this one. With
    several ranks the exit skips interpreter shutdown (os._exit): tearing down the process group
    or wandb can block on the peers this rank abandoned.
    """
    import signal
    import traceback

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a launcher's SIGTERM must not cut this short
    traceback.print_exc()
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    print(f"[moss-train] rank {rank} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:  # keep what was logged, and mark the run failed
        try:
            wandb.finish(exit_code=1)
        except Exception as wandb_error:  # the exit below matters more than the run's last records
            print(f"[moss-train] rank {rank}: wandb did not finish: {wandb_error}", file=sys.stderr, flush=True)
    from moss_train.distributed import launch_world_size

    if launch_world_size() > 1:
        leave_now(1)
    return 1


# Test hook (tests/test_scaleout.py): "R:S" makes rank R raise in its first micro-batch of
# optimizer step S, to check that the whole job stops and that its next start resumes.
FAIL_AT_STEP_ENV = "MOSS_TEST_FAIL_AT_STEP"


def with_test_failure(stage):
    spec = os.environ.get(FAIL_AT_STEP_ENV)
    if not spec:
        return stage
    rank, step = (int(part) for part in spec.split(":"))
    if int(os.environ.get("RANK", "0")) != rank:
        return stage
    loss = stage.loss

    def failing_loss(ctx, model, batch):
        if model.training and model.global_steps + 1 == step:  # global_steps: steps completed
            raise RuntimeError(f"{FAIL_AT_STEP_ENV}={spec}: injected failure at step {step}")
        return loss(ctx, model, batch)

    stage.loss = failing_loss
    return stage


if __name__ == "__main__":
    sys.exit(main())
