"""``zeda convert``: inject zero experts into a MoE checkpoint and save it in the ZEDA format."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from zeda_cli.probe import probe_flops, random_tokens
from zeda_core.checkpoint import load_model, read_config, resolve_checkpoint, save_model
from zeda_core.convert import ZERO_INITS, inject_zero_experts
from zeda_core.errors import ZedaError
from zeda_core.model_queries import moe_blocks
from zeda_core.spec import RoutingSpec, read_num_zero_experts

PROBE_TOKENS = 512


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="add zero experts to a MoE checkpoint",
        description="Add Z parameter-free zero experts to every MoE layer and write a ZEDA checkpoint.",
    )
    parser.add_argument("--model", required=True, help="source MoE checkpoint: local directory or hub id")
    parser.add_argument("--zero-experts", type=int, required=True, help="Z, zero experts per MoE layer (rule: N/2)")
    parser.add_argument("--init", choices=ZERO_INITS, default="gaussian", help="new router rows (default: gaussian)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the gaussian rows and of the probe")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.zero_experts < 1:
        raise ZedaError(f"--zero-experts must be >= 1, got {args.zero_experts}")
    if args.out.exists() and not args.overwrite:
        raise ZedaError(f"--out {args.out} already exists; pass --overwrite to replace it")
    source = resolve_checkpoint(args.model)
    already = read_num_zero_experts(read_config(source))
    if already:
        raise ZedaError(f"--model {args.model} is already a ZEDA checkpoint with {already} zero experts per layer")
    model = load_model(source, zero_aware=False)
    spec = inject_zero_experts(model, args.zero_experts, init=args.init, seed=args.seed, progress=True)
    ratio = probe_flops(model, random_tokens(model.config.vocab_size, PROBE_TOKENS, args.seed)).zero_expert_ratio
    out = save_model(model, args.out, overwrite=args.overwrite, side_files_from=source)
    _print_summary(model, spec, args.init, ratio, out)
    return 0


def _print_summary(model: torch.nn.Module, spec: RoutingSpec, init: str, ratio: float, out: Path) -> None:
    layers = len(moe_blocks(model))
    hidden = model.config.hidden_size
    router_params = layers * spec.num_zero_experts * hidden
    if spec.zero_logit_bias:
        router_params += layers * spec.num_zero_experts
    lines = [
        f"converted  {model.config.model_type}: {layers} MoE layers",
        f"router     {spec.num_experts} -> {spec.num_rows} rows per layer (+{spec.num_zero_experts} zero experts), "
        f"top-{spec.top_k}, init {init}",
        f"params     +{router_params} router parameters, +0 expert parameters",
        f"r_ze@init  {ratio:.3f} (measured on {PROBE_TOKENS} random tokens)",
        f"written    {out}",
    ]
    print("\n".join(lines))
