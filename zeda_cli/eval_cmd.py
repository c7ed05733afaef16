"""``zeda eval``: per-skill accuracy, perplexity, and served r_ze / expert FLOPs of a model."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from zeda_core.errors import ZedaError
from zeda_core.routing import ZERO_EXPERT_BIAS_LIMIT


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model",
        description="Per-skill exact-match accuracy, validation perplexity, and (for MoE models) r_ze and expert "
        "FLOPs per token measured as served.",
    )
    parser.add_argument("--model", required=True, help="checkpoint: local directory or hub id")
    parser.add_argument("--eval-set", type=Path, help="JSONL with prompt, answer, scorer (exact|regex), skill")
    parser.add_argument("--text", type=Path, help="also report the perplexity of this plain-text file")
    parser.add_argument("--data", type=Path, default=Path("build/data"), help="local dataset (built if missing)")
    parser.add_argument("--limit", type=int, help="evaluate at most this many items per skill")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--zero-expert-bias",
        type=float,
        default=0.0,
        help="compute dial: offset (logits) on the zero-expert router logits of every token; lower spends more "
        "expert compute, -40 none on zero experts (default 0: the model as trained)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from zeda_trainer.data.build import build_dataset
    from zeda_trainer.measure.evaluate import evaluate

    for flag, value in (
        ("--limit", args.limit),
        ("--batch-size", args.batch_size),
        ("--max-new-tokens", args.max_new_tokens),
    ):
        if value is not None and value < 1:
            raise ZedaError(f"{flag} must be >= 1, got {value}")
    if not math.isfinite(args.zero_expert_bias) or abs(args.zero_expert_bias) > ZERO_EXPERT_BIAS_LIMIT:
        raise ZedaError(
            f"--zero-expert-bias must be a finite number within ±{ZERO_EXPERT_BIAS_LIMIT:g} logits, "
            f"got {args.zero_expert_bias}"
        )
    if not (args.data / "manifest.json").is_file():
        print(f"building the local dataset in {args.data}", file=sys.stderr)
        build_dataset(args.data)
    result = evaluate(
        args.model,
        args.data,
        eval_set=args.eval_set,
        text=args.text,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        zero_expert_bias=args.zero_expert_bias,
    )
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(result: dict) -> str:
    routing = result["routing"] or {}
    domains = routing.get("domains", {})
    lines = [
        f"model {result['model']}  (zero-expert bias {result['zero_expert_bias']:+g})",
        "",
        f"{'skill':16s} {'accuracy':>9s} {'n':>6s} {'r_ze':>6s}",
    ]
    for name, skill in result["skills"].items():
        ratio = (domains.get(name) or {}).get("zero_expert_ratio")
        lines.append(f"{name:16s} {skill['accuracy']:>9.3f} {skill['n']:>6d} {_fmt(ratio, '>6.3f')}")
    lines.append(f"{'mean':16s} {result['mean_accuracy']:>9.3f}")
    ppl = result["perplexity"]
    lines += ["", f"{'perplexity':16s} {'model':>9s} {'unigram':>9s} {'r_ze':>6s}"]
    for domain, value in ppl["validation_by_domain"].items():
        ratio = (domains.get(domain) or {}).get("zero_expert_ratio")
        unigram = ppl["unigram_validation_by_domain"][domain]
        lines.append(f"{'val ' + domain:16s} {value:>9.2f} {unigram:>9.2f} {_fmt(ratio, '>6.3f')}")
    lines.append(f"{'validation':16s} {ppl['validation']:>9.2f}")
    if ppl["text"] is not None:
        lines.append(f"{'--text':16s} {ppl['text']:>9.2f}")
    lines += [
        "",
        f"r_ze (served)          {_fmt(result['zero_expert_ratio'], '.3f')}",
        f"expert FLOPs / token   {_fmt(result['expert_flops_per_token'], ',.0f')}"
        f" of {_fmt(result['dense_expert_flops_per_token'], ',.0f')} dense",
    ]
    return "\n".join(lines)
