"""Benchmark the zero-aware MoE layer against dense top-k and the remap-to-expert-0 variant.

All variants run side by side in one process on the same weights and routing:

- zero-aware: zero slots are dropped before any GEMM (Triton on CUDA, the torch reference on CPU);
- dense: the same path with no zero experts (every slot real), i.e. the static model;
- remap: zero slots remapped to expert 0 with weight 0, as upstream engines do (computed, wasted);
- torch reference (CUDA only): the grouped torch path on the same routing.

Each row also prints two bounds for the speed-up over dense: the compute bound ``1 / (1 - r)``,
and the weight-traffic bound: distinct experts touched by dense routing / distinct experts touched
with zero slots skipped, counted on this benchmark's own routing.

    python kernels/bench/moe.py --device cpu --json
    python kernels/bench/moe.py --device cuda --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zeda_core.atomic import write_marked_section
from zeda_kernels import moe_reference, zero_aware_moe
from zeda_kernels.benchmarking import (
    SHAPES,
    Routing,
    Shape,
    device_name,
    make_routings,
    parse_list,
    timer,
    traffic_bound,
)


def bench_shape(name: str, shape: Shape, tokens_list: list[int], ratios: list[float], device: str, repeats: int):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(shape.experts, 2 * shape.inter, shape.hidden, generator=g) / shape.hidden**0.5).to(
        device, dtype
    )
    down = (torch.randn(shape.experts, shape.hidden, shape.inter, generator=g) / shape.inter**0.5).to(device, dtype)
    shared = None
    if shape.shared_inter:
        shared = (
            (torch.randn(2 * shape.shared_inter, shape.hidden, generator=g) / shape.hidden**0.5).to(device, dtype),
            (torch.randn(shape.hidden, shape.shared_inter, generator=g) / shape.shared_inter**0.5).to(device, dtype),
        )
    moe = zero_aware_moe if device == "cuda" else moe_reference
    measure = timer(device, repeats)
    for tokens in tokens_list:
        x = torch.randn(tokens, shape.hidden, generator=g).to(device, dtype)

        def layer(routing: Routing, fn=moe, x=x) -> torch.Tensor:
            out = fn(x, routing.ids, routing.weights, routing.zero, gate_up, down)
            if shared is not None:
                gate, up = F.linear(x, shared[0]).chunk(2, dim=-1)
                out = out + F.linear(F.silu(gate) * up, shared[1])
            return out

        for ratio in ratios:
            routings = make_routings(tokens, shape, ratio, seed=tokens, device=device)
            times = {variant: measure(lambda r=routings[variant]: layer(r)) for variant in ("zero", "dense", "remap")}
            if device == "cuda":
                times["torch"] = measure(lambda r=routings["zero"]: layer(r, fn=moe_reference))
            compute = 1.0 / (1.0 - ratio) if ratio < 1 else float("inf")
            traffic = traffic_bound(routings)
            ratio_vs_dense = times["dense"] / times["zero"]
            row = {
                "shape": name,
                "tokens": tokens,
                "r": ratio,
                "ms_zero_aware": times["zero"],
                "ms_dense": times["dense"],
                "ms_remap": times["remap"],
                "ratio_vs_dense": ratio_vs_dense,
                "ratio_vs_remap": times["remap"] / times["zero"],
                "compute_bound": compute,
                "traffic_bound": traffic,
                "fraction_of_binding_bound": ratio_vs_dense / min(compute, traffic),
            }
            if "torch" in times:
                row["ratio_vs_torch_reference"] = times["torch"] / times["zero"]
            yield row


def markdown(rows: list[dict], device: str, command: str) -> str:
    cuda = device == "cuda"
    head = (
        "| shape | tokens | r | zero-aware ms | dense ms | remap ms | vs dense | vs remap "
        "| compute bound | traffic bound | of binding bound |"
    )
    if cuda:
        head += " vs torch ref |"
    lines = [
        f"<!-- bench:moe:{device} -->",
        f"## MoE layer, {device_name(device)}",
        "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}). Path measured: "
        + ("Triton `zero_aware_moe`, bf16." if cuda else "torch reference `moe_reference`, fp32."),
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for row in rows:
        cells = [
            row["shape"],
            str(row["tokens"]),
            f"{row['r']:.2f}",
            f"{row['ms_zero_aware']:.3f}",
            f"{row['ms_dense']:.3f}",
            f"{row['ms_remap']:.3f}",
            f"{row['ratio_vs_dense']:.2f}x",
            f"{row['ratio_vs_remap']:.2f}x",
            f"{row['compute_bound']:.2f}x",
            f"{row['traffic_bound']:.2f}x",
            f"{row['fraction_of_binding_bound']:.0%}",
        ]
        if cuda:
            cells.append(f"{row['ratio_vs_torch_reference']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"<!-- /bench:moe:{device} -->")
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str, device: str) -> None:
    """Replace this device's section of ``path`` (or append it), atomically."""
    header = "# Benchmarks\n\nEvery number here was measured by the command shown with it.\n"
    write_marked_section(path, f"bench:moe:{device}", section, header)


def summary_line(row: dict) -> str:
    return (
        f"{row['shape']:14s} T={row['tokens']:<6d} r={row['r']:.2f}  vs dense {row['ratio_vs_dense']:.2f}x "
        f"(compute bound {row['compute_bound']:.2f}x, traffic bound {row['traffic_bound']:.2f}x, "
        f"{row['fraction_of_binding_bound']:.0%} of binding)  vs remap {row['ratio_vs_remap']:.2f}x"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", type=lambda v: parse_list(v, str), default=list(SHAPES))
    parser.add_argument("--tokens", type=lambda v: parse_list(v, int), help="default: 1,8,64,512 (cpu) or up to 16384")
    parser.add_argument("--ratios", type=lambda v: parse_list(v, float), default=[0.0, 0.25, 0.5, 0.75])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    parser.add_argument("--write", type=Path, help="write this device's section of a Markdown file (BENCHMARKS.md)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    if any(not 0.0 <= r < 1.0 for r in args.ratios):
        parser.error("--ratios must lie in [0, 1)")
    tokens = args.tokens or ([1, 8, 64, 512] if args.device == "cpu" else [1, 8, 64, 512, 4096, 16384])
    rows = []
    for name in args.shapes:
        for row in bench_shape(name, SHAPES[name], tokens, args.ratios, args.device, args.repeats):
            rows.append(row)
            print(json.dumps(row) if args.json else summary_line(row), flush=True)
    if args.write:
        command = shlex.join(["python", "kernels/bench/moe.py", *(argv if argv is not None else sys.argv[1:])])
        write_section(args.write, markdown(rows, args.device, command), args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
