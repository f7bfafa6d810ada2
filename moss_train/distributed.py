"""Process-group set-up and the few collectives the training loop needs.

One code path for every launch: a plain `moss-train` (one process, no launcher), the
`deepspeed` launcher, torchrun or SLURM's srun all end here. NCCL is chosen when CUDA is
present, gloo otherwise, so the same recipe runs on a laptop and a cluster.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _adopt_slurm_env() -> None:
    """Under `srun` (no launcher), derive torch's rendezvous variables from SLURM's."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])


def launch_rank() -> int:
    """This process's global rank as its launcher set it (0 without a launcher), readable
    before any process group exists."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def launch_world_size() -> int:
    """How many ranks the launcher started (1 without a launcher), readable before any process
    group exists and after it is destroyed."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def under_torchrun() -> bool:
    """Started by torchrun's agent (its worker processes carry TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


LAUNCHERS = (b"torchrun", b"torch.distributed.run", b"deepspeed.launcher.launch")


def _launcher_parent() -> int | None:
    """The pid of the launcher that started this process (its parent), else None."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as handle:
            command = handle.read().replace(b"\0", b" ")
    except OSError:
        return None
    return parent if any(name in command for name in LAUNCHERS) else None


def torchrun_agent() -> int | None:
    """The pid of the torchrun agent that started this process, else None."""
    return _launcher_parent() if under_torchrun() else None


def child_processes(pid: int) -> list[int]:
    """The pids whose parent is `pid` (read from /proc; empty where there is none)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the name may hold spaces
        except (OSError, IndexError, ValueError):  # it ended while we looked
            continue
        if parent == pid:
            found.append(int(stat.parent.name))
    return found


PR_SET_PDEATHSIG = 1


def stop_with_launcher() -> None:
    """A rank started by torchrun or the deepspeed launcher ends when its launcher dies.

    torchrun starts each rank in a session of its own, so killing the launcher's process group
    (what a scheduler or a user's kill does) never reached the ranks: they trained on to the end
    and wrote checkpoints. The kernel now sends the rank SIGTERM when its parent dies
    (PR_SET_PDEATHSIG), which ends it through the CLI's failure path. Plain runs (no launcher)
    and srun's tasks are left alone: their parent is a shell or slurmstepd, and a training run
    under nohup must outlive its shell."""
    if not (under_torchrun() or "CROSS_RANK" in os.environ):  # CROSS_RANK: deepspeed's launch.py
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # not Linux: nothing to set
        return
    if _launcher_parent() is None:  # it died before the signal was armed: the job is over
        raise SystemExit(1)


def backend_name() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def quiet_third_party_logs() -> None:
    """Keep the console for moss-train's own progress: DeepSpeed's INFO lines and torch's
    deprecation notices from inside DeepSpeed say nothing a user can act on."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


# How long a collective waits for the other ranks before failing. Finite, so a rank that died
# without its launcher noticing ends the job instead of hanging it; long enough for rank 0 to
# read a 16B checkpoint while the others wait. Recipes set it with cluster.collective_timeout_s.
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800


def _skip_shared_memory_collectives() -> None:
    """One CPU process has no peer to reduce with, so DeepSpeed's shared-memory collectives op is
    not built: its first build costs a fresh environment about a minute of compiling (every
    quickstart on a new clone), for collectives that never leave the process. The op is marked
    incompatible in DeepSpeed's own table of compatible ops, which its comm backend consults."""
    from deepspeed import ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        ops.__compatible_ops__[builder.NAME] = False


def init_distributed(timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> DistInfo:
    """Initialise the default process group (idempotent: the first call's timeout holds) and
    return this process's place in it."""
    quiet_third_party_logs()
    _adopt_slurm_env()
    if "RANK" not in os.environ:  # a single process started without a launcher
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        import deepspeed

        if os.environ.get("WORLD_SIZE") == "1" and not torch.cuda.is_available():
            _skip_shared_memory_collectives()
        deepspeed.init_distributed(
            dist_backend=backend_name(), auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s)
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))),
        device=device,
    )


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a small vector of numbers over all ranks, in float64 so token counts stay exact."""
    tensor = torch.as_tensor(values, dtype=torch.float64, device=device).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown_distributed() -> None:
    """End a finished job's process group on every rank together: a process that exits with it
    still up leaves gloo's worker threads to the interpreter's teardown, which can abort the
    process ("terminate called without an active exception", exit -6) after its work is done."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (small picklable values), in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def rank_batches(n: int, micro_batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's micro-batches of items 0..n-1: every world_size-th micro-batch, in order.

    Every rank gets the same number of them, because a ZeRO-3 forward is collective (each layer's
    parameters are gathered from all ranks): in the last pass a rank left without items gets an
    empty list, and must still run a forward (on any item) and drop its result."""
    passes = -(-n // (micro_batch_size * world_size))
    starts = ((p * world_size + rank) * micro_batch_size for p in range(passes))
    return [list(range(start, min(start + micro_batch_size, n))) for start in starts]


def score_sharded(n: int, micro_batch_size: int, score_batch) -> list:
    """`score_batch(indices) -> one result per index` over items 0..n-1, spread over the ranks
    (rank_batches; a rank with nothing left scores item 0 and drops it). The results are
    gathered, so every rank returns all n of them in order."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine: dict[int, object] = {}
    for indices in rank_batches(n, micro_batch_size, rank, world):
        mine.update(zip(indices, score_batch(indices or [0])))
    merged: dict[int, object] = {}
    for part in all_gather_objects(mine):
        merged.update(part)
    return [merged[i] for i in range(n)]
