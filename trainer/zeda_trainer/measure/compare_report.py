"""The outputs of ``zeda compare``: table (Markdown + JSON), Pareto plot (PNG + self-contained HTML), margins.

The margin of ZEDA over a baseline is measured at ZEDA's own FLOP level: the baseline's accuracy
there is interpolated along its points when they span that level; when the baseline cannot
save that much, its most-saving point is used, which spends more FLOPs than ZEDA (a comparison
in the baseline's favour).
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
from dataclasses import asdict, dataclass

from zeda_core.atomic import atomic_write_text
from zeda_trainer.measure.compare import CompareConfig, Point

BASELINES = ("dynamic-skip", "top-p", "adamoe")
COLOURS = {
    "teacher": "#444444",
    "zeda": "#d62728",
    "zeda-dial": "#ff9896",
    "dynamic-skip": "#1f77b4",
    "top-p": "#2ca02c",
    "adamoe": "#9467bd",
}


@dataclass(frozen=True)
class Margin:
    """ZEDA model ``zeda`` against one baseline at the ZEDA model's FLOP saving."""

    zeda: str
    baseline: str
    flops_saved: float
    zeda_accuracy: float
    baseline_accuracy: float
    how: str

    @property
    def margin(self) -> float:
        return self.zeda_accuracy - self.baseline_accuracy


def baseline_accuracy_at(points: list[Point], saved: float) -> tuple[float, str]:
    """(accuracy, how it was read) of one method's points at ``saved`` expert-FLOP share."""
    ordered = sorted(points, key=lambda p: p.flops_saved)
    for low, high in itertools.pairwise(ordered):
        if low.flops_saved <= saved <= high.flops_saved:
            span = high.flops_saved - low.flops_saved
            t = (saved - low.flops_saved) / span if span else 0.0
            accuracy = low.accuracy + t * (high.accuracy - low.accuracy)
            return accuracy, f"interpolated between {low.knob} and {high.knob}"
    if saved > ordered[-1].flops_saved:
        best = ordered[-1]
        return best.accuracy, f"{best.knob}: saves only {best.flops_saved:.1%} (more FLOPs than ZEDA)"
    first = ordered[0]
    return first.accuracy, f"{first.knob}: saves {first.flops_saved:.1%} (fewer FLOPs than ZEDA)"


def margins(points: list[Point]) -> list[Margin]:
    """ZEDA's accuracy margin over each baseline, for every ZEDA point."""
    result = []
    for zeda in (p for p in points if p.method == "zeda"):
        for method in BASELINES:
            own = [p for p in points if p.method == method]
            if own:
                accuracy, how = baseline_accuracy_at(own, zeda.flops_saved)
                result.append(Margin(zeda.knob, method, zeda.flops_saved, zeda.accuracy, accuracy, how))
    return result


def markdown_table(points: list[Point], found: list[Margin], config: CompareConfig) -> str:
    header = ["method", "knob", "expert FLOPs saved (skills)", "saved (text)", "real experts / token"]
    header += ["mean skill accuracy"]
    header += ["KL to teacher (nats/token)", "perplexity"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for p in points:
        lines.append(
            f"| {p.method} | {p.knob} | {p.flops_saved:.1%} | {p.flops_saved_text:.1%} | {p.real_experts:.2f} "
            f"| {p.accuracy:.3f} "
            f"| {p.kl:.4f} | {p.perplexity:.2f} |"
        )
    lines += ["", "| ZEDA model | baseline | at saving | ZEDA accuracy | baseline accuracy | margin | how |"]
    lines.append("|---|---|---|---|---|---|---|")
    for m in found:
        lines.append(
            f"| {m.zeda} | {m.baseline} | {m.flops_saved:.1%} | {m.zeda_accuracy:.3f} | {m.baseline_accuracy:.3f} "
            f"| {m.margin:+.3f} | {m.how} |"
        )
    source = (
        f"teacher `{config.teacher}`, {config.eval_per_skill} eval items per skill, {config.text_windows} text windows"
    )
    items = points[0].items if points else 0
    noise = (
        f" One accuracy over {items} items has a binomial standard error of about "
        f"{math.sqrt(0.7 * 0.3 / items):.3f} at 0.7: a margin that small is a tie."
        if items
        else ""
    )
    return "\n".join(lines) + f"\n\nMeasured on {source}.{noise}\n"


def pareto_png(points: list[Point]) -> bytes:
    """Accuracy against the saving on the skills traffic, KL against the saving on the text it is measured on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(p.method for p in points):
        own = sorted((p for p in points if p.method == method), key=lambda p: p.flops_saved)
        style = {"color": COLOURS.get(method, "black"), "label": method, "marker": "o"}
        left.plot([100 * p.flops_saved for p in own], [p.accuracy for p in own], **style)
        right.plot([100 * p.flops_saved_text for p in own], [p.kl for p in own], **style)
    left.set(xlabel="expert FLOPs saved on the skills traffic (%)", ylabel="mean skill accuracy")
    right.set(xlabel="expert FLOPs saved on the validation text (%)", ylabel="KL(teacher || model) on that text")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    left.legend()
    figure.suptitle("Quality against expert FLOPs saved")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def html_page(table_markdown: str, png: bytes) -> str:
    """A self-contained page: the plot inlined as base64, the tables as HTML; nothing fetched."""
    rows = []
    for block in table_markdown.strip().split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|") and not line.startswith("|---")]
        if not lines:
            rows.append(f"<p>{html.escape(block)}</p>")
            continue
        cells = [[html.escape(c.strip()) for c in line.strip("|").split("|")] for line in lines]
        head = "".join(f"<th>{c}</th>" for c in cells[0])
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
        rows.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    image = base64.b64encode(png).decode()
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>ZEDA compare</title>"
        f"<style>{style}</style></head><body><h1>Quality against expert FLOPs saved</h1>"
        f"<img id='pareto' alt='Pareto plot' src='data:image/png;base64,{image}'>{''.join(rows)}</body></html>\n"
    )


def write_report(points: list[Point], config: CompareConfig) -> None:
    """``compare.md``, ``compare.json``, ``pareto.png`` and ``compare.html`` in ``config.out``."""
    found = margins(points)
    table = markdown_table(points, found, config)
    png = pareto_png(points)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    record = {"points": [asdict(p) for p in points], "margins": [asdict(m) | {"margin": m.margin} for m in found]}
    atomic_write_text(out / "compare.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(out / "compare.md", table)
    atomic_write_text(out / "compare.html", html_page(table, png))
    temporary = out / "pareto.png.tmp"
    temporary.write_bytes(png)
    temporary.replace(out / "pareto.png")
