"""The engine contract: what the HTTP layer needs from an engine, and the types it exchanges with one.

Both :class:`zeda_server.engine.TorchEngine` and :class:`zeda_server.sglang_engine.SglangEngine`
implement :class:`Engine`; :mod:`zeda_server.app` knows no other engine type. An engine that stops
(its thread or a subprocess died) reports it once, through the callback given to
:meth:`Engine.on_failure`, and refuses further work with :class:`EngineFailed`.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from transformers import PreTrainedTokenizerBase

from zeda_core.flops import FlopReport

if TYPE_CHECKING:
    from zeda_server.candidates import Scope
    from zeda_server.sglang_models.forward_counter import ForwardCounts


class QueueFull(Exception):
    """The engine holds ``max_queue`` requests already."""


class EngineFailed(Exception):
    """The engine has stopped on an error; nothing more will be served."""


class FailureReport:
    """Why an engine stopped, once it has, and the one callback told about it (any thread).

    Both engines hold one: :meth:`Engine.on_failure` subscribes, the engine calls :meth:`fail`
    once it stops, and :meth:`check` refuses new work from then on.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._callback: Callable[[str], None] | None = None
        self._lock = threading.Lock()

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` when the engine stops; at once if it has."""
        with self._lock:
            self._callback, reason = callback, self.reason
        if reason is not None:
            callback(reason)

    def fail(self, reason: str) -> None:
        """Record that the engine stopped because of ``reason`` and tell the subscriber."""
        with self._lock:
            self.reason, callback = reason, self._callback
        if callback is not None:
            callback(reason)

    def check(self) -> None:
        """Raise :class:`EngineFailed` once the engine has stopped."""
        if self.reason is not None:
            raise EngineFailed(self.reason)


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and routes.

    Up to ``max_tokens`` tokens, temperature (0: greedy), top-p, seed, stop strings, and
    ``zero_expert_bias``: the request's own compute dial in logits, added to the server-wide
    offset on every token of the request in every MoE layer (see :func:`zeda_core.routing.route`).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    zero_expert_bias: float = 0.0


@dataclass
class StepOutput:
    """What one engine step produced for one request.

    Attributes:
        text: new visible text (stop strings cut, partial characters held back).
        token_ids: tokens sampled this step.
        logprobs: log-probability of each of those tokens under the unwarped model distribution.
        finish_reason: ``stop``, ``length`` or ``error`` on the last output, else None.
        report, prompt_tokens, completion_tokens: on the last output, the request's routing
            FLOPs (:class:`FlopReport`) and token counts.
        error: what failed, when ``finish_reason`` is ``error``.
        fingerprint: the model version that produced the tokens.
    """

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None
    report: FlopReport | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    fingerprint: str = ""


@runtime_checkable
class Engine(Protocol):
    """An engine serving one model behind the HTTP API.

    Attributes:
        tokenizer: the served model's tokenizer (prompts, decoding, vocabulary size).
        context_length: the model's context window in tokens.
        max_total_tokens: KV-cache tokens the running batch may hold (prompt + ``max_tokens`` of a
            request must fit); None when the engine sizes its own pool.
        request_zero_offsets: whether requests may carry their own ``zero_expert_bias``; the
            server offset (:meth:`set_zero_offset`) applies either way.
    """

    tokenizer: PreTrainedTokenizerBase
    context_length: int
    max_total_tokens: int | None
    request_zero_offsets: bool

    @property
    def fingerprint(self) -> str:
        """``system_fingerprint`` of the version new requests start on."""
        ...

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch slot."""
        ...

    @property
    def running(self) -> int:
        """Requests being generated."""
        ...

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of chat ``messages`` with the assistant turn opened."""
        ...

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StepOutput]:
        """Stream one request's outputs; closing the iterator early cancels it.

        Raises:
            QueueFull: the engine holds ``max_queue`` requests.
            EngineFailed: the engine has stopped.
        """
        ...

    async def score(self, sequences: list[list[int]]) -> tuple[list[list[float]], FlopReport, str]:
        """Log-probs of tokens 1..n-1 of each sequence, the FLOPs spent, and the fingerprint of the version.

        Raises:
            EngineFailed: the engine has stopped.
        """
        ...

    async def swap_checkpoint(self, checkpoint: str, scope: Scope) -> dict[str, object]:
        """Validate ``checkpoint`` and swap its router rows or all its weights in; describes the new version.

        Raises:
            CandidateRejected: the checkpoint fails a check; the served version is unchanged.
        """
        ...

    async def rollback(self) -> dict[str, object]:
        """Swap the previous version back in; describes it.

        Raises:
            LookupError: no previous version.
        """
        ...

    def versions(self) -> dict[str, object]:
        """``current`` (new requests start on it) and ``previous`` (a rollback returns to it) versions."""
        ...

    async def set_zero_offset(self, offset: float) -> None:
        """Make ``offset`` (logits) the server-wide compute dial of every token from the next forward on."""
        ...

    def forward_counts(self) -> ForwardCounts | None:
        """Slots the MoE forward computed and skipped since start, where the engine counts them; else None."""
        ...

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` once when the engine stops (at once if it has already), from any thread."""
        ...

    def route_signals_to(self, on_sigterm: Callable[[int, FrameType | None], None]) -> None:
        """Hand the SIGTERM the engine would claim to ``on_sigterm`` (the server's drain)."""
        ...

    def shutdown(self) -> None:
        """Stop the engine and release what it holds."""
        ...
