"""One way for every benchmark to report: print its markdown table and, with --write, append it
to bench/RESULTS.md (append only: each run's figures stay beside the command that gave them).
And one way to compare against an earlier commit: :func:`checkout` its moss_train, which a
worker subprocess imports through PYTHONPATH (:func:`source_env`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"


def checkout(rev: str, root: Path) -> Path:
    """moss_train/ as of `rev`, extracted under `root`."""
    target = root / rev.replace("/", "_")
    target.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "moss_train"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def source_env(env: dict[str, str], source: Path | None) -> dict[str, str]:
    """`env` for a worker that imports moss_train from `source` (a :func:`checkout`), or from
    this tree where `source` is None."""
    if source is None:
        return env
    return dict(env, PYTHONPATH=os.pathsep.join([str(source), env.get("PYTHONPATH", "")]))


def cpu_line() -> str:
    """The CPU beside every figure: model, the flags that decide its matmul kernels (AMX, AVX512-BF16,
    AVX2 only: bf16 ran 6x fp32 on one, 0.5-4x on another, 1/170 on the third), cores."""
    from moss_train.engine.cpu import cpu_identity

    return f"{cpu_identity()}, {os.cpu_count()} cores"


def publish(lines: list[str], write: bool) -> str:
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        existing = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else "# Benchmark results\n\n"
        RESULTS.write_text(existing + "\n" + text, encoding="utf-8")
    return text
