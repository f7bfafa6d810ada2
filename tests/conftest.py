"""Shared fixtures: a small real-text pretraining dataset, and running `moss-train` for real."""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def pytest_configure(config):
    # The suite's MFU peak lives in its own cache file (the tests' runs, and every moss-* command
    # they start, inherit it): their matmuls share the cores, and a figure measured under that
    # load must not become the user's peak (moss_train/engine/metrics.py).
    cache = Path(tempfile.mkdtemp(prefix="moss-train-test-cache-")) / "cpu_matmul_peak.json"
    os.environ["MOSS_TRAIN_PEAK_CACHE"] = str(cache)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if starts_processes(item):
            item.add_marker(pytest.mark.integration)
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# Unit tests run in the pytest process; integration tests start real processes (moss-* commands,
# torchrun / deepspeed launches, a server, a browser). A test is marked integration when its code,
# a test-suite function it calls or a fixture it uses (at any depth) starts one; a test left unit
# that starts a process anyway fails (unit_tests_start_no_process), naming the mark to add.
PROCESS_CALLS = ("run_cli(", "subprocess.", "Popen(")


def starts_processes(item) -> bool:
    if item.get_closest_marker("integration"):
        return True
    fixtures = [
        d.func
        for name, defs in item._fixtureinfo.name2fixturedefs.items()
        if name != "unit_tests_start_no_process"  # the guard itself
        for d in defs
        if _in_test_suite(d.func)
    ]
    return any(_calls_a_process(f) for f in [getattr(item, "function", None), *fixtures] if f is not None)


def _in_test_suite(func) -> bool:
    code = getattr(func, "__code__", None)
    return code is not None and code.co_filename.startswith(str(Path(__file__).parent))


@cache
def _calls_a_process(func) -> bool:
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        return False
    if any(call in source for call in PROCESS_CALLS):
        return True
    return any(_calls_a_process(callee) for callee in _suite_functions_called(func))


def _suite_functions_called(func) -> list:
    """The functions of tests/ that `func`'s code (nested functions included) names."""
    code = getattr(func, "__code__", None)
    names, stack = set(), [code] if code else []
    while stack:
        current = stack.pop()
        names.update(current.co_names)
        stack.extend(c for c in current.co_consts if inspect.iscode(c))
    scope = getattr(func, "__globals__", {})
    return [
        scope[n]
        for n in names
        if inspect.isfunction(scope.get(n)) and scope[n] is not func and _in_test_suite(scope[n])
    ]


@pytest.fixture(autouse=True)
def unit_tests_start_no_process(request, monkeypatch):
    if request.node.get_closest_marker("integration"):
        return

    def refuse(self, args, *rest, **kwargs):
        raise AssertionError(f"a test not marked integration started a process ({args!r}): mark it integration")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory) -> Path:
    """Real EN / ZH / code text → tokenizer → shards, small enough for seconds of work."""
    out = tmp_path_factory.mktemp("pretrain-data")
    run_cli(
        [
            "prepare-pretrain-demo",
            "--out",
            str(out),
            "--en-mb",
            "0.3",
            "--zh-mb",
            "0.3",
            "--code-mb",
            "0.4",
            "--vocab-size",
            "1000",
            "--sample-mb",
            "1",
            "--valid-fraction",
            "0.05",
        ],
        launcher=[str(BIN / "moss-data")],
    )
    return out


def train_overrides(data_dir: Path, output_dir: Path, **extra) -> list[str]:
    """A tiny, fast, deterministic pretraining recipe on the fixture data."""
    settings = {
        "model": "tiny",
        "model.n_embd": 64,
        "model.rotary_dim": 8,
        "data.root": str(data_dir),
        "data.seq_len": 64,
        "run.output_dir": str(output_dir),
        "trainer.micro_batch_size": 2,
        "trainer.global_batch_size": 8,
        "trainer.max_steps": 4,
        "trainer.warmup_steps": 2,
        "trainer.precision": "fp32",
        "trainer.eval_samples": 16,
        "logging.wandb": "disabled",
        "logging.progress_bar": "false",
    }
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]


def cli_env(**extra: str) -> dict:
    """The environment of a clean subprocess (no launcher variables inherited), plus `extra`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_cli(
    args: list[str],
    *,
    launcher: list[str] | None = None,
    timeout: int = 300,
    check: bool = True,
    env: dict | None = None,
):
    """Run a command from the venv's bin (moss-train by default) in a clean subprocess;
    `env`: extra environment variables."""
    command = (launcher or [str(BIN / "moss-train")]) + args
    result = subprocess.run(
        command, cwd=REPO, env=cli_env(**(env or {})), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_metrics(output_dir: Path) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train_losses(output_dir: Path) -> dict[int, dict]:
    """Per-step training records (those with a training loss), by step."""
    return {r["step"]: r for r in read_metrics(output_dir) if "loss" in r}


def process_running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a PID 1 that never reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
