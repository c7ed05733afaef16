"""``zeda capture export``: dump the server's traffic store to JSONL (a prompt set for ``zeda retrain``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from zeda_cli.durations import duration


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("capture", help="work with captured traffic", description=__doc__)
    actions = parser.add_subparsers(dest="action", required=True)
    export = actions.add_parser("export", help="write captured requests to JSONL, oldest first")
    export.add_argument("--db", type=Path, required=True, help="the store given to `zeda serve --capture-db`")
    export.add_argument("--out", type=Path, required=True, help="JSONL file to write (atomically)")
    export.add_argument("--since", type=duration, default=None, help="only rows newer than this, e.g. 24h")
    export.add_argument("--limit", type=int, default=None, help="at most this many (the newest) rows")
    export.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    from zeda_core.errors import ZedaError
    from zeda_core.traffic import open_existing_store

    if args.limit is not None and args.limit < 1:
        raise ZedaError(f"--limit must be >= 1, got {args.limit}")
    since = time.time() - args.since if args.since is not None else 0.0
    store = open_existing_store(args.db)
    count = store.export_jsonl(args.out, since=since, limit=args.limit)
    print(f"{count} captured requests written to {args.out}")
    return 0
