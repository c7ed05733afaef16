"""Soak benchmark: a real ``zeda serve`` held past saturation for minutes, watched for errors and leaks.

More clients than the server's batch (``--clients`` > ``--max-batch``) send chat completions back
to back, half of them streamed, from the load test's prompt file, so the queue never empties.
Every minute it records the requests, the 5xx and other errors, p50 / p99 latency, and the
server's RSS and open file descriptors (from ``/proc``). The verdict: 0 5xx, and RSS growth
between the end of minute 2 and the end of the run under 5 %.

    python bench/soak.py --minutes 10 --write BENCHMARKS.md
    python bench/soak.py --backend sglang --minutes 10 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "loadtest"))

from prompt_file import load_prompt_file  # noqa: E402

from zeda_core.atomic import publish_benchmark  # noqa: E402
from zeda_server.launch import server_process  # noqa: E402

MARKERS = {"torch": "bench:soak:cpu", "sglang": "bench:soak:cpu:sglang"}
RSS_GROWTH_LIMIT = 0.05


def process_tree_rss_kb(pid: int) -> int:
    """Resident set of ``pid`` and its descendants (SGLang's scheduler runs in children), in KiB."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (OSError, StopIteration):
            continue
        pending += [int(child) for child in children]
    return total


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else None


async def _client(url: str, model: str, prompts: list[str], seed: int, until: float, args, records: list) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        while time.monotonic() < until:
            stream = rng.random() < 0.5
            body = {
                "model": model,
                "messages": [{"role": "user", "content": rng.choice(prompts)}],
                "max_tokens": args.max_tokens,
                "temperature": 0.7,
                "stream": stream,
            }
            started = time.monotonic()
            try:
                if stream:
                    status = 200
                    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                        status = response.status_code
                        async for line in response.aiter_lines():
                            if line.startswith("data: {") and '"error"' in line[:20]:
                                status = 500
                else:
                    status = (await client.post("/v1/chat/completions", json=body)).status_code
            except httpx.HTTPError:
                status = 599  # transport failure
            records.append((time.monotonic(), time.monotonic() - started, status))
            if status == 429:
                await asyncio.sleep(0.05)


async def _sample(pid: int, until: float, every: float, samples: list) -> None:
    while time.monotonic() < until:
        samples.append((time.monotonic(), process_tree_rss_kb(pid), open_fds(pid)))
        await asyncio.sleep(every)
    samples.append((time.monotonic(), process_tree_rss_kb(pid), open_fds(pid)))


async def soak(url: str, pid: int, model: str, prompts: list[str], args) -> tuple[list, list, float]:
    started = time.monotonic()
    until = started + args.minutes * 60
    records: list = []
    samples: list = []
    clients = [_client(url, model, prompts, seed, until, args, records) for seed in range(args.clients)]
    await asyncio.gather(_sample(pid, until, 5.0, samples), *clients)
    return records, samples, started


def summarise(records: list, samples: list, started: float, minutes: int) -> dict:
    rows = []
    for minute in range(minutes):
        lo, hi = started + 60 * minute, started + 60 * (minute + 1)
        window = [r for r in records if lo <= r[0] < hi]
        ok = [latency for _, latency, status in window if status == 200]
        at_end = [s for s in samples if s[0] <= hi] or samples[:1]
        rows.append(
            {
                "minute": minute + 1,
                "requests": len(window),
                "errors_5xx": sum(status >= 500 for _, _, status in window),
                "refused_429": sum(status == 429 for _, _, status in window),
                "p50_latency_s": percentile(ok, 0.5),
                "p99_latency_s": percentile(ok, 0.99),
                "rss_mb": at_end[-1][1] / 1024,
                "fds": at_end[-1][2],
            }
        )
    reference = rows[1]["rss_mb"] if len(rows) > 1 else rows[0]["rss_mb"]
    growth = (rows[-1]["rss_mb"] - reference) / reference
    return {
        "minutes": rows,
        "requests": len(records),
        "errors_5xx": sum(status >= 500 for _, _, status in records),
        "rss_start_mb": samples[0][1] / 1024,
        "rss_end_mb": samples[-1][1] / 1024,
        "rss_growth_from_minute_2": growth,
        "fds_start": samples[0][2],
        "fds_end": samples[-1][2],
    }


def markdown(result: dict, command: str, backend: str, args) -> str:
    marker = MARKERS[backend]
    passed = result["errors_5xx"] == 0 and result["rss_growth_from_minute_2"] < RSS_GROWTH_LIMIT
    lines = [
        f"<!-- {marker} -->",
        f"## Soak on CPU ({backend} backend): {args.minutes} min past saturation",
        "",
        f"Command: `{command}` ({date.today().isoformat()}). {args.clients} clients back to back against "
        f"`--max-batch {args.max_batch}`, chat completions (half streamed) of up to {args.max_tokens} tokens "
        "from `loadtest/prompts.jsonl`, temperature 0.7; the load generator shares the 2 cores.",
        "",
        "| minute | requests | 5xx | 429 | p50 latency | p99 latency | RSS | open fds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["minutes"]:
        p50 = "n/a" if row["p50_latency_s"] is None else f"{row['p50_latency_s'] * 1e3:.0f} ms"
        p99 = "n/a" if row["p99_latency_s"] is None else f"{row['p99_latency_s'] * 1e3:.0f} ms"
        lines.append(
            f"| {row['minute']} | {row['requests']} | {row['errors_5xx']} | {row['refused_429']} | {p50} | {p99} | "
            f"{row['rss_mb']:.0f} MB | {row['fds']} |"
        )
    lines += [
        "",
        f"{result['requests']} requests, **{result['errors_5xx']} 5xx**. RSS {result['rss_start_mb']:.0f} MB at "
        f"the start, {result['rss_end_mb']:.0f} MB at the end: **{result['rss_growth_from_minute_2']:+.1%}** from "
        f"the end of minute 2 (limit {RSS_GROWTH_LIMIT:.0%}). Open file descriptors {result['fds_start']} -> "
        f"{result['fds_end']}. Verdict: **{'pass' if passed else 'FAIL'}**.",
        f"<!-- /{marker} -->",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/tiny-zeda"))
    parser.add_argument("--backend", choices=sorted(MARKERS), default="torch")
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=Path, default=HERE.parent / "loadtest" / "prompts.jsonl")
    parser.add_argument("--write", type=Path, help="write the section of this Markdown file (BENCHMARKS.md)")
    parser.add_argument("--json", type=Path, help="also write the raw result here")
    args = parser.parse_args()
    if args.minutes < 1 or args.clients < 1:
        parser.error(f"--minutes ({args.minutes}) and --clients ({args.clients}) must be >= 1")
    try:
        prompts = load_prompt_file(str(args.prompts))
    except ValueError as exc:
        parser.error(str(exc))
    command = shlex.join(["python", "bench/soak.py", *sys.argv[1:]])
    flags = ("--backend", args.backend, "--max-batch", str(args.max_batch), "--max-queue", "256")
    with server_process(args.model, *flags, startup_timeout=600) as (url, process, _log):
        records, samples, started = asyncio.run(soak(url, process.pid, args.model.name, prompts, args))
    result = summarise(records, samples, started, args.minutes)
    section = markdown(result, command, args.backend, args)
    publish_benchmark(section, MARKERS[args.backend], result, args.json, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
