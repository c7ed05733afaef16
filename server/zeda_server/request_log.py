"""One JSON log line per API request, and the request id that ties it to the client.

The id comes from the client's ``X-Request-Id`` (printable, at most 128 characters) or is made
up; it is echoed in the response's ``X-Request-Id`` header. The line is written when the last
byte of the response has been sent (streams included) or the client went away, to the
``zeda.requests`` logger:

    {"request_id": "...", "method": "POST", "path": "/v1/chat/completions", "status": 200,
     "latency_s": 0.41, "prompt_tokens": 12, "completion_tokens": 32, "zero_expert_ratio": 0.61,
     "disconnected": false}

Token counts and r_ze are those of the engine requests the route registered in
``request.state.zeda_handles`` (absent for routes without any).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from typing import Any

REQUEST_ID_HEADER = "x-request-id"
LOGGED_PREFIXES = ("/v1/", "/admin/")
_log = logging.getLogger("zeda.requests")


def configure_request_log() -> None:
    """Send ``zeda.requests`` lines, bare JSON, to stderr (once per process)."""
    if not _log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        _log.addHandler(handler)
        _log.setLevel(logging.INFO)
        _log.propagate = False


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-Id`` when it is printable ASCII of 1..128 characters, else a new id."""
    for name, value in headers:
        if name.lower() == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1").strip()
            if 0 < len(text) <= 128 and text.isascii() and text.isprintable():
                return text
    return uuid.uuid4().hex


def usage_of(handles: list[Any]) -> dict[str, Any]:
    """Tokens and r_ze summed over the finished engine requests of one API request."""
    finals = [h.final for h in handles if h.final is not None]
    if not finals:
        return {}
    dense = sum(f.report.dense_expert_flops for f in finals)
    saved = sum(f.report.expert_flops_saved for f in finals)
    return {
        "prompt_tokens": sum(f.prompt_tokens for f in finals),
        "completion_tokens": sum(f.completion_tokens for f in finals),
        "zero_expert_ratio": saved / dense if dense else 0.0,
    }


class RequestLog:
    """ASGI middleware: request id in and out, one JSON line per ``/v1/`` or ``/admin/`` request."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope.get("headers", []))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        outcome: dict[str, Any] = {"status": None, "logged": False}

        def write_line(disconnected: bool) -> None:
            if outcome["logged"] or not scope["path"].startswith(LOGGED_PREFIXES):
                return
            outcome["logged"] = True
            line = {
                "request_id": request_id,
                "method": scope["method"],
                "path": scope["path"],
                "status": outcome["status"],
                "latency_s": round(time.perf_counter() - started, 6),
                **usage_of(state.get("zeda_handles", [])),
                "disconnected": disconnected,
            }
            _log.info(json.dumps(line))

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
                headers = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                write_line(disconnected=False)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            write_line(disconnected=True)
