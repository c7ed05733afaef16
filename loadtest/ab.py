"""A/B load test: the same headless locust load against two servers, in alternation, side by side.

    python loadtest/ab.py --a-model models/tiny-teacher --b-model models/tiny-zeda --out build/ab
    python loadtest/ab.py --a-model models/tiny-teacher --b-model models/tiny-zeda --backend sglang --out build/ab
    python loadtest/ab.py --a http://host-a:8000 --b http://host-b:8000 --users 16 --run-time 60s --rounds 3

With ``--a-model`` / ``--b-model`` it starts both servers itself on loopback, on the engine
``--backend`` names (torch or sglang). Each round runs
the load against A, then B (the order flips every round). Output in ``--out``:

- ``ab.json``: per side, latency percentiles (end to end, TTFT, inter-token), throughput,
  error counts, and the expert-FLOP savings from ``usage.zeda`` and from the server's
  ``/metrics`` counters over the same window (they must agree);
- ``ab.csv``: one row per side;
- ``report.html``: a self-contained page (no CDN) with the numbers and plots side by side;
- each locust run's own CSV stats and per-request records.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import html
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prompt_file import load_prompt_file  # noqa: E402

from zeda_core.atomic import atomic_write_text, write_marked_section  # noqa: E402
from zeda_server.launch import running_server  # noqa: E402

AB_MARKERS = {"torch": "bench:ab:cpu", "sglang": "bench:ab:cpu:sglang"}
SGLANG_START_S = 600.0
COUNTERS = ("zeda_expert_flops_saved_total", "zeda_dense_expert_flops_total", "zeda_expert_flops_total")


class AbError(Exception):
    """Bad input, reported before any load starts."""


def metrics(url: str) -> dict[str, float]:
    """The ZEDA FLOP counters of a server's ``/metrics`` (0 for a server without them)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for name in COUNTERS:
        match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
        values[name] = float(match.group(1)) if match else 0.0
    return values


def check_server(url: str, label: str) -> None:
    try:
        response = httpx.get(f"{url}/health", timeout=5)
    except httpx.HTTPError as exc:
        raise AbError(f"server {label} at {url} is unreachable: {exc}") from exc
    if response.status_code != 200:
        raise AbError(f"server {label} at {url} is not healthy: HTTP {response.status_code}")


def run_locust(url: str, args: argparse.Namespace, prefix: Path) -> list[dict]:
    """One headless locust run against ``url``; returns its per-request records."""
    records = prefix.with_suffix(".jsonl")
    command = [
        sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--only-summary",
        "-H", url, "-u", str(args.users), "-r", str(args.users), "--run-time", args.run_time, "--stop-timeout", "120",
        "--csv", str(prefix), "--prompts", str(args.prompts), "--stream-share", str(args.stream_share),
        "--max-tokens", str(args.max_tokens), "--max-requests", str(args.max_requests),
        "--records-out", str(records), "--seed", str(args.seed),
    ]  # fmt: skip
    if args.api_key:
        command += ["--api-key", args.api_key]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if not records.is_file():
        raise AbError(f"locust against {url} wrote no records: {done.stderr[-1500:]}")
    return [json.loads(line) for line in records.read_text().splitlines()]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarise(runs: list[list[dict]], deltas: list[dict[str, float]]) -> dict:
    """Side summary over its runs: throughput over the runs' spans, percentiles, errors, savings."""
    records = [r for run in runs for r in run]
    ok = [r for r in records if r["ok"]]
    span = sum(max(r["end"] for r in run) - min(r["start"] for r in run) for run in runs if run)
    tokens = sum(r["completion_tokens"] for r in ok)
    zeda = [r["zeda"] for r in ok if r.get("zeda")]
    dense = sum(z["dense_expert_flops"] for z in zeda)
    metric_saved = sum(d["zeda_expert_flops_saved_total"] for d in deltas)
    metric_dense = sum(d["zeda_dense_expert_flops_total"] for d in deltas)
    latencies = [r["latency_s"] for r in ok]
    itls = [r["itl_s"] for r in ok if r.get("itl_s") is not None]
    return {
        "requests": len(records),
        "succeeded": len(ok),
        "errors": len(records) - len(ok),
        "error_rate": (len(records) - len(ok)) / len(records) if records else 0.0,
        "completion_tokens": tokens,
        "seconds": span,
        "tokens_per_s": tokens / span if span else 0.0,
        "requests_per_s": len(ok) / span if span else 0.0,
        "p50_latency_s": percentile(latencies, 0.5),
        "p95_latency_s": percentile(latencies, 0.95),
        "p99_latency_s": percentile(latencies, 0.99),
        "p50_ttft_s": percentile([r["ttft_s"] for r in ok if r["stream"]], 0.5),
        "p95_ttft_s": percentile([r["ttft_s"] for r in ok if r["stream"]], 0.95),
        "p50_itl_s": percentile(itls, 0.5),
        "zero_expert_ratio": sum(z["expert_flops_saved"] for z in zeda) / dense if dense else 0.0,
        "expert_flops_saved": sum(z["expert_flops_saved"] for z in zeda),
        "metrics_zero_expert_ratio": metric_saved / metric_dense if metric_dense else 0.0,
        "metrics_expert_flops_saved": metric_saved,
    }


