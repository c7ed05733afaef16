"""``zeda serve``: the OpenAI-compatible server (no arguments: the committed tiny ZEDA model on CPU)."""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from zeda_core.errors import ZedaError

FLAGS = {
    "--model": (str, "checkpoint directory or hub id (ZEDA, reference-format, or a plain MoE as the baseline)"),
    "--served-model-name": (str, "the model id clients send (default: the checkpoint's directory name)"),
    "--backend": (str, "torch (CPU or one GPU) or sglang (SGLang's engine: GPU hosts, TP/EP, or its CPU engine)"),
    "--device": (str, "torch device of the torch engine, e.g. cpu or cuda"),
    "--dtype": (str, "auto, float32, bfloat16 or float16"),
    "--moe-backend": (
        str,
        "torch engine: what computes the experts: auto (the Triton kernel on CUDA, torch on CPU), torch, or "
        "triton (CUDA, or TRITON_INTERPRET=1 on CPU); sglang runs its own fused MoE (auto only)",
    ),
    "--host": (str, "interface to listen on"),
    "--port": (int, "port to listen on"),
    "--api-key": (str, "require this bearer key on inference routes"),
    "--admin-key": (str, "require this bearer key on admin routes"),
    "--max-batch": (int, "requests decoded together"),
    "--max-queue": (int, "requests held before answering 429"),
    "--max-tokens-cap": (int, "largest max_tokens a request may ask for"),
    "--max-total-tokens": (
        int,
        "KV-cache tokens the batch may hold; torch: a cap (prompt + max_tokens per request) with queueing past it, "
        "default max-batch contexts; sglang: the pool (CPU default: max-batch contexts, at most 65536)",
    ),
    "--tp-size": (int, "sglang: tensor-parallel ranks"),
    "--shutdown-timeout": (float, "seconds admitted requests may run on after SIGTERM before they are cancelled"),
    "--request-timeout": (float, "per-request deadline in seconds (off when unset): 504, or an error chunk"),
    "--capture-db": (str, "capture prompts into this SQLite file (off when unset)"),
    "--capture-completions": (str, "also capture completions (true/false)"),
    "--capture-max-rows": (int, "rows the capture store keeps (oldest dropped first)"),
    "--capture-max-age-days": (float, "captured rows older than this are dropped"),
    "--capture-max-mb": (int, "size bound of the capture store; the oldest rows go first"),
    "--compute-tiers": (str, "named zero_expert_bias values requests pick by compute_tier, e.g. fast=2,quality=-30"),
    "--target-zero-expert-ratio": (
        float,
        "hold the served r_ze at this share in [0, 1]: a PI controller moves the server's zero-expert offset",
    ),
    "--adaptive-compute": (str, "off, or queue: raise the zero-expert offset while the queue is deep (cheaper tokens)"),
    "--adaptive-queue-depth": (int, "adaptive-compute queue: waiting requests from which the offset rises"),
    "--adaptive-max-offset": (float, "adaptive-compute queue: the highest load offset, in logits"),
    "--zero-ratio-window-tokens": (int, "served tokens of the sliding window the dashboard shows r_ze over"),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a model over the OpenAI API", description=__doc__)
    for flag, (kind, help_text) in FLAGS.items():
        parser.add_argument(
            flag, type=kind, default=None, help=f"{help_text} (env ZEDA_{flag[2:].upper().replace('-', '_')})"
        )
    parser.add_argument(
        "--sglang-arg",
        dest="sglang_args",
        action="append",
        metavar="KEY=VALUE",
        default=None,
        help="sglang: a further SGLang ServerArgs field, e.g. ep_size=2 or disable_radix_cache=true (repeatable)",
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML settings file (env ZEDA_CONFIG_FILE)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn
    from pydantic import ValidationError

    from zeda_server.app import create_app
    from zeda_server.engine import TorchEngine
    from zeda_server.lifecycle import DrainingServer, Lifecycle
    from zeda_server.request_log import configure_request_log
    from zeda_server.settings import ServerSettings

    if args.config is not None:
        if not args.config.is_file():
            raise ZedaError(f"settings file {args.config} does not exist")
        os.environ["ZEDA_CONFIG_FILE"] = str(args.config)
    given = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag in FLAGS}
    given["sglang_args"] = args.sglang_args
    try:
        settings = ServerSettings(**{key: value for key, value in given.items() if value is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()
        )
        raise ZedaError(f"invalid settings: {problems}") from exc
    if settings.backend == "sglang":
        if settings.moe_backend != "auto":
            raise ZedaError(
                f"--moe-backend {settings.moe_backend} applies to the torch engine; "
                "--backend sglang runs SGLang's own fused MoE (leave --moe-backend at auto)"
            )
        if importlib.util.find_spec("sglang") is None:
            raise ZedaError("--backend sglang needs the sglang extra: pip install 'zeda[sglang]'")
        from zeda_server.sglang_engine import SglangEngine, parse_sglang_args

        engine = SglangEngine(
            settings.model,
            settings.max_batch,
            settings.max_queue,
            settings.dtype,
            settings.max_total_tokens,
            settings.tp_size,
            parse_sglang_args(settings.sglang_args),
        )
    else:
        dtype = None if settings.dtype == "auto" else getattr(torch, settings.dtype)
        engine = TorchEngine(
            settings.model,
            settings.device,
            dtype,
            settings.max_batch,
            settings.max_queue,
            settings.max_total_tokens,
            moe_backend=settings.moe_backend,
        )
    lifecycle = Lifecycle()
    app = create_app(settings, engine, lifecycle)

    async def drained(cancelled: int) -> None:
        print(f"zeda serve: drained ({cancelled} requests cancelled at the {settings.shutdown_timeout:g} s timeout)")
        app.state.capture.close()

    configure_request_log()
    # One JSON line per request (zeda_server.request_log) stands in for uvicorn's access log.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level, access_log=False)
    server = DrainingServer(config, lifecycle, settings.shutdown_timeout, drained)
    engine.route_signals_to(server.handle_exit)  # the app already routes the engine's failure to the lifecycle
    print(
        f"zeda serve: {settings.model_name} ({engine.fingerprint}) on http://{settings.host}:{settings.port}"
        f"  dashboard: /dashboard  metrics: /metrics",
        flush=True,
    )
    lifecycle.ready = True
    try:
        server.run()
    finally:
        engine.shutdown()
    return 0
