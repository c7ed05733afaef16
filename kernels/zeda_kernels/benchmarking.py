"""Shared pieces of the kernel benchmarks: reference shapes, controlled routings, timing."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Shape:
    hidden: int
    inter: int
    experts: int
    zero_experts: int
    top_k: int
    shared_inter: int = 0


SHAPES = {
    "qwen3-30b-a3b": Shape(hidden=2048, inter=768, experts=128, zero_experts=64, top_k=8),
    # GLM-4.7-Flash: moe_intermediate_size 1536, 64 routed + 1 shared expert, top-4.
    "glm-4.7-flash": Shape(hidden=2048, inter=1536, experts=64, zero_experts=32, top_k=4, shared_inter=1536),
    "tiny-teacher": Shape(hidden=128, inter=256, experts=8, zero_experts=4, top_k=2),
}


@dataclass(frozen=True)
class Routing:
    ids: torch.Tensor
    weights: torch.Tensor
    zero: torch.Tensor


def make_routings(tokens: int, shape: Shape, ratio: float, seed: int, device: str) -> dict[str, Routing]:
    """Zero-aware, dense and remapped routings of the same tokens with exactly ``ratio`` zero slots."""
    g = torch.Generator().manual_seed(seed)
    k = shape.top_k
    ids = torch.rand(tokens, shape.experts, generator=g).argsort(dim=-1)[:, :k].contiguous()
    weights = torch.softmax(torch.randn(tokens, k, generator=g), dim=-1)
    zero = torch.zeros(tokens * k, dtype=torch.bool)
    zero[torch.randperm(tokens * k, generator=g)[: round(ratio * tokens * k)]] = True
    zero = zero.view(tokens, k)
    no_zero = torch.zeros_like(zero)
    routings = {
        "zero": Routing(torch.where(zero, shape.experts, ids), weights.masked_fill(zero, 0.0), zero),
        "dense": Routing(ids, weights, no_zero),
        "remap": Routing(torch.where(zero, 0, ids), weights.masked_fill(zero, 0.0), no_zero),
    }
    return {name: Routing(r.ids.to(device), r.weights.to(device), r.zero.to(device)) for name, r in routings.items()}


def traffic_bound(routings: dict[str, Routing]) -> float:
    dense = routings["dense"].ids.unique().numel()
    skipped = routings["zero"].ids[~routings["zero"].zero].unique().numel()
    return dense / skipped if skipped else float("inf")


def timer(device: str, repeats: int) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of ``fn`` after one warm-up call."""

    def measure(fn: Callable[[], object]) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                tick = time.perf_counter()
                fn()
                samples.append(1000 * (time.perf_counter() - tick))
        return statistics.median(samples)

    return measure


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"CPU {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"CPU {platform.processor()} ({torch.get_num_threads()} threads)"


def parse_list(value: str, kind: type) -> list:
    try:
        return [kind(v) for v in value.split(",") if v]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of {kind.__name__}: {value!r}") from exc