def _bars(title: str, values: dict[str, float | None], unit: str) -> str:
    """An inline SVG bar chart of one figure for both sides."""
    width, bar = 420, 36
    top = max((v for v in values.values() if v), default=1.0) or 1.0
    rows = []
    for index, (label, value) in enumerate(values.items()):
        y = 28 + index * (bar + 10)
        length = 0 if value is None else (width - 170) * value / top
        text = "n/a" if value is None else f"{value:.3g} {unit}"
        rows.append(
            f'<text x="0" y="{y + 23}" font-size="13">{html.escape(label)}</text>'
            f'<rect x="90" y="{y}" width="{length:.1f}" height="{bar}" fill="{"#27a" if index == 0 else "#2a7"}"/>'
            f'<text x="{95 + length:.1f}" y="{y + 23}" font-size="12">{text}</text>'
        )
    height = 28 + len(values) * (bar + 10)
    return (
        f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f'<text x="0" y="16" font-size="14" font-weight="600">{html.escape(title)}</text>{"".join(rows)}</svg>'
    )


def report_html(result: dict) -> str:
    a, b = result["sides"]["A"], result["sides"]["B"]
    names = {"A": result["names"]["A"], "B": result["names"]["B"]}
    figures = [
        ("throughput", "tokens_per_s", "tok/s", 1),
        ("p50 latency", "p50_latency_s", "ms", 1e3),
        ("p95 latency", "p95_latency_s", "ms", 1e3),
        ("p50 TTFT (streams)", "p50_ttft_s", "ms", 1e3),
        ("p50 inter-token latency", "p50_itl_s", "ms", 1e3),
        ("error rate", "error_rate", "", 1),
        ("zero-expert ratio", "zero_expert_ratio", "", 1),
    ]
    charts = "".join(
        "<div>"
        + _bars(
            title,
            {names[s]: (None if side[key] is None else side[key] * scale) for s, side in (("A", a), ("B", b))},
            unit,
        )
        + "</div>"
        for title, key, unit, scale in figures
    )
    rows = "".join(
        f"<tr><td>{key}</td><td>{a[key]}</td><td>{b[key]}</td></tr>" for key in a if not isinstance(a[key], dict)
    )
    ratios = "".join(
        f"<li>{html.escape(k)}: {v:.3f}</li>" for k, v in result["ratios_b_over_a"].items() if v is not None
    )
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>ZEDA A/B load test</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}.charts{{display:flex;flex-wrap:wrap;gap:24px}}</style>
</head><body><h1>A/B load test: {html.escape(names["A"])} (A) vs {html.escape(names["B"])} (B)</h1>
<p>Command: <code>{html.escape(result["command"])}</code></p>
<p>Load: {result["load"]["users"]} users, {html.escape(result["load"]["run_time"])} per run,
{result["load"]["rounds"]} rounds alternating A and B.</p>
<h2>B / A</h2><ul>{ratios}</ul>
<div class="charts">{charts}</div>
<h2>All figures</h2><table><tr><th></th><th>A: {html.escape(names["A"])}</th><th>B: {html.escape(names["B"])}</th></tr>
{rows}</table></body></html>
"""


def benchmark_section(result: dict) -> str:
    """A BENCHMARKS.md section: both sides' figures and the B/A ratios, with the command."""
    a, b = result["sides"]["A"], result["sides"]["B"]
    names, load = result["names"], result["load"]

    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 1e3:.0f} ms"

    marker = AB_MARKERS[load["backend"]]
    lines = [
        f"<!-- {marker} -->",
        f"## A/B load test on CPU ({load['backend']} backend): {names['B']} vs {names['A']}",
        "",
        f"Command: `{result['command']}`.",
        f"Load: {load['users']} users sending back to back, {load['run_time']} per run, {load['rounds']} rounds",
        f"alternating the servers, greedy, {load['max_tokens']} max tokens, half the requests streamed.",
        "",
        "| server | requests | errors | tokens/s | requests/s | p50 latency | p95 latency | p50 TTFT "
        "| r_ze (responses) | r_ze (/metrics) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side, row in (("A", a), ("B", b)):
        lines.append(
            f"| {names[side]} | {row['requests']} | {row['errors']} | {row['tokens_per_s']:.1f} | "
            f"{row['requests_per_s']:.2f} | {ms(row['p50_latency_s'])} | {ms(row['p95_latency_s'])} | "
            f"{ms(row['p50_ttft_s'])} | {row['zero_expert_ratio']:.3f} | {row['metrics_zero_expert_ratio']:.3f} |"
        )
    ratios = result["ratios_b_over_a"]
    lines += [
        "",
        f"{names['B']} / {names['A']}: throughput {ratios['tokens_per_s']:.2f}x, "
        f"p50 latency {ratios['p50_latency_s']:.2f}x, p95 latency {ratios['p95_latency_s']:.2f}x.",
        f"<!-- /{marker} -->",
    ]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: Path) -> None:
    atomic_write_text(out / "ab.json", json.dumps(result, indent=2) + "\n")
    buffer = io.StringIO()
    sides = result["sides"]
    fields = [k for k in sides["A"] if not isinstance(sides["A"][k], dict)]
    writer = csv.DictWriter(buffer, fieldnames=["side", "name", *fields])
    writer.writeheader()
    for side, summary in sides.items():
        writer.writerow({"side": side, "name": result["names"][side], **{k: summary[k] for k in fields}})
    atomic_write_text(out / "ab.csv", buffer.getvalue())
    atomic_write_text(out / "report.html", report_html(result))


