"""End-to-end serving benchmark: the ZEDA model against its teacher, side by side in one run.

Both models are served by real ``zeda serve`` processes on loopback. For each concurrency, the
same requests go to the teacher and to the ZEDA model in alternation (the order flips every
round). The prompt mix is half chat skill questions and half Python code to continue. Reported
per model: completion tokens/s, p50/p95 end-to-end latency, p50 TTFT, and r_ze from ``usage.zeda``.

With ``--backend torch`` the MoE share of decode time is measured by profiling the teacher in this
process: forward hooks time every MoE block and the whole model during batched decoding. With
``--backend sglang`` it is measured inside SGLang's CPU engine, on the served traffic itself: the
plugin adds the time of every model forward and MoE block to ``zeda_forward_seconds`` on
``/metrics``, read before and after the run at the top concurrency. Amdahl's bound for the
ZEDA model's throughput gain is ``1 / ((1 - f) + f * (1 - r))``, with f that share and r the
r_ze measured on this traffic. The ZEDA model is profiled the same way, which gives the MoE-layer
speed-up it really gets per token, the distinct experts each MoE call runs in both models (their
ratio is the weight-traffic bound of these batches; torch profile only), and the gain Amdahl
predicts from the measured MoE-layer speed-up.

    python bench/serve.py --write BENCHMARKS.md
    python bench/serve.py --backend sglang --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import platform
import random
import shlex
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import httpx
import torch

from zeda_core.atomic import publish_benchmark
from zeda_core.checkpoint import read_config
from zeda_core.model_queries import moe_blocks, spec_from_config
from zeda_server.engine import TorchEngine
from zeda_server.engine_api import SamplingParams
from zeda_server.launch import running_server

MARKERS = {"torch": "bench:serve:cpu", "sglang": "bench:serve:cpu:sglang"}
ENGINES = {"torch": "Torch engine", "sglang": "SGLang 0.5.23 CPU engine (torch-native attention)"}
SGLANG_START_S = 600.0


def make_requests(count: int, max_tokens: int, seed: int) -> list[tuple[str, dict]]:
    """(path, body) pairs: chat arithmetic/sorting questions and code continuations, greedy."""
    rng = random.Random(seed)
    code = inspect.getsource(json).splitlines()
    requests = []
    for i in range(count):
        if i % 2 == 0:
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            question = rng.choice([f"What is {a} + {b}?", f"What is {a} - {b}?", f"Sort: {a} {b} {a % 97} {b % 89}"])
            body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0}
            requests.append(("/v1/chat/completions", body))
        else:
            start = rng.randrange(0, len(code) - 8)
            prefix = "\n".join(code[start : start + 6]) + "\n"
            requests.append(("/v1/completions", {"prompt": prefix, "max_tokens": max_tokens, "temperature": 0}))
    return requests


async def _one(client: httpx.AsyncClient, model: str, path: str, body: dict) -> dict:
    started = time.perf_counter()
    first = None
    usage = None
    async with client.stream("POST", path, json=body | {"model": model, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None:
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    return {"latency": time.perf_counter() - started, "ttft": first - started, "usage": usage}


async def run_load(url: str, model: str, requests: list[tuple[str, dict]], concurrency: int) -> dict:
    """Send ``requests`` with ``concurrency`` workers; returns throughput, latencies and r_ze."""
    queue: asyncio.Queue = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    results: list[dict] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def worker() -> None:
            while not queue.empty():
                path, body = queue.get_nowait()
                results.append(await _one(client, model, path, body))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    zeda = [r["usage"]["zeda"] for r in results]
    dense = sum(z["dense_expert_flops"] for z in zeda)
    latencies = sorted(r["latency"] for r in results)
    return {
        "requests": len(results),
        "completion_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "p50_latency_s": statistics.median(latencies),
        "p95_latency_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "p50_ttft_s": statistics.median(r["ttft"] for r in results),
        "zero_expert_ratio": sum(z["expert_flops_saved"] for z in zeda) / dense if dense else 0.0,
    }


def moe_profile(model_path: str, requests: list[tuple[str, dict]], streams: int, max_tokens: int) -> dict:
    """Where the request mix, ``streams`` at a time, spends its forward time in one model.

    Returns seconds in the whole model (``model_s``) and in its MoE blocks (``moe_s``), the tokens
    that went through MoE blocks (``moe_tokens``), and the MoE block calls (``moe_calls``) with the
    distinct experts they ran (``expert_calls``: real slots only).
    """
    engine = TorchEngine(model_path, max_batch=streams)
    spent = {"moe_s": 0.0, "model_s": 0.0, "moe_tokens": 0, "moe_calls": 0, "expert_calls": 0}
    starts: dict[int, float] = {}

    def before(module, _args) -> None:
        starts[id(module)] = time.perf_counter()

    def after(kind: str):
        def hook(module, args, _output) -> None:
            spent[kind] += time.perf_counter() - starts.pop(id(module))
            if kind == "moe_s":
                spent["moe_tokens"] += args[0].shape[0] * args[0].shape[1]

        return hook

    def count_experts(_gate, _args, routing) -> None:
        spent["moe_calls"] += 1
        spent["expert_calls"] += routing.topk_ids[~routing.zero_mask].unique().numel()

    handles = [engine.model.register_forward_pre_hook(before), engine.model.register_forward_hook(after("model_s"))]
    for block in moe_blocks(engine.model):
        handles += [block.register_forward_pre_hook(before), block.register_forward_hook(after("moe_s"))]
        handles.append(block.gate.register_forward_hook(count_experts))
    prompts = [
        engine.chat_prompt(body["messages"])
        if path.endswith("chat/completions")
        else engine.tokenizer(body["prompt"]).input_ids
        for path, body in requests
    ]

    async def decode() -> None:
        slots = asyncio.Semaphore(streams)

        async def one(prompt: list[int]) -> None:
            async with slots:
                async for _ in engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0)):
                    pass

        await asyncio.gather(*(one(p) for p in prompts))

    try:
        asyncio.run(decode())
    finally:
        for handle in handles:
            handle.remove()
        engine.shutdown()
    return spent


def forward_seconds(url: str) -> dict[str, float]:
    """The SGLang CPU engine's ``zeda_forward_seconds`` (model, moe) and ``zeda_moe_forward_slots`` samples."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    samples = {}
    for line in text.splitlines():
        for name, key in (("zeda_forward_seconds", "part"), ("zeda_moe_forward_slots", "kind")):
            prefix = f'{name}{{{key}="'
            if line.startswith(prefix):
                label, value = line[len(prefix) :].split('"} ')
                samples[label] = float(value)
    return samples


