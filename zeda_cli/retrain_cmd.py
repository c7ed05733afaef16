"""``zeda retrain``: OPD on captured traffic, a gate against the serving model, promotion by hot-swap.

Run it again with the same arguments after an interruption: the run continues where it
stopped. With ``--every 6h`` it loops, one cycle directory per run under ``--out``, each
starting from the newest promoted candidate.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from zeda_cli.durations import duration


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "retrain", help="retrain on captured traffic and promote if better", description=__doc__
    )
    parser.add_argument("--capture", type=Path, required=True, help="the server's capture store (SQLite)")
    parser.add_argument("--base", type=Path, required=True, help="the checkpoint the server serves now")
    parser.add_argument("--out", type=Path, required=True, help="run directory (with --every: one cycle-* per run)")
    parser.add_argument("--config", type=Path, default=Path("trainer/configs/tiny-retrain.yaml"), help="YAML recipe")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    parser.add_argument("--server", default=None, help="promote a passing candidate into this zeda server (URL)")
    parser.add_argument("--admin-key", default=None, help="the server's admin key (env ZEDA_ADMIN_KEY)")
    parser.add_argument("--every", type=duration, default=None, help="run as a loop, one run per period (e.g. 6h)")
    parser.add_argument("--cycles", type=int, default=None, help="with --every: stop after this many runs")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from zeda_core.errors import ZedaError
    from zeda_core.traffic import open_existing_store
    from zeda_trainer.common.recipes import load_recipe
    from zeda_trainer.retrain.job import RetrainConfig, next_cycle_dir, render_verdict, retrain_once, serving_base

    if args.cycles is not None and (args.cycles < 1 or args.every is None):
        raise ZedaError(f"--cycles {args.cycles}: needs --every and a value >= 1")
    config = load_recipe(RetrainConfig, args.config, args.set)
    store = open_existing_store(args.capture)
    admin_key = args.admin_key or os.environ.get("ZEDA_ADMIN_KEY")
    if args.every is None:
        verdict = retrain_once(config, store, args.base, args.out, args.server, admin_key)
        print(render_verdict(verdict))
        print(f"verdict written to {args.out / 'verdict.json'}")
        return 1 if verdict.get("promotion", "").startswith("failed") else 0
    cycles = 0
    while True:
        started = time.monotonic()
        cycle = next_cycle_dir(args.out)
        base = serving_base(args.out, args.base)
        verdict = retrain_once(config, store, base, cycle, args.server, admin_key)
        print(render_verdict(verdict))
        print(f"verdict written to {cycle / 'verdict.json'}", flush=True)
        cycles += 1
        if args.cycles is not None and cycles >= args.cycles:
            return 0
        time.sleep(max(0.0, args.every - (time.monotonic() - started)))
