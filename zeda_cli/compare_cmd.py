"""``zeda compare``: sweep ZEDA and the dynamic-MoE baselines, quality against expert FLOPs saved.

Writes ``compare.md``, ``compare.json``, ``pareto.png`` and a self-contained ``compare.html``
to the output directory. AdaMoE points are trained once into the work directory and reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compare", help="ZEDA against the baselines: quality vs FLOPs", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("trainer/configs/tiny-compare.yaml"), help="YAML recipe")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    parser.add_argument("--teacher", default=None, help="the original model (recipe key teacher)")
    parser.add_argument("--zeda", action="append", default=None, help="a ZEDA checkpoint; repeat for several")
    parser.add_argument("--data", default=None, help="data directory of `zeda data build` (recipe key data_dir)")
    parser.add_argument("--out", default=None, help="where the table and plots go (recipe key out)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from zeda_trainer.common.recipes import load_recipe
    from zeda_trainer.measure.compare import CompareConfig, run_compare
    from zeda_trainer.measure.compare_report import margins, markdown_table, write_report

    flags = {"teacher": args.teacher, "data_dir": args.data, "out": args.out}
    overrides = [f"{key}={value}" for key, value in flags.items() if value is not None]
    if args.zeda:
        overrides.append(f"zeda=[{', '.join(repr(z) for z in args.zeda)}]")
    config = load_recipe(CompareConfig, args.config, [*overrides, *args.set])
    points = run_compare(config)
    write_report(points, config)
    print(markdown_table(points, margins(points), config))
    print(f"written to {config.out}/compare.md, compare.json, pareto.png, compare.html")
    return 0
