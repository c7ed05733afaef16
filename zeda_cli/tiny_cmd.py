"""``zeda tiny``: write a tiny random-init MoE checkpoint of a supported family (offline)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from zeda_core.checkpoint import save_model
from zeda_core.errors import ZedaError
from zeda_core.families import FAMILIES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tiny",
        help="write a tiny random MoE checkpoint",
        description="Write a tiny random-init checkpoint of a supported MoE family, to try the tools offline.",
    )
    parser.add_argument("--family", default="qwen3_moe", choices=sorted(FAMILIES), help="HF model_type")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.overwrite:
        raise ZedaError(f"--out {args.out} already exists; pass --overwrite to replace it")
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[args.family].tiny_config())
    out = save_model(model, args.out, overwrite=args.overwrite)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote a tiny {args.family} model ({params:,} parameters) to {out}")
    return 0
