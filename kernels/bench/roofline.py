"""CPU roofline of the expert pass: why zero slots save less than 1/(1-r) at prefill sizes.

At a prefill of T tokens every expert is touched whether or not zero slots are skipped (the
weight-traffic bound is 1.0), so the layer at zero share r streams the same expert weights and
does (1 - r) of the arithmetic. This measures, side by side in one process:

- the memory read bandwidth (a sum over a 1 GiB float32 tensor);
- the float32 GEMM rate (a square matmul; the attainable rate is the best of it and the expert
  passes below, since oneDNN's prepacked kernels beat the square matmul on some CPUs);
- one pass over all N experts with m rows each, as the torch reference runs it (two
  ``F.linear`` per expert), with the weights prepacked once for oneDNN, and the same in bfloat16
  (half the bytes to stream), for m = the rows per expert at r = 0 (T*K/N) and at r = 0.5.

From the first two it derives the ratio r = 0 / r = 0.5 that an expert pass could reach: with no
overlap of weight streaming and arithmetic (time = bytes / bandwidth + FLOPs / rate), and with
perfect overlap (time = the larger of the two).

    python kernels/bench/roofline.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from zeda_core.atomic import write_marked_section
from zeda_kernels.benchmarking import SHAPES, Shape, device_name, timer

MARKER = "bench:roofline:cpu"
PATHS = (
    ("F.linear (torch reference)", False, torch.float32),
    ("oneDNN, weights prepacked", True, torch.float32),
    ("oneDNN, weights prepacked, bfloat16", True, torch.bfloat16),
)


def read_bandwidth_gbs(repeats: int) -> float:
    """GB/s of a sum over a 1 GiB float32 tensor (best of ``repeats``)."""
    data = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(repeats + 1):
        tick = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - tick)
    return data.numel() * 4 / best / 1e9


def gemm_gflops(size: int, repeats: int) -> float:
    """GFLOP/s of a float32 [size, size] x [size, size] matmul (median of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    ms = timer("cpu", repeats)(lambda: a @ b)
    return 2 * size**3 / (ms / 1000) / 1e9


def expert_passes(
    shape: Shape, rows_list: list[int], prepacked: bool, dtype: torch.dtype = torch.float32
) -> dict[int, Callable[[], None]]:
    """Per row count, one SwiGLU pass of that many tokens through every expert (weights of
    ``dtype`` shared by all the passes; prepacked for oneDNN once, with the largest row count as
    the hint)."""
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(shape.experts, 2 * shape.inter, shape.hidden, generator=g) / shape.hidden**0.5).to(dtype)
    down = (torch.randn(shape.experts, shape.hidden, shape.inter, generator=g) / shape.inter**0.5).to(dtype)
    if prepacked:
        hint = max(rows_list)
        packed = [
            (
                torch.ops.mkldnn._reorder_linear_weight(gate_up[e], hint),
                torch.ops.mkldnn._reorder_linear_weight(down[e], hint),
            )
            for e in range(shape.experts)
        ]
        del gate_up, down

        def linear(inputs: torch.Tensor, expert: int, which: int) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(inputs, packed[expert][which], None, "none", [], "")
    else:

        def linear(inputs: torch.Tensor, expert: int, which: int) -> torch.Tensor:
            return F.linear(inputs, (gate_up, down)[which][expert])

    def one_pass(x: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            for expert in range(shape.experts):
                gate, up = linear(x, expert, 0).chunk(2, dim=-1)
                linear(F.silu(gate) * up, expert, 1)

        return run

    return {rows: one_pass(torch.randn(rows, shape.hidden, generator=g).to(dtype)) for rows in rows_list}


def interleaved_ms(passes: dict[int, Callable[[], None]], repeats: int) -> tuple[dict[int, float], float]:
    """Median ms per pass, timed in turn within each repeat, and the median of the per-repeat
    ratios largest / second largest row count (side by side, so host noise hits both alike)."""
    for run in passes.values():
        run()
    samples: dict[int, list[float]] = {rows: [] for rows in passes}
    for _ in range(repeats):
        for rows, run in passes.items():
            tick = time.perf_counter()
            run()
            samples[rows].append(1000 * (time.perf_counter() - tick))
    big, half = sorted(passes)[-1], sorted(passes)[-2]
    ratios = [b / h for b, h in zip(samples[big], samples[half], strict=True)]
    return {rows: statistics.median(values) for rows, values in samples.items()}, statistics.median(ratios)


def measure(shape_name: str, tokens: int, repeats: int) -> dict:
    """Bandwidth, GEMM rate, measured expert passes at r = 0 and r = 0.5, and the model's bounds."""
    shape = SHAPES[shape_name]
    rows_dense = tokens * shape.top_k // shape.experts
    rows_half = rows_dense // 2
    weight_params = shape.experts * 3 * shape.hidden * shape.inter
    weight_bytes = weight_params * 4  # float32, as the bounds model it
    bandwidth = read_bandwidth_gbs(repeats)
    square_rate = gemm_gflops(2048, repeats)
    stream_ms = weight_bytes / (bandwidth * 1e9) * 1000
    paths = {}
    for path, prepacked, dtype in PATHS:
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            continue  # oneDNN's bf16 linear needs AVX-512 (bw/vl/dq) or AVX-NE-CONVERT; this CPU has neither
        ms, ratio = interleaved_ms(expert_passes(shape, [1, rows_half, rows_dense], prepacked, dtype), repeats)
        paths[path] = {
            "dtype": str(dtype).removeprefix("torch."),
            "ms": ms,
            "weights_gbs_at_1_row": weight_params * dtype.itemsize / (ms[1] / 1000) / 1e9,
            "gflops_at_r0": _flops(shape, rows_dense) / (ms[rows_dense] / 1000) / 1e9,
            "ratio_r0_over_r05": ratio,
        }
    # The bounds model float32 streaming and arithmetic, so only the float32 passes set the rate.
    rate = max(square_rate, *(p["gflops_at_r0"] for p in paths.values() if p["dtype"] == "float32"))
    compute_ms = {rows: _flops(shape, rows) / (rate * 1e9) * 1000 for rows in (rows_half, rows_dense)}
    no_overlap = (stream_ms + compute_ms[rows_dense]) / (stream_ms + compute_ms[rows_half])
    overlap = max(stream_ms, compute_ms[rows_dense]) / max(stream_ms, compute_ms[rows_half])
    return {
        "shape": shape_name,
        "tokens": tokens,
        "rows_per_expert": {"r=0": rows_dense, "r=0.5": rows_half},
        "expert_weights_gb": weight_bytes / 1e9,
        "read_bandwidth_gbs": bandwidth,
        "square_gemm_gflops": square_rate,
        "attainable_gflops": rate,
        "weight_stream_ms": stream_ms,
        "compute_ms": {"r=0": compute_ms[rows_dense], "r=0.5": compute_ms[rows_half]},
        "bound_no_overlap": no_overlap,
        "bound_full_overlap": overlap,
        "paths": paths,
    }


def _flops(shape: Shape, rows: int) -> float:
    return shape.experts * rows * 2 * 3 * shape.hidden * shape.inter


def markdown(result: dict, command: str) -> str:
    rows = result["rows_per_expert"]
    lines = [
        f"<!-- {MARKER} -->",
        f"## Expert pass roofline, {device_name('cpu')}",
        "",
        f"Command: `{command}` ({date.today().isoformat()}). Shape {result['shape']}, {result['tokens']} tokens: "
        f"{rows['r=0']} rows per expert at r = 0, {rows['r=0.5']} at r = 0.5, every expert touched in both; "
        f"{result['expert_weights_gb']:.2f} GB of float32 expert weights per pass.",
        "",
        f"- Memory read bandwidth: **{result['read_bandwidth_gbs']:.1f} GB/s**, so streaming the expert weights "
        f"takes at least {result['weight_stream_ms']:.1f} ms.",
        f"- float32 GEMM rate: {result['square_gemm_gflops']:.0f} GFLOP/s for a square matmul, "
        f"**{result['attainable_gflops']:.0f} GFLOP/s** attainable (the best float32 pass below), so the arithmetic "
        f"takes at least "
        f"{result['compute_ms']['r=0']:.1f} ms at r = 0 and {result['compute_ms']['r=0.5']:.1f} ms at r = 0.5.",
        f"- Ratio r = 0 / r = 0.5 these allow: **{result['bound_no_overlap']:.2f}x** if streaming and arithmetic do "
        f"not overlap, **{result['bound_full_overlap']:.2f}x** if they overlap perfectly.",
        "",
        "| expert pass | 1 row ms | r = 0.5 ms | r = 0 ms | weights streamed at 1 row | GFLOP/s at r = 0 "
        "| r = 0 / r = 0.5 (median of rounds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for path, measured in result["paths"].items():
        ms = measured["ms"]
        lines.append(
            f"| {path} | {ms[1]:.1f} | {ms[rows['r=0.5']]:.1f} | {ms[rows['r=0']]:.1f} "
            f"| {measured['weights_gbs_at_1_row']:.1f} GB/s | {measured['gflops_at_r0']:.0f} "
            f"| {measured['ratio_r0_over_r05']:.2f}x |"
        )
    lines.append(f"<!-- /{MARKER} -->")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    parser.add_argument("--tokens", type=int, default=512, help="prefill tokens (default 512)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median; default 7)")
    parser.add_argument("--write", type=Path, help="replace the roofline section of this Markdown file")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    if args.tokens * shape.top_k < 2 * shape.experts:
        parser.error(
            f"--tokens {args.tokens} gives under 2 rows per expert; use at least {2 * shape.experts // shape.top_k}"
        )
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    result = measure(args.shape, args.tokens, args.repeats)
    command = shlex.join(["python", "kernels/bench/roofline.py", *sys.argv[1:]])
    text = markdown(result, command)
    if args.json:
        print(json.dumps(result))
    else:
        print(text)
    if args.write:
        write_marked_section(args.write, MARKER, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