def sglang_profile(before: dict[str, float], after: dict[str, float], top_k: int) -> dict:
    """The keys of :func:`moe_profile` that SGLang's counters give, from two :func:`forward_seconds` reads."""
    spent = {key: after[key] - before[key] for key in after}
    return {
        "model_s": spent["model"],
        "moe_s": spent["moe"],
        "moe_tokens": round((spent["computed"] + spent["skipped"]) / top_k),
    }


def markdown(results: dict, command: str, backend: str) -> str:
    concurrency = sorted({int(c) for c in results["teacher"]})
    marker = MARKERS[backend]
    lines = [
        f"<!-- {marker} -->",
        f"## Serving on CPU ({backend} backend): ZEDA demo model vs its teacher "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "",
        f"Command: `{command}` ({date.today().isoformat()}). {ENGINES[backend]}, fp32, greedy, "
        f"{results['max_tokens']} max tokens, {results['requests']} requests per cell (half chat skills, half code).",
        "",
        "| streams | model | tokens/s | p50 latency | p95 latency | p50 TTFT | r_ze (served) | ZEDA/teacher tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in concurrency:
        teacher, zeda = results["teacher"][str(c)], results["zeda"][str(c)]
        for name, row in (("teacher", teacher), ("ZEDA", zeda)):
            ratio = f"{zeda['tokens_per_s'] / teacher['tokens_per_s']:.2f}x" if name == "ZEDA" else ""
            lines.append(
                f"| {c} | {name} | {row['tokens_per_s']:.1f} | {row['p50_latency_s'] * 1e3:.0f} ms | "
                f"{row['p95_latency_s'] * 1e3:.0f} ms | {row['p50_ttft_s'] * 1e3:.0f} ms | "
                f"{row['zero_expert_ratio']:.3f} | {ratio} |"
            )
    top = str(max(concurrency))
    r = results["zeda"][top]["zero_expert_ratio"]
    teacher_profile = results["profile"]["teacher"]
    share = teacher_profile["moe_s"] / teacher_profile["model_s"]
    bound = 1.0 / ((1.0 - share) + share * (1.0 - r))
    gain = results["zeda"][top]["tokens_per_s"] / results["teacher"][top]["tokens_per_s"]
    per_token = {k: p["moe_s"] / p["moe_tokens"] for k, p in results["profile"].items()}
    moe_speedup = per_token["teacher"] / per_token["zeda"]
    predicted = 1.0 / ((1.0 - share) + share / moe_speedup)
    where = "profiled in-process" if backend == "torch" else "timed inside SGLang's forward on the served traffic"
    lines += [
        "",
        f"MoE share of the teacher's forward time at {top} streams ({where}): **{share:.1%}**. "
        f"With r_ze = {r:.3f}, Amdahl's bound on the throughput gain is **{bound:.2f}x**. "
        f"Measured gain at {top} streams: **{gain:.2f}x**, {gain / bound:.0%} of the bound "
        f"({(gain - 1) / (bound - 1) if bound > 1 else 0:.0%} of the bound's speed-up over 1x).",
        "",
        f"The same profile of both models at {top} streams: the MoE blocks take {per_token['teacher'] * 1e6:.1f} us "
        f"per token and layer in the teacher and {per_token['zeda'] * 1e6:.1f} us in ZEDA, a **{moe_speedup:.2f}x** "
        f"MoE-layer speed-up where r_ze alone would allow {1 / (1 - r):.2f}x. Amdahl with the measured MoE-layer "
        f"speed-up predicts **{predicted:.2f}x**.",
    ]
    if "expert_calls" in results["profile"]["teacher"]:
        experts = {k: p["expert_calls"] / p["moe_calls"] for k, p in results["profile"].items()}
        traffic = experts["teacher"] / experts["zeda"]
        traffic_gain = 1.0 / ((1.0 - share) + share / traffic)
        lines[-1] += (
            f" Each MoE block call runs {experts['teacher']:.2f} distinct experts in the teacher and "
            f"{experts['zeda']:.2f} in ZEDA (weight-traffic bound {traffic:.2f}x). If every MoE call cost only its "
            f"distinct experts' weight reads, the gain could reach at most **{traffic_gain:.2f}x**."
        )
    lines.append(f"<!-- /{marker} -->")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=sorted(MARKERS), default="torch", help="the engine both servers run")
    parser.add_argument("--teacher", default="models/tiny-teacher")
    parser.add_argument("--zeda", default="models/tiny-zeda")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48, help="requests per model and concurrency")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, help="write the section of this Markdown file (BENCHMARKS.md)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    command = shlex.join(["python", "bench/serve.py", *sys.argv[1:]])
    requests = make_requests(args.requests, args.max_tokens, args.seed)
    results: dict = {"teacher": {}, "zeda": {}, "requests": args.requests, "max_tokens": args.max_tokens}
    paths = {"teacher": Path(args.teacher), "zeda": Path(args.zeda)}
    names = {key: path.name for key, path in paths.items()}
    flags = ("--max-batch", "32", "--backend", args.backend)
    top = max(args.concurrency)
    results["profile"] = {}
    with (
        running_server(paths["teacher"], *flags, startup_timeout=SGLANG_START_S) as teacher_url,
        running_server(paths["zeda"], *flags, startup_timeout=SGLANG_START_S) as zeda_url,
    ):
        urls = {"teacher": teacher_url, "zeda": zeda_url}
        for key in urls:  # warm-up
            asyncio.run(run_load(urls[key], names[key], requests[:4], 4))
        for round_index, concurrency in enumerate(args.concurrency):
            order = ["teacher", "zeda"] if round_index % 2 == 0 else ["zeda", "teacher"]
            for key in order:
                counted = forward_seconds(urls[key]) if args.backend == "sglang" else None
                row = asyncio.run(run_load(urls[key], names[key], requests, concurrency))
                results[key][str(concurrency)] = row
                print(json.dumps({"model": key, "concurrency": concurrency, **row}), flush=True)
                if counted is not None and concurrency == top:
                    top_k = spec_from_config(read_config(paths[key])).top_k
                    results["profile"][key] = sglang_profile(counted, forward_seconds(urls[key]), top_k)
    if args.backend == "torch":
        results["profile"] = {key: moe_profile(str(p), requests, top, args.max_tokens) for key, p in paths.items()}
    section = markdown(results, command, args.backend)
    publish_benchmark(section, MARKERS[args.backend], results, args.json, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
