"""``zeda`` entry point: dispatches to subcommands; bad input prints one line and exits 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from zeda_cli import (
    analyze_cmd,
    capture_cmd,
    compare_cmd,
    convert_cmd,
    data_cmd,
    eval_cmd,
    inspect_cmd,
    retrain_cmd,
    serve_cmd,
    tiny_cmd,
    train_cmd,
)
from zeda_core.errors import ZedaError

SUBCOMMANDS = (
    tiny_cmd,
    convert_cmd,
    inspect_cmd,
    data_cmd,
    train_cmd,
    eval_cmd,
    serve_cmd,
    capture_cmd,
    retrain_cmd,
    compare_cmd,
    analyze_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zeda", description="Zero-expert self-distillation for MoE models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ZedaError as exc:
        print(f"zeda {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
