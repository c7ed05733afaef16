"""``zeda analyze``: a self-contained HTML report of where a ZEDA model spends experts on a prompt set.

Tokens coloured by the real experts they used, per-layer and per-domain r_ze, Spearman
correlations of per-token compute with the teacher-student log-prob difference and the teacher's
entropy (sign and p-value), the expected expert-FLOP saving on this traffic and the worst prompts
by quality loss. The prompt file is a JSONL prompt set (``prompt``, optional ``chat`` and
``domain``), e.g. the output of ``zeda capture export``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("analyze", help="token-level routing analysis (HTML report)", description=__doc__)
    parser.add_argument("--model", required=True, help="the ZEDA checkpoint")
    parser.add_argument("--teacher", required=True, help="the original model it was distilled from")
    parser.add_argument("--prompts", type=Path, required=True, help="JSONL prompt set")
    parser.add_argument("--out", type=Path, default=Path("analysis.html"), help="HTML report to write")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures as JSON")
    parser.add_argument(
        "--figures", type=Path, default=None, help="also write the plots as PNG files in this directory"
    )
    parser.add_argument("--limit", type=int, default=200, help="analyse the first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from zeda_core.errors import ZedaError
    from zeda_trainer.measure.analyze import analyze
    from zeda_trainer.measure.analyze_report import p_value_text, write_analysis

    for flag, value in (("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise ZedaError(f"{flag} must be >= 1, got {value}")
    analysis = analyze(args.model, args.teacher, args.prompts, args.limit, args.max_new_tokens)
    write_analysis(analysis, args.out, args.json, args.figures)
    print(f"{len(analysis.prompts)} prompts: expert FLOPs saved {analysis.zero_ratio:.1%} on this traffic")
    for c in analysis.correlations:
        print(f"  compute vs {c.name}: Spearman rho {c.rho:+.3f} (p {p_value_text(c.p_value)}, {c.n} tokens)")
    print(f"report written to {args.out}")
    return 0
