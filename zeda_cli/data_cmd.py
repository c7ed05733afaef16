"""``zeda data build``: the deterministic local dataset (skills, stdlib code and prose, prompt sets)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="build the local dataset", description=__doc__)
    actions = parser.add_subparsers(dest="action", required=True)
    build = actions.add_parser("build", help="write the dataset (JSONL + manifest) to a directory")
    build.add_argument("--out", type=Path, default=Path("build/data"), help="output directory (default build/data)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    build.set_defaults(run=run_build)


def run_build(args: argparse.Namespace) -> int:
    from zeda_trainer.data.build import build_dataset

    manifest = build_dataset(args.out, seed=args.seed, overwrite=args.overwrite)
    for name, info in sorted(manifest["files"].items()):
        print(f"{name:28s} {info['count']:>8,d} rows  sha256 {info['sha256'][:16]}")
    print(f"written {args.out} (seed {args.seed})")
    return 0
