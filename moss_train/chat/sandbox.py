"""Tool work on hostile input, in a worker process with a time limit and a memory cap.

The calculator and the equation solver parse model-written text with a whitelisting parser
(no code runs), but sympy can still take unbounded time on inputs that parse fine — ``solve``
on a high-degree polynomial or on fractional powers never returns. So the work runs in a
separate process: the caller waits at most ``timeout_s``; a worker that overruns is killed
(and a fresh one started for the next call), and its address space is capped so a memory
bomb fails inside the worker with MemoryError instead of taking the machine down.

The worker is started once (``spawn``: no state of a multi-threaded parent is forked) and
reused, so a call costs a round trip through a pipe, not a process start. Only functions named
by the code that builds a plugin (``"module:function"``) run there; the model's text is only
ever their string argument.

The worker dies with its parent, however the parent ends (SIGKILL and SIGTERM run no atexit
hook): a thread in the worker waits on multiprocessing's parent sentinel, a pipe whose other end
closes when the parent is gone, and ends the worker then, even in the middle of a tool call.
(``PR_SET_PDEATHSIG`` would fire when the parent *thread* that started the worker ends, and
callers such as a threaded server start it from short-lived threads.)
"""

from __future__ import annotations

import atexit
import importlib
import multiprocessing
import multiprocessing.connection
import os
import threading
from typing import Optional

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_MB = 2048
STARTUP_TIMEOUT_S = 120.0  # spawning and importing sympy on a loaded machine; not the tool's time


class ToolError(RuntimeError):
    """A tool could not answer; the message says why (shown to the user, logged)."""


def resolve(target: str):
    """The function a ``"module:function"`` string names."""
    module, _, name = target.partition(":")
    if not module or not name:
        raise ValueError(f"{target!r} is not 'module:function'")
    return getattr(importlib.import_module(module), name)


def _limit_memory(megabytes: int) -> None:
    try:
        import resource

        limit = megabytes << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):  # not Linux / not permitted: time limit only
        pass


def _exit_with_parent() -> None:
    """End this process as soon as its parent is gone (see the module docstring)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="moss-tools-parent-watch").start()


def _serve(conn, memory_mb: int, preload: tuple[str, ...]) -> None:
    """The worker: import the tools, cap memory, then answer (target, argument) requests."""
    _exit_with_parent()
    functions = {target: resolve(target) for target in preload}
    _limit_memory(memory_mb)
    conn.send(("ready", None))
    while True:
        try:
            target, argument = conn.recv()
        except (EOFError, OSError):
            return
        try:
            function = functions.get(target) or functions.setdefault(target, resolve(target))
            conn.send(("ok", function(argument)))
        except MemoryError:
            conn.send(("error", "ran out of memory"))
        except Exception as error:  # the tool's own failure: its message is the answer's reason
            conn.send(("error", str(error)[:300] or type(error).__name__))


class Sandbox:
    """One reusable worker process; :meth:`call` is thread-safe (calls run one at a time)."""

    def __init__(
        self, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB, preload: tuple[str, ...] = ()
    ):
        self.timeout_s, self.memory_mb, self.preload = timeout_s, memory_mb, preload
        self._process = None
        self._conn = None
        self._lock = threading.Lock()
        self.restarts = 0  # workers killed for overrunning or dying (for tests and logs)

    def call(self, target: str, argument: str, timeout_s: Optional[float] = None) -> str:
        """`target(argument)` in the worker; raises ToolError on its failure or on a timeout."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            conn = self._worker()
            conn.send((target, argument))
            if not conn.poll(limit):
                self._stop()
                raise ToolError(f"took longer than {limit:.3g} s")
            try:
                status, value = conn.recv()
            except (EOFError, OSError):
                self._stop()
                raise ToolError("the tool's worker process died") from None
        if status != "ok":
            raise ToolError(value)
        return value

    def _worker(self):
        if self._process is not None and self._process.is_alive():
            return self._conn
        if self._process is not None:
            self._stop()
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child, self.memory_mb, self.preload), daemon=True, name="moss-tools"
        )
        self._process.start()
        child.close()
        self._conn = parent
        if not parent.poll(STARTUP_TIMEOUT_S):
            self._stop()
            raise ToolError("the tool worker did not start")
        parent.recv()  # ("ready", None)
        return parent

    def _stop(self) -> None:
        """Kill the worker (if any); the next call starts a fresh one."""
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(5)
            self.restarts += 1
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn = None, None

    def close(self) -> None:
        with self._lock:
            if self._process is not None:
                self._stop()
                self.restarts -= 1  # a clean shutdown is not a restart


_DEFAULT: Optional[Sandbox] = None


def default_sandbox() -> Sandbox:
    """The process-wide sandbox the built-in tools share (started on first use)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Sandbox(
            preload=("moss_train.chat.plugins:calculate_or_raise", "moss_train.chat.plugins:solve_or_raise")
        )
        atexit.register(_DEFAULT.close)
    return _DEFAULT
