"""One request inside the torch engine: its prompt, sampling state, routing and output queue."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from zeda_core.runner import RequestRouting
from zeda_server.engine_api import SamplingParams, StepOutput
from zeda_server.text_stream import TextStream


@dataclass
class Request:
    """A request from submission to its last output.

    Attributes:
        prompt_ids: the prompt's token ids.
        stream: the visible text of ``generated`` (stop strings, partial characters).
        loop, outputs: the event loop of the submitter and the queue its outputs go to.
        generator: the request's random source (seeded requests), else None.
        generated: tokens sampled so far.
        routing: the routing of every token the model ran for it.
        cancelled: the submitter went away, or the request finished: its row leaves the batch.
    """

    prompt_ids: list[int]
    params: SamplingParams
    stream: TextStream
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    routing: RequestRouting = field(default_factory=RequestRouting)
    cancelled: bool = False

    def emit(self, output: StepOutput) -> None:
        """Hand ``output`` to the submitter (from any thread)."""
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, output)

    def end(self, error: str) -> None:
        """Finish the request with ``error``; its row leaves the batch."""
        self.emit(StepOutput("", [], [], finish_reason="error", error=error))
        self.cancelled = True

    @property
    def reserved_tokens(self) -> int:
        """KV-cache positions the request can come to hold: its prompt and all its new tokens."""
        return len(self.prompt_ids) + self.params.max_tokens
