"""Training metrics: a JSONL log (one object per logged step) and a PNG plot of its curves."""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from zeda_core.atomic import atomic_write_text
from zeda_core.checkpoint import save_model


class MetricsLog:
    """Append-only JSONL log; on resume, records after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= resume_step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.is_file() else []


def plot_metrics(records: list[dict[str, Any]], keys: list[str], png: Path, title: str) -> None:
    """One panel per metric against ``step``; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in keys if any(isinstance(r.get(k), int | float) for r in records)]
    if not present:
        return
    fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.2 * len(present)), sharex=True, squeeze=False)
    for axis, key in zip(axes[:, 0], present, strict=True):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        axis.plot([p[0] for p in points], [p[1] for p in points])
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)


def save_trained_model(
    model: torch.nn.Module,
    out: Path,
    side_files_from: Path,
    log: MetricsLog,
    curves: list[str],
    plot_path: Path,
    title: str,
    summary: dict[str, Any],
) -> Path:
    """Write a stage's final model (atomically), its curve plot, and ``training.json`` beside the weights.

    ``summary`` gets the command line and the last logged record added.
    """
    model.eval()
    written = save_model(model, out, overwrite=True, side_files_from=side_files_from)
    records = log.records()
    plot_metrics(records, curves, plot_path, title)
    summary = {"command": shlex.join(["zeda", *sys.argv[1:]]) if sys.argv else ""} | summary
    summary["final"] = records[-1] if records else None
    atomic_write_text(written / "training.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return written
