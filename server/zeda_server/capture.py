"""Opt-in traffic capture: finished requests go to the :class:`TrafficStore` unless the client opts out.

Off unless the server has a store (``--capture-db``); an admin can pause and resume it. A client
opts a request out with the header ``X-Zeda-Capture: off``. Writes run in a worker thread, so a
slow disk never stalls the event loop, and a failed write is logged, never turned into a failed
request.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import Request

from zeda_core.flops import FlopReport
from zeda_core.traffic import CapturedRequest, TrafficStore
from zeda_server.settings import ServerSettings

OPT_OUT_HEADER = "x-zeda-capture"
OPT_OUT_VALUES = {"off", "0", "false", "no"}
_log = logging.getLogger("zeda.capture")


class TrafficCapture:
    """The server's capture switch and sink."""

    def __init__(self, settings: ServerSettings) -> None:
        self.store = (
            TrafficStore(
                settings.capture_db,
                settings.capture_max_rows,
                settings.capture_max_age_days * 86400.0,
                settings.capture_max_mb << 20,
            )
            if settings.capture_db is not None
            else None
        )
        self.enabled = self.store is not None
        self.completions = settings.capture_completions

    def wants(self, request: Request) -> bool:
        """Whether this request is captured: capture on, and no opt-out header."""
        return self.enabled and request.headers.get(OPT_OUT_HEADER, "").strip().lower() not in OPT_OUT_VALUES

    async def record(
        self, endpoint: str, prompt: str, chat: bool, completion: str, report: FlopReport | None, version: str
    ) -> None:
        row = CapturedRequest(
            endpoint=endpoint,
            model_version=version,
            prompt=prompt,
            chat=chat,
            completion=completion if self.completions else None,
            zero_expert_ratio=report.zero_expert_ratio if report is not None else None,
        )
        try:
            await asyncio.to_thread(self.store.add, row)
        except Exception:  # capture is a side channel: the response has been produced already
            _log.exception("capture write failed")

    def close(self) -> None:
        """Stop capturing and close the store, its log folded in (the server's last step on shutdown)."""
        self.enabled = False
        if self.store is not None:
            self.store.close()

    def status(self) -> dict[str, object]:
        return {
            "available": self.store is not None,
            "enabled": self.enabled,
            "db": str(self.store.path) if self.store else None,
            "rows": self.store.count() if self.store else 0,
            "completions": self.completions,
        }
