"""The picture of a pipeline run: every stage's loss curves (train and held-out), tool use by the
quality level a tag-conditioned model was asked for, and the time each step took.

Reads what the runs wrote themselves: each training run's ``metrics.jsonl`` (one record per
step; held-out records carry ``eval_*`` keys) and the pipeline's ``summary.json``
(launch/quickstart.py). Drawn with matplotlib's file-only Agg backend: no display is needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# Panels per training stage: (title, the metric whose curve is drawn, its axis label).
LOSS_LABEL = "loss (nats per target token)"
STAGE_PANELS = {
    "pretrain": ("Pretraining (EN / ZH / code mix)", "loss", LOSS_LABEL),
    "sft": ("SFT on tool-use dialogues", "loss", LOSS_LABEL),
    "reward": ("Reward model (Bradley-Terry)", "loss", "loss (nats per pair)"),
    "preference": ("Tag-conditioned SFT", "loss", LOSS_LABEL),
    "dpo": ("DPO against the SFT model", "loss", "loss (nats per pair)"),
}


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records) of a run's metrics.jsonl; the records of a step
    logged twice (a resumed run) keep the last."""
    train: dict[int, dict] = {}
    held_out: dict[int, dict] = {}
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        record = json.loads(line)
        if any(key.startswith("eval_") for key in record):
            held_out[record["step"]] = record
        elif "loss" in record:
            train[record["step"]] = record
    return [train[s] for s in sorted(train)], [held_out[s] for s in sorted(held_out)]


def _curve(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def _smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` steps: a noisy per-step curve that still reads at a glance."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_stage(ax, name: str, run_dir: str | Path) -> int:
    """The stage's training curve and held-out points; returns how many points were drawn."""
    title, key, ylabel = STAGE_PANELS[name]
    train, held_out = read_metrics(run_dir)
    steps, values = _curve(train, key)
    window = max(1, len(values) // 30)
    if steps:
        ax.plot(steps, values, color="0.8", linewidth=0.8, label="train (per step)")
        ax.plot(steps, _smoothed(values, window), color="C0", linewidth=1.6, label=f"train ({window}-step mean)")
    eval_keys = sorted(
        {k for r in held_out for k in r if k.startswith(f"eval_{key}_") and not k.startswith("eval_loss_cat_")}
    )
    drawn = len(steps)
    for i, eval_key in enumerate(eval_keys or [f"eval_{key}"]):
        x, y = _curve(held_out, eval_key)
        drawn += len(x)
        if x:
            label = "held-out" + (f" {eval_key[len(f'eval_{key}_') :]}" if eval_keys else "")
            ax.plot(x, y, marker="o", markersize=3, linewidth=1.2, color=f"C{i + 1}", label=label)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return drawn


def plot_quality_levels(ax, comparison: dict) -> int:
    """Share of right answers (± binomial standard error) per requested quality level, with the
    SFT and DPO models beside them."""
    rows = [
        (f"tag {level}", comparison["by_level"][level]) for level in sorted(comparison.get("by_level", {}), key=int)
    ]
    rows += [(name.upper(), comparison[name]) for name in ("sft", "dpo") if name in comparison]
    labels = [label for label, _ in rows]
    rates = [100 * row["right"]["rate"] for _, row in rows]
    errors = [100 * row["right"]["stderr"] for _, row in rows]
    colors = [f"C{2 if label.startswith('tag') else 4}" for label in labels]
    ax.bar(labels, rates, yerr=errors, capsize=3, color=colors)
    answers = rows[0][1]["right"]["n"] if rows else 0
    ax.set_title(f"Held-out tool use by requested quality\n({answers} sampled answers each)")
    ax.set_xlabel("model asked for quality tag (1 = worst) / model")
    ax.set_ylabel("right command and result stated (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    return len(rows)


def plot_times(ax, stages: list[dict]) -> int:
    names = [s["name"] for s in stages]
    seconds = [s["wall_s"] for s in stages]
    ax.barh(names[::-1], seconds[::-1], color="C5")
    total = sum(seconds)
    ax.set_title(f"Wall time per step (total {total / 60:.1f} min)")
    ax.set_xlabel("wall time (s)")
    for y, value in enumerate(seconds[::-1]):
        ax.text(value, y, f" {value:.0f}", va="center", fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    return len(stages)


def draw_report(
    summary: dict, run_dirs: dict[str, str | Path], comparison: dict | None, out: str | Path
) -> dict[str, int]:
    """One PNG at `out`: a loss panel per training stage in `run_dirs` (name -> run directory),
    the quality-level panel (if `comparison` has per-level figures) and the time panel.
    Returns the number of data points (or bars) each panel drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [name for name in STAGE_PANELS if name in run_dirs]
    panels = len(stages) + 1 + bool(comparison and comparison.get("by_level"))
    columns = min(4, panels)
    rows = -(-panels // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.8 * rows), squeeze=False)
    flat = list(axes.flat)
    drawn = {name: plot_stage(ax, name, run_dirs[name]) for ax, name in zip(flat, stages)}
    used = len(stages)
    if comparison and comparison.get("by_level"):
        drawn["quality"] = plot_quality_levels(flat[used], comparison)
        used += 1
    drawn["time"] = plot_times(flat[used], summary["stages"])
    for ax in flat[used + 1 :]:
        ax.axis("off")
    cpu = summary.get("cpu", {})
    fig.suptitle(
        f"moss-train quickstart: {summary.get('wall_s', 0) / 60:.1f} min "
        f"on {cpu.get('cores', '?')} cores of {cpu.get('model', 'a CPU')}"
    )
    fig.tight_layout()
    fig.savefig(Path(out), dpi=110)
    plt.close(fig)
    return drawn
