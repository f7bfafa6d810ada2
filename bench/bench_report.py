"""One way for every benchmark to report: print its markdown table and, with --write, append it
to bench/RESULTS.md (append only: each run's figures stay beside the command that gave them)."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def publish(lines: list[str], write: bool) -> str:
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        existing = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else "# Benchmark results\n\n"
        RESULTS.write_text(existing + "\n" + text, encoding="utf-8")
    return text
