"""``zeda inspect``: routing spec and measured expert-FLOP savings of a checkpoint."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from zeda_cli.probe import probe_flops, random_tokens
from zeda_core.checkpoint import load_model, resolve_checkpoint
from zeda_core.errors import ZedaError
from zeda_core.model_queries import model_spec


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show a checkpoint's routing and measured FLOP savings",
        description="Load a ZEDA or plain MoE checkpoint, print its routing spec, and measure r_ze and "
        "expert FLOPs on a probe: random token ids, or the tokens of a text file.",
    )
    parser.add_argument("--model", required=True, help="checkpoint: local directory or hub id")
    parser.add_argument("--tokens", type=int, default=256, help="length of the random-token probe (default 256)")
    parser.add_argument("--text", type=Path, help="probe with this text file (needs the checkpoint's tokenizer)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-token probe")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.tokens < 1:
        raise ZedaError(f"--tokens must be >= 1, got {args.tokens}")
    checkpoint = resolve_checkpoint(args.model)
    model = load_model(checkpoint)
    tokens = (
        _text_tokens(checkpoint, args.text)
        if args.text
        else random_tokens(model.config.vocab_size, args.tokens, args.seed)
    )
    report = probe_flops(model, tokens)
    spec = model_spec(model)
    probe = f"text {args.text}" if args.text else f"{tokens.shape[1]} random tokens"
    result = {
        "model": str(args.model),
        "family": model.config.model_type,
        "routing": asdict(spec),
        "probe": probe,
        "tokens": report.tokens,
        "per_layer_zero_ratio": list(report.per_layer_zero_ratio),
        "expert_flops_per_token": report.expert_flops_per_token,
        "total_flops_saved_ratio": report.total_flops_saved_ratio,
        **report.usage(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"model        {args.model} ({result['family']})\n"
            f"routing      N={spec.num_experts} real + Z={spec.num_zero_experts} zero experts, top-{spec.top_k}, "
            f"{spec.score_func}\n"
            f"probe        {probe}\n"
            f"r_ze         {report.zero_expert_ratio:.3f} (per layer: "
            + ", ".join(f"{r:.2f}" for r in report.per_layer_zero_ratio)
            + ")\n"
            f"expert FLOPs {report.expert_flops:,} spent, {report.expert_flops_saved:,} saved of "
            f"{report.dense_expert_flops:,} ({report.zero_expert_ratio:.1%})\n"
            f"total FLOPs  {report.total_flops_saved_ratio:.1%} saved (shared experts, attention, LM head included)"
        )
    return 0


def _text_tokens(checkpoint: Path, text: Path):
    from transformers import AutoTokenizer

    if not text.is_file():
        raise ZedaError(f"--text {text} is not a file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as exc:
        raise ZedaError(f"--text needs a tokenizer in {checkpoint}: {exc}") from exc
    ids = tokenizer(text.read_text(), return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ZedaError(f"--text {text} holds no tokens")
    return ids
