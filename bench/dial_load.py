"""Overload benchmark of the load-adaptive compute dial: ``--adaptive-compute queue`` on against off.

Two real ``zeda serve`` processes serve the same model with the same limits; one raises its
zero-expert offset while its queue is deep. Both get the same open-loop overload in one run:
Poisson arrivals at ``--overload`` times the capacity measured first (closed loop, ``max_batch``
streams), in ABBA order so drift in the machine's speed falls on both. Every request is a greedy
skill question with a known answer (the probe set), so the same run gives throughput, p95
latency, the count of 429s and the accuracy of what was answered. The load offset is sampled
from ``/metrics`` during the run.

    python bench/dial_load.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import re
import shlex
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import httpx
import torch

from zeda_core.atomic import publish_benchmark
from zeda_server.launch import running_server
from zeda_trainer.data.skills import EVAL_GENERATORS
from zeda_trainer.measure.evaluate import EvalItem

MARKER = "bench:dial-load:cpu"
OFFSET_LINE = re.compile(r'^zeda_zero_expert_offset\{part="load"\} (\S+)$', re.MULTILINE)


def probe_requests(count: int, seed: int) -> list[tuple[dict, EvalItem]]:
    """(chat body, graded item) pairs: greedy skill questions, ``max_tokens`` the answer's length + 8 characters."""
    rng = random.Random(seed)
    skills = sorted(EVAL_GENERATORS)
    out = []
    for i in range(count):
        prompt, answer = EVAL_GENERATORS[skills[i % len(skills)]](rng)
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": len(answer) + 8, "temperature": 0}
        out.append((body, EvalItem(prompt, answer, skills[i % len(skills)])))
    return out


async def _ask(client: httpx.AsyncClient, model: str, body: dict, item: EvalItem) -> dict:
    started = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body | {"model": model})
    result = {"status": response.status_code, "latency": time.perf_counter() - started}
    if response.status_code == 200:
        data = response.json()
        result["correct"] = item.correct(data["choices"][0]["message"]["content"])
        result["tokens"] = data["usage"]["completion_tokens"]
        result["zero_expert_ratio"] = data["usage"]["zeda"]["zero_expert_ratio"]
    return result


async def capacity(url: str, model: str, requests: list[tuple[dict, EvalItem]], streams: int) -> float:
    """Requests/s the server completes with ``streams`` closed-loop clients."""
    queue: asyncio.Queue = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def worker() -> None:
            while not queue.empty():
                await _ask(client, model, *queue.get_nowait())

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(streams)))
        return len(requests) / (time.perf_counter() - started)


