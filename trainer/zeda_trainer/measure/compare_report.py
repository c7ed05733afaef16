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
from dataclasses import asdict, dataclass

from zeda_core.atomic import atomic_write_text
from zeda_trainer.measure.compare import CompareConfig, Point
from zeda_trainer.measure.stats import DECISIVE_Z, paired_difference

BASELINES = ("dynamic-skip", "top-p", "adamoe", "adamoe-labels")
COLOURS = {
    "teacher": "#444444",
    "zeda": "#d62728",
    "zeda-dial": "#ff9896",
    "dynamic-skip": "#1f77b4",
    "top-p": "#2ca02c",
    "adamoe": "#9467bd",
    "adamoe-labels": "#c5b0d5",
}


@dataclass(frozen=True)
class Margin:
    """ZEDA model ``zeda`` against one baseline at the ZEDA model's FLOP saving.

    ``difference_se`` is the paired standard error of ``margin`` (None for points measured
    without their items); ``z`` the margin in those standard errors.
    """

    zeda: str
    baseline: str
    flops_saved: float
    zeda_accuracy: float
    baseline_accuracy: float
    how: str
    difference_se: float | None = None
    z: float | None = None

    @property
    def margin(self) -> float:
        return self.zeda_accuracy - self.baseline_accuracy

    @property
    def decisive(self) -> bool | None:
        """|z| > 2 (None without a paired standard error)."""
        return None if self.z is None else abs(self.z) > DECISIVE_Z


def baseline_at(points: list[Point], saved: float) -> tuple[list[tuple[Point, float]], str]:
    """One method's points read at ``saved`` expert-FLOP share: (point, weight) pairs, weights
    summing to 1 (two points when interpolated, else the nearest end), and how it was read."""
    ordered = sorted(points, key=lambda p: p.flops_saved)
    for low, high in itertools.pairwise(ordered):
        if low.flops_saved <= saved <= high.flops_saved:
            span = high.flops_saved - low.flops_saved
            t = (saved - low.flops_saved) / span if span else 0.0
            return [(low, 1.0 - t), (high, t)], f"interpolated between {low.knob} and {high.knob}"
    if saved > ordered[-1].flops_saved:
        best = ordered[-1]
        return [(best, 1.0)], f"{best.knob}: saves only {best.flops_saved:.1%} (more FLOPs than ZEDA)"
    first = ordered[0]
    return [(first, 1.0)], f"{first.knob}: saves {first.flops_saved:.1%} (fewer FLOPs than ZEDA)"


def baseline_accuracy_at(points: list[Point], saved: float) -> tuple[float, str]:
    """(accuracy, how it was read) of one method's points at ``saved`` expert-FLOP share."""
    weighted, how = baseline_at(points, saved)
    return sum(w * p.accuracy for p, w in weighted), how


def margins(points: list[Point]) -> list[Margin]:
    """ZEDA's accuracy margin over each baseline, for every ZEDA point, with its paired standard
    error where every point involved kept its items (the baseline's per-item scores interpolated
    with the same weights as its accuracy)."""
    result = []
    for zeda in (p for p in points if p.method == "zeda"):
        for method in BASELINES:
            own = [p for p in points if p.method == method]
            if not own:
                continue
            weighted, how = baseline_at(own, zeda.flops_saved)
            accuracy = sum(w * p.accuracy for p, w in weighted)
            se = z = None
            if zeda.correct and all(p.correct for p, _ in weighted):
                try:
                    scores = [(p.scores(), w) for p, w in weighted]
                    mixed = {
                        s: [sum(w * sc[s][i] for sc, w in scores) for i in range(len(v))]
                        for s, v in scores[0][0].items()
                    }
                    difference = paired_difference(zeda.scores(), mixed)
                    se, z = difference.standard_error, difference.z
                except (KeyError, IndexError, ValueError):
                    se = z = None  # points of different eval sets (reused from another run): no pairing
            result.append(Margin(zeda.knob, method, zeda.flops_saved, zeda.accuracy, accuracy, how, se, z))
    return result


def _interval(p: Point) -> str:
    return "-" if p.accuracy_low is None else f"{p.accuracy_low:.3f}-{p.accuracy_high:.3f}"


def _verdict(m: Margin) -> str:
    if m.z is None:
        return "-"
    if not m.decisive:
        return "no: a tie"
    return "yes, ZEDA ahead" if m.margin > 0 else "yes, the baseline ahead"


def markdown_table(points: list[Point], found: list[Margin], config: CompareConfig) -> str:
    header = ["method", "knob", "expert FLOPs saved (skills)", "saved (text)", "real experts / token"]
    header += ["mean skill accuracy", "95 % interval", "items"]
    header += ["KL to teacher (nats/token)", "perplexity"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for p in points:
        lines.append(
            f"| {p.method} | {p.knob} | {p.flops_saved:.1%} | {p.flops_saved_text:.1%} | {p.real_experts:.2f} "
            f"| {p.accuracy:.3f} | {_interval(p)} | {p.items} "
            f"| {p.kl:.4f} | {p.perplexity:.2f} |"
        )
    lines += [
        "",
        "| ZEDA model | baseline | at saving | ZEDA accuracy | baseline accuracy | margin | paired SE | z "
        "| decisive (z > 2) | how |",
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for m in found:
        se = "-" if m.difference_se is None else f"{m.difference_se:.3f}"
        z = "-" if m.z is None else f"{m.z:+.1f}"
        lines.append(
            f"| {m.zeda} | {m.baseline} | {m.flops_saved:.1%} | {m.zeda_accuracy:.3f} | {m.baseline_accuracy:.3f} "
            f"| {m.margin:+.3f} | {se} | {z} | {_verdict(m)} | {m.how} |"
        )
    source = (
        f"teacher `{config.teacher}`, up to {config.eval_per_skill} eval items per skill from "
        f"{' + '.join(config.eval_sets)}, {config.text_windows} text windows"
    )
    note = (
        " Intervals are 95 % (normal approximation, stratified by skill). Margins are paired: both models"
        " answer the same items, and the standard error is that of the per-item differences; a baseline read"
        " between two of its points has its per-item scores interpolated with the same weights."
    )
    return "\n".join(lines) + f"\n\nMeasured on {source}.{note}\n"


def pareto_png(points: list[Point]) -> bytes:
    """Accuracy (with its 95 % interval) against the saving on the skills traffic, KL against the saving
    on the text it is measured on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(p.method for p in points):
        own = sorted((p for p in points if p.method == method), key=lambda p: p.flops_saved)
        style = {"color": COLOURS.get(method, "black"), "label": method, "marker": "o"}
        errors = [
            [p.accuracy - (p.accuracy_low if p.accuracy_low is not None else p.accuracy) for p in own],
            [(p.accuracy_high if p.accuracy_high is not None else p.accuracy) - p.accuracy for p in own],
        ]
        left.errorbar([100 * p.flops_saved for p in own], [p.accuracy for p in own], yerr=errors, capsize=2, **style)
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
    record = {
        "points": [asdict(p) for p in points],
        "margins": [asdict(m) | {"margin": m.margin, "decisive": m.decisive} for m in found],
    }
    atomic_write_text(out / "compare.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(out / "compare.md", table)
    atomic_write_text(out / "compare.html", html_page(table, png))
    temporary = out / "pareto.png.tmp"
    temporary.write_bytes(png)
    temporary.replace(out / "pareto.png")