def run_ab(args: argparse.Namespace, urls: dict[str, str]) -> dict:
    for side, url in urls.items():
        check_server(url, side)
    runs: dict[str, list[list[dict]]] = {"A": [], "B": []}
    deltas: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    for round_index in range(args.rounds):
        for side in ("A", "B") if round_index % 2 == 0 else ("B", "A"):
            before = metrics(urls[side])
            runs[side].append(run_locust(urls[side], args, args.out / f"{side}-round{round_index}"))
            after = metrics(urls[side])
            deltas[side].append({k: after[k] - before[k] for k in COUNTERS})
    sides = {side: summarise(runs[side], deltas[side]) for side in runs}
    ratios = {}
    for key in ("tokens_per_s", "requests_per_s", "p50_latency_s", "p95_latency_s", "p50_ttft_s", "p50_itl_s"):
        a, b = sides["A"][key], sides["B"][key]
        ratios[key] = b / a if a and b is not None else None
    return {
        "command": shlex.join(["python", "loadtest/ab.py", *sys.argv[1:]]),
        "names": {"A": args.a_name, "B": args.b_name},
        "urls": urls,
        "load": {
            "users": args.users,
            "run_time": args.run_time,
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "backend": args.backend,
        },
        "sides": sides,
        "ratios_b_over_a": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for side in ("a", "b"):
        group = parser.add_mutually_exclusive_group(required=True)
        group.add_argument(f"--{side}", help=f"base URL of server {side.upper()}")
        group.add_argument(
            f"--{side}-model", type=Path, help=f"start server {side.upper()} on loopback from this model"
        )
        parser.add_argument(f"--{side}-name", default=None, help=f"label of {side.upper()} in the report")
    parser.add_argument(
        "--backend", choices=sorted(AB_MARKERS), default="torch", help="engine of the servers --a/b-model start"
    )
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--run-time", default="30s", help="per locust run, e.g. 30s or 2m")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-requests", type=int, default=0, help="per run (0: bounded by --run-time only)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stream-share", type=float, default=0.5)
    parser.add_argument("--prompts", type=Path, default=HERE / "prompts.jsonl")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("build/ab"))
    parser.add_argument("--write", type=Path, help="also write the result's section of a Markdown file (BENCHMARKS.md)")
    args = parser.parse_args(argv)
    try:
        load_prompt_file(str(args.prompts))
        if args.users < 1 or args.rounds < 1:
            raise AbError("--users and --rounds must be >= 1")
        if not re.fullmatch(r"\d+[smh]?", args.run_time):
            raise AbError(f"--run-time {args.run_time!r} must look like 30s, 2m or 1h")
        args.a_name = args.a_name or (args.a_model.name if args.a_model else "A")
        args.b_name = args.b_name or (args.b_model.name if args.b_model else "B")
        args.out.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            urls = {}
            for side, url, model in (("A", args.a, args.a_model), ("B", args.b, args.b_model)):
                if model is not None and not model.is_dir():
                    raise AbError(f"--{side.lower()}-model {model} is not a model directory")
                if url:
                    urls[side] = url.rstrip("/")
                else:
                    server = running_server(model, "--backend", args.backend, startup_timeout=SGLANG_START_S)
                    urls[side] = stack.enter_context(server)
            result = run_ab(args, urls)
    except (AbError, ValueError) as exc:
        print(f"ab: error: {exc}", file=sys.stderr)
        return 2
    write_outputs(result, args.out)
    if args.write:
        write_marked_section(args.write, AB_MARKERS[args.backend], benchmark_section(result))
    for side in ("A", "B"):
        s = result["sides"][side]
        print(
            f"{side} {result['names'][side]}: {s['succeeded']}/{s['requests']} ok, {s['tokens_per_s']:.1f} tok/s, "
            f"p50 {s['p50_latency_s']}, p95 {s['p95_latency_s']}, r_ze {s['zero_expert_ratio']:.3f}"
        )
    print(f"report: {args.out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
