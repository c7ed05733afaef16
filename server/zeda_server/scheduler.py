"""The torch engine's scheduler: the waiting queue, FIFO admission, and one lane per model version.

Admission is first come, first served: the head of the queue joins the batch while batch rows
(``max_batch``) and KV-cache positions (``max_total_tokens``, a request reserving its prompt and
all its ``max_tokens``) last; a request that does not fit holds back the ones behind it.

Hot swap: each model version decodes its requests in its own :class:`Lane` (its runner and KV
batch). New requests join the last lane; older lanes drain, then close. The scheduler is not
thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from zeda_core.runner import KvBatch, ModelRunner
from zeda_server.sequence import Request
from zeda_server.versions import ModelVersion


@dataclass
class Lane:
    """The requests decoding on one model version, with its runner and their KV batch."""

    version: ModelVersion
    runner: ModelRunner
    running: list[Request] = field(default_factory=list)
    kv: KvBatch | None = None

    def drop_finished(self) -> None:
        """Take finished and cancelled requests out of the batch."""
        keep = [row for row, request in enumerate(self.running) if not request.cancelled]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[row] for row in keep]
        if keep:
            self.kv.keep(keep)
        else:
            self.kv = None


class Scheduler:
    """Waiting requests and the lanes of running ones.

    Args:
        lane: the lane of the version served first.
        max_batch: rows decoded together, over all lanes.
        max_total_tokens: KV-cache positions the running requests may reserve, over all lanes.
    """

    def __init__(self, lane: Lane, max_batch: int, max_total_tokens: int) -> None:
        self.lanes = [lane]  # the last lane takes new requests
        self.waiting: collections.deque[Request] = collections.deque()
        self.max_batch, self.max_total_tokens = max_batch, max_total_tokens

    @property
    def current(self) -> Lane:
        """The lane new requests join."""
        return self.lanes[-1]

    @property
    def running(self) -> int:
        return sum(len(lane.running) for lane in self.lanes)

    def requests(self) -> list[Request]:
        """Every request held, waiting or running."""
        return [*self.waiting, *(request for lane in self.lanes for request in lane.running)]

    def open_lane(self, lane: Lane) -> None:
        """Send new requests to ``lane``; the running lanes drain."""
        self.lanes.append(lane)

    def schedule(self) -> list[Request]:
        """Pop the waiting requests that fit, first come first served; they go to :attr:`current`'s prefill."""
        rows = self.max_batch - self.running
        tokens = self.max_total_tokens - sum(r.reserved_tokens for lane in self.lanes for r in lane.running)
        admitted: list[Request] = []
        while self.waiting and len(admitted) < rows and self.waiting[0].reserved_tokens <= tokens:
            tokens -= self.waiting[0].reserved_tokens
            admitted.append(self.waiting.popleft())
        return admitted

    def close_drained(self) -> None:
        """Close the lanes of old versions with no request left."""
        self.lanes = [lane for lane in self.lanes[:-1] if lane.running] + self.lanes[-1:]
