"""The self-contained HTML report of ``zeda analyze`` (plots inlined as PNG; nothing is fetched).

Sections: a summary a deployment team can act on (expected expert-FLOP saving on this traffic,
worst prompts by quality loss), the correlations with sign and p-value, per-layer and
per-domain r_ze plots, the compute-versus-uncertainty plot, and the token view: every token
coloured by the real experts it used (hover for the numbers).
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from zeda_core.atomic import atomic_write_bytes, atomic_write_text
from zeda_trainer.measure.analyze import Analysis, Correlation, PromptAnalysis

SIGNIFICANCE = 0.05
STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f4f4f4}.cards{display:flex;gap:1em;flex-wrap:wrap}
.card{border:1px solid #ddd;border-radius:6px;padding:.6em 1em}.card b{display:block;font-size:1.5em}
.prompt{font-family:ui-monospace,monospace;white-space:pre-wrap;border-bottom:1px solid #eee;padding:.5em 0}
.tok{border-radius:2px}.answer{text-decoration:underline;text-decoration-color:#888}
.legend span{display:inline-block;width:2.2em;text-align:center;font-size:.8em}
"""


def _colour(experts: float, top_k: int) -> str:
    """White (no real expert, all slots zero) to deep red (all K slots real)."""
    share = max(0.0, min(1.0, experts / top_k))
    green_blue = int(255 - 170 * share)
    return f"rgb(255,{green_blue},{green_blue})"


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _plots(analysis: Analysis) -> dict[str, str]:
    """id -> base64 PNG: per-layer r_ze, per-domain r_ze, compute against teacher entropy and |difference|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    figure, axis = plt.subplots(figsize=(6, 3))
    axis.bar(range(len(analysis.per_layer_zero_ratio)), analysis.per_layer_zero_ratio, color="#d62728")
    axis.set(xlabel="MoE layer", ylabel="r_ze", title="Zero-slot share per layer", ylim=(0, 1))
    plots["plot-layers"] = _png(figure)

    domains = analysis.per_domain_zero_ratio
    figure, axis = plt.subplots(figsize=(6, 3))
    axis.barh(list(domains), list(domains.values()), color="#1f77b4")
    axis.set(xlabel="r_ze", title="Zero-slot share per domain", xlim=(0, 1))
    plots["plot-domains"] = _png(figure)

    compute, entropy, difference = [], [], []
    for item in analysis.prompts:
        for t in range(len(item.tokens) - 1):
            compute.append(item.experts[t])
            entropy.append(item.entropy[t])
            difference.append(abs(item.delta[t]))
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for axis, values, label in (
        (axes[0], entropy, "teacher entropy (nats)"),
        (axes[1], difference, "|log p_T - log p_S|"),
    ):
        _binned(axis, np.asarray(values), np.asarray(compute), label, analysis.top_k)
    plots["plot-correlation"] = _png(figure)
    return plots


def _binned(axis, x: np.ndarray, compute: np.ndarray, label: str, top_k: int) -> None:
    """Mean experts used per decile of ``x``."""
    edges = np.unique(np.quantile(x, np.linspace(0, 1, 11)))
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, max(len(edges) - 2, 0))
    centres = [float(x[which == b].mean()) for b in range(len(edges) - 1) if (which == b).any()]
    means = [float(compute[which == b].mean()) for b in range(len(edges) - 1) if (which == b).any()]
    axis.plot(centres, means, marker="o", color="#d62728")
    axis.set(xlabel=label + " (decile means)", ylabel="real experts used", ylim=(0, top_k))
    axis.grid(alpha=0.3)


def p_value_text(value: float) -> str:
    """A p-value; one below the float range prints as a bound, not as 0."""
    return f"= {value:.2e}" if value > 0.0 else "< 1e-300"


def _reading(c: Correlation) -> str:
    if c.p_value >= SIGNIFICANCE:
        return "no significant relation"
    direction = "more" if c.rho > 0 else "fewer"
    return f"{direction} experts where it is higher"


def _token_view(items: list[PromptAnalysis], top_k: int) -> str:
    blocks = []
    for index, item in enumerate(items):
        spans = []
        for t, token in enumerate(item.tokens):
            tip = f"experts {item.experts[t]:.2f}/{top_k}"
            if item.delta[t] is not None:
                tip += f", next-token diff {item.delta[t]:+.3f}, teacher entropy {item.entropy[t]:.3f}"
            kind = "tok answer" if t >= item.answer_start else "tok"
            colour = _colour(item.experts[t], top_k)
            style = f"background:{colour}"
            spans.append(f"<span class='{kind}' style='{style}' title='{html.escape(tip)}'>{html.escape(token)}</span>")
        header = f"#{index} · {html.escape(item.domain)} · r_ze {item.zero_ratio:.2f} · answer KL {item.mean_kl:.3f}"
        blocks.append(f"<div class='prompt'><small>{header}</small><br>{''.join(spans)}</div>")
    legend = "".join(f"<span style='background:{_colour(k, top_k)}'>{k}</span>" for k in range(top_k + 1))
    return f"<p class='legend'>real experts used: {legend} (underlined: the model's answer)</p>" + "".join(blocks)


def render(analysis: Analysis, plots: dict[str, str], view_limit: int = 60) -> str:
    """The report as one HTML string, with ``plots`` (:func:`_plots`) inlined."""
    saved = f"{analysis.zero_ratio:.1%}"
    cards = [
        ("prompts", str(len(analysis.prompts))),
        ("expert FLOPs saved on this traffic", saved),
        ("all model FLOPs saved", f"{analysis.total_flops_saved_ratio:.1%}"),
        (
            "expert GFLOPs per token (dense)",
            f"{analysis.expert_flops_per_token / 1e9:.4f} ({analysis.dense_expert_flops_per_token / 1e9:.4f})",
        ),
    ]
    card_html = "".join(f"<div class='card'>{html.escape(k)}<b>{html.escape(v)}</b></div>" for k, v in cards)
    correlation_rows = "".join(
        f"<tr><td>{html.escape(c.name)}</td><td>{c.rho:+.3f}</td><td>p {p_value_text(c.p_value)}</td><td>{c.n}</td>"
        f"<td>{_reading(c)}</td></tr>"
        for c in analysis.correlations
    )
    worst_rows = "".join(
        f"<tr><td>{html.escape(p.domain)}</td><td>{html.escape(p.prompt[:160])}</td><td>{html.escape(p.answer[:160])}</td>"
        f"<td>{p.mean_kl:.3f}</td><td>{p.zero_ratio:.2f}</td></tr>"
        for p in analysis.worst()
    )
    images = "".join(
        f"<img id='{name}' alt='{name}' src='data:image/png;base64,{data}'>" for name, data in plots.items()
    )
    shown = analysis.prompts[:view_limit]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>ZEDA routing analysis</title>
<style>{STYLE}</style></head><body>
<h1>Routing analysis</h1>
<p>Model <code>{html.escape(analysis.model)}</code> against teacher <code>{html.escape(analysis.teacher)}</code>.</p>
<h2>Summary</h2><div class="cards" id="summary">{card_html}</div>
<p>On this traffic the model is expected to save <b>{saved}</b> of routed-expert FLOPs (prompt and generated tokens,
as served). The prompts below lose the most quality (mean KL from the teacher over the answer, nats/token).</p>
<table id="worst"><thead><tr><th>domain</th><th>prompt</th><th>answer</th><th>answer KL</th><th>r_ze</th></tr></thead>
<tbody>{worst_rows}</tbody></table>
<h2>Where compute goes</h2>
<table id="correlations"><thead><tr><th>per-token compute against</th><th>Spearman rho</th><th>p-value</th>
<th>tokens</th><th>reading (p &lt; {SIGNIFICANCE})</th></tr></thead><tbody>{correlation_rows}</tbody></table>
<div id="plots">{images}</div>
<h2>Tokens</h2><div id="tokens">{_token_view(shown, analysis.top_k)}</div>
<p><small>{len(shown)} of {len(analysis.prompts)} prompts shown.</small></p>
</body></html>
"""


def write_analysis(analysis: Analysis, out: Path, json_out: Path | None = None, figures: Path | None = None) -> None:
    """The HTML report at ``out``, the raw figures as JSON at ``json_out``, and the plots as PNG files
    in directory ``figures`` (``layers.png``, ``domains.png``, ``correlation.png``), each atomically."""
    plots = _plots(analysis)
    atomic_write_text(out, render(analysis, plots))
    if figures is not None:
        for name, encoded in plots.items():
            atomic_write_bytes(figures / f"{name.removeprefix('plot-')}.png", base64.b64decode(encoded))
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(asdict(analysis), indent=1) + "\n")