async def overload(url: str, model: str, requests: list[tuple[dict, EvalItem]], rate: float, seed: int) -> dict:
    """Send ``requests`` as Poisson arrivals at ``rate`` per second; collect every answer and the load offset."""
    rng = random.Random(seed)
    offsets: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        done = asyncio.Event()

        async def sample_offset() -> None:
            while not done.is_set():
                match = OFFSET_LINE.search((await client.get("/metrics")).text)
                offsets.append(float(match.group(1)) if match else 0.0)
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample_offset())
        started = time.perf_counter()
        tasks = []
        for body, item in requests:
            tasks.append(asyncio.create_task(_ask(client, model, body, item)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
        done.set()
        await sampler
    return {"results": results, "wall_s": wall, "offsets": offsets}


def summarise(runs: list[dict]) -> dict:
    """Totals over a mode's runs: served req/s, tokens/s, p95 latency of answers, 429s, accuracy, r_ze."""
    results = [r for run in runs for r in run["results"]]
    wall = sum(run["wall_s"] for run in runs)
    answered = [r for r in results if r["status"] == 200]
    latencies = sorted(r["latency"] for r in answered)
    offsets = [o for run in runs for o in run["offsets"]]
    return {
        "sent": len(results),
        "answered": len(answered),
        "refused_429": sum(r["status"] == 429 for r in results),
        "other_errors": sum(r["status"] not in (200, 429) for r in results),
        "answered_per_s": len(answered) / wall,
        "tokens_per_s": sum(r["tokens"] for r in answered) / wall,
        "p95_latency_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))] if latencies else None,
        "accuracy": statistics.fmean(r["correct"] for r in answered) if answered else None,
        "zero_expert_ratio": statistics.fmean(r["zero_expert_ratio"] for r in answered) if answered else None,
        "mean_load_offset": statistics.fmean(offsets) if offsets else 0.0,
        "max_load_offset": max(offsets, default=0.0),
    }


def markdown(config: dict, results: dict, command: str) -> str:
    rows = [
        "| adaptive compute | sent | answered/s | tokens/s | p95 latency (s) | 429s | accuracy (answered) "
        "| r_ze | load offset mean / max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, s in results.items():
        rows.append(
            f"| {mode} | {s['sent']} | {s['answered_per_s']:.2f} | {s['tokens_per_s']:.1f} | {s['p95_latency_s']:.2f} "
            f"| {s['refused_429']} | {s['accuracy']:.3f} | {s['zero_expert_ratio']:.3f} "
            f"| {s['mean_load_offset']:.2f} / {s['max_load_offset']:.2f} |"
        )
    off, on = results["off"], results["queue"]
    return "\n".join(
        [
            f"<!-- {MARKER} -->",
            f"## Compute dial under overload (CPU, {date.today().isoformat()})",
            "",
            f"Command: `{command}`. Model `{config['model']}`, torch engine on {config['machine']}, "
            f"server flags `{config['flags']}`; the adaptive server adds `{config['adaptive_flags']}`.",
            f"Capacity measured closed-loop with {config['streams']} streams: {config['capacity']:.2f} req/s; "
            f"overload: Poisson arrivals at {config['rate']:.2f} req/s ({config['overload']:g}x), "
            f"{config['per_run']} requests per run, runs in ABBA order. Every request is a greedy skill question "
            "(the probe set); accuracy is over the answered ones.",
            "",
            *rows,
            "",
            f"Side by side: answered/s x{on['answered_per_s'] / off['answered_per_s']:.2f}, "
            f"tokens/s x{on['tokens_per_s'] / off['tokens_per_s']:.2f}, "
            f"429s {off['refused_429']} -> {on['refused_429']}, "
            f"accuracy {off['accuracy']:.3f} -> {on['accuracy']:.3f} with the adaptive mode on.",
            f"<!-- /{MARKER} -->",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/tiny-zeda")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=24)
    parser.add_argument("--queue-depth", type=int, default=4, help="--adaptive-queue-depth of the adaptive server")
    parser.add_argument("--max-offset", type=float, default=0.5, help="--adaptive-max-offset of the adaptive server")
    parser.add_argument("--overload", type=float, default=2.0, help="arrival rate over the measured capacity")
    parser.add_argument("--requests", type=int, default=150, help="requests per run (4 runs: ABBA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--write", type=Path, default=None, help="write the section into this Markdown file")
    args = parser.parse_args()

    model = Path(args.model)
    flags = ("--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue))
    adaptive = ("--adaptive-compute", "queue", "--adaptive-queue-depth", str(args.queue_depth))
    adaptive += ("--adaptive-max-offset", str(args.max_offset))
    requests = probe_requests(args.requests, args.seed)
    name = model.name
    with running_server(model, *flags) as off_url, running_server(model, *flags, *adaptive) as on_url:
        urls = {"off": off_url, "queue": on_url}
        rate_of = asyncio.run(
            capacity(off_url, name, probe_requests(4 * args.max_batch, args.seed + 1), args.max_batch)
        )
        rate = args.overload * rate_of
        runs: dict[str, list[dict]] = {"off": [], "queue": []}
        for index, mode in enumerate(["off", "queue", "queue", "off"]):
            runs[mode].append(asyncio.run(overload(urls[mode], name, requests, rate, args.seed + index)))
    results = {mode: summarise(mode_runs) for mode, mode_runs in runs.items()}
    config = {
        "model": str(model),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "flags": " ".join(flags),
        "adaptive_flags": " ".join(adaptive),
        "streams": args.max_batch,
        "capacity": rate_of,
        "rate": rate,
        "overload": args.overload,
        "per_run": args.requests,
    }
    command = "python " + shlex.join(sys.argv)
    publish_benchmark(
        markdown(config, results, command), MARKER, {"config": config, "results": results}, args.json, args.write
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
