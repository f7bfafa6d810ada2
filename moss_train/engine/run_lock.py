"""One job per run directory: a second job on the same ``run.output_dir`` refuses to start.

Two jobs writing one run directory interleave their checkpoints, `latest` pointers and metrics.
The job's rank 0 holds an exclusive ``flock`` on ``RUN_DIR/.moss-train.lock`` for as long as it
runs; the file names the holder (pid, host, start time) for the error message of the next job.
The kernel drops the lock when the holder's process ends, however it ends, so the lock of a
job that was killed is free and simply taken over (its file's text is replaced). On a shared
file system (NFS) ``flock`` is a POSIX lock the server holds, so jobs on different nodes
exclude each other too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from moss_train.errors import ConfigError

LOCK_FILE = ".moss-train.lock"


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"pid {info['pid']} on host {info['host']}, started {started}"
    except (ValueError, KeyError, TypeError, OSError):
        return "a process that has not yet written its name"


@contextlib.contextmanager
def run_directory_lock(output_dir: str | os.PathLike):
    """Hold the run directory's lock inside; ConfigError naming the holder if another job has it."""
    path = Path(output_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                "run.output_dir",
                f"{output_dir} is in use by another job ({_holder(fd)}); wait for it to end, or give this run "
                "another run.output_dir",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode(), 0
        )
        yield path
    finally:
        os.close(fd)  # releases the lock
