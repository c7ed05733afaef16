"""``zeda convert``: inject zero experts into a MoE checkpoint and save it in the ZEDA format.

The conversion streams (:func:`zeda_core.convert_stream.convert_checkpoint`): memory stays at
about the largest tensor, whatever the model's size. ``--probe`` then loads the written model,
all of it, to measure r_ze at init.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from zeda_cli.probe import probe_flops, random_tokens
from zeda_core.checkpoint import load_model, resolve_checkpoint
from zeda_core.convert import ZERO_INITS
from zeda_core.convert_stream import StreamedConversion, convert_checkpoint
from zeda_core.errors import ZedaError

PROBE_TOKENS = 512
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="add zero experts to a MoE checkpoint",
        description="Add Z parameter-free zero experts to every MoE layer and write a ZEDA checkpoint. "
        "Streams tensor by tensor: memory stays near the largest tensor, the time is one read and one "
        "write of the checkpoint.",
    )
    parser.add_argument("--model", required=True, help="source MoE checkpoint: local directory or hub id")
    parser.add_argument("--zero-experts", type=int, required=True, help="Z, zero experts per MoE layer (rule: N/2)")
    parser.add_argument("--init", choices=ZERO_INITS, default="gaussian", help="new router rows (default: gaussian)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the gaussian rows and of the probe")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="cast floating-point weights to this dtype (default: keep the source's)"
    )
    parser.add_argument(
        "--probe",
        action="store_true",
        help=f"then load the converted model (the whole model, into memory) and measure r_ze at init on "
        f"{PROBE_TOKENS} random tokens; off by default, for large models",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.zero_experts < 1:
        raise ZedaError(f"--zero-experts must be >= 1, got {args.zero_experts}")
    if args.out.exists() and not args.overwrite:
        raise ZedaError(f"--out {args.out} already exists; pass --overwrite to replace it")
    source = resolve_checkpoint(args.model)
    start = time.perf_counter()
    done = convert_checkpoint(
        source,
        args.out,
        args.zero_experts,
        init=args.init,
        seed=args.seed,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        overwrite=args.overwrite,
        progress=True,
    )
    seconds = time.perf_counter() - start
    ratio = _probe(done.out, args.seed) if args.probe else None
    _print_summary(done, args.init, ratio, seconds)
    return 0


def _probe(out: Path, seed: int) -> float:
    """r_ze at init of the converted model on random tokens (loads the whole model)."""
    model = load_model(out)
    return probe_flops(model, random_tokens(model.config.vocab_size, PROBE_TOKENS, seed)).zero_expert_ratio


def _print_summary(done: StreamedConversion, init: str, ratio: float | None, seconds: float) -> None:
    spec = done.spec
    router_params = done.moe_layers * spec.num_zero_experts * done.hidden_size
    if spec.zero_logit_bias:
        router_params += done.moe_layers * spec.num_zero_experts
    measured = (
        f"{ratio:.3f} (measured on {PROBE_TOKENS} random tokens)" if ratio is not None else "not measured (--probe)"
    )
    lines = [
        f"converted  {done.model_type}: {done.moe_layers} MoE layers",
        f"router     {spec.num_experts} -> {spec.num_rows} rows per layer (+{spec.num_zero_experts} zero experts), "
        f"top-{spec.top_k}, init {init}",
        f"params     +{router_params} router parameters, +0 expert parameters",
        f"r_ze@init  {measured}",
        f"written    {done.out} ({done.bytes_written / 1e9:.2f} GB in {seconds:.1f} s)",
    ]
    print("\n".join(lines))
