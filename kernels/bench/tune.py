"""Tune the grouped-GEMM launch configuration per shape and token count; writes ``tuned.json``.

For every token count, each candidate configuration runs the zero-aware MoE layer at r = 0.5,
and the fastest is kept. Run it on the GPU that will serve:

    python kernels/bench/tune.py --shapes qwen3-30b-a3b,glm-4.7-flash
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from zeda_core.atomic import atomic_write_text
from zeda_kernels import zero_aware_moe
from zeda_kernels.benchmarking import SHAPES, make_routings, parse_list, timer
from zeda_kernels.configs import TUNED_FILE, GemmConfig, shape_key

CANDIDATES = [
    GemmConfig(bm, bn, bk, warps, stages)
    for bm, bn, bk, warps, stages in itertools.product((16, 32, 64, 128), (64, 128), (64, 128), (4, 8), (3, 4))
]


def tune(shape_name: str, tokens_list: list[int], candidates: list[GemmConfig], device: str, repeats: int) -> list:
    shape = SHAPES[shape_name]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(shape.experts, 2 * shape.inter, shape.hidden, generator=g).to(device, dtype)
    down = torch.randn(shape.experts, shape.hidden, shape.inter, generator=g).to(device, dtype)
    measure = timer(device, repeats)
    rows = []
    for tokens in tokens_list:
        x = torch.randn(tokens, shape.hidden, generator=g).to(device, dtype)
        routing = make_routings(tokens, shape, 0.5, seed=tokens, device=device)["zero"]
        timed = []
        for config in candidates:

            def layer(config=config, x=x, routing=routing) -> torch.Tensor:
                return zero_aware_moe(x, routing.ids, routing.weights, routing.zero, gate_up, down, config)

            try:
                ms = measure(layer)
            except Exception as exc:  # a config the compiler rejects (e.g. out of shared memory) is skipped
                print(f"  skip {config}: {type(exc).__name__}", file=sys.stderr)
                continue
            timed.append((ms, config))
        best_ms, best = min(timed, key=lambda item: item[0])
        print(f"{shape_name} T={tokens}: {best} {best_ms:.3f} ms", flush=True)
        rows.append([tokens, best.block_m, best.block_n, best.block_k, best.num_warps, best.num_stages])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=lambda v: parse_list(v, str), default=["qwen3-30b-a3b", "glm-4.7-flash"])
    parser.add_argument("--tokens", type=lambda v: parse_list(v, int), default=[1, 8, 64, 512, 4096, 16384])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--candidates", type=int, help="try only the first N candidate configs")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=TUNED_FILE)
    args = parser.parse_args(argv)
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    table = json.loads(args.out.read_text()) if args.out.is_file() else {}
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    for name in args.shapes:
        shape = SHAPES[name]
        key = shape_key(torch.device(args.device), shape.experts, shape.hidden, shape.inter, dtype)
        table[key] = tune(name, sorted(args.tokens), CANDIDATES[: args.candidates], args.device, args.repeats)
    atomic_write_text(args.out, json.dumps(table, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
