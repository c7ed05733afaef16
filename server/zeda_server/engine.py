"""Torch engine: continuous batching of concurrent requests over one HF model with a KV cache.

One engine thread owns the model. Between decode steps it admits waiting requests (one
batched prefill, then their rows join the running KV batch), drops finished or cancelled rows,
and runs one decode step for every row in flight. Each request's routing counts come from the
recorder's per-row counts, so they are exact even when requests share a batch: every prompt
token counts once at prefill and every generated token once when it is fed back.

The HTTP layer talks to it through :meth:`TorchEngine.submit` (an async stream of
:class:`StepOutput`) and :meth:`TorchEngine.score` (prompt log-probs, for remote teachers).

Hot-swap: :meth:`TorchEngine.swap` installs a new :class:`ModelVersion` between two engine
steps. New requests start on it; the rows already running keep decoding on the version they
started on (its own KV batch) until they finish, then that version is released. Every output
carries the fingerprint of the version that produced it. The version swapped out is kept for
:meth:`TorchEngine.rollback`.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, DynamicCache, PreTrainedTokenizerBase

from zeda_core.batching import pad_batch
from zeda_core.checkpoint import load_model, resolve_checkpoint
from zeda_core.flops import FlopModel, FlopReport, flop_report
from zeda_core.losses import token_logprobs
from zeda_core.recording import record_routing
from zeda_server.candidates import Scope, prepare_version
from zeda_server.kv_batch import KvBatch
from zeda_server.text_stream import TextStream
from zeda_server.versions import ModelVersion, checkpoint_fingerprint


class QueueFull(Exception):
    """The engine holds ``max_queue`` requests already."""


class EngineFailed(Exception):
    """The engine thread has stopped on an error; nothing more will be served."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


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


@dataclass
class _Lane:
    """The requests decoding on one model version, with their KV batch."""

    version: ModelVersion
    running: list[_Request] = field(default_factory=list)
    kv: KvBatch | None = None


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    stream: TextStream
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    counts: torch.Tensor | None = None
    processed: int = 0
    cancelled: bool = False

    def emit(self, output: StepOutput) -> None:
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, output)

    @property
    def reserved_tokens(self) -> int:
        """KV-cache positions the request can come to hold: its prompt and all its new tokens."""
        return len(self.prompt_ids) + self.params.max_tokens


@dataclass
class _ScoreJob:
    sequences: list[list[int]]
    future: Future


@dataclass
class _SwapJob:
    version: ModelVersion
    future: Future


class TorchEngine:
    """Serve one checkpoint (ZEDA, reference-format, or a plain MoE as the static baseline).

    Args:
        model_path: local directory or hub id.
        device: torch device string.
        dtype: parameter dtype (None keeps the checkpoint's).
        max_batch: rows decoded together.
        max_queue: requests held (running + waiting) before :class:`QueueFull`.
        max_total_tokens: KV-cache positions the running batch may reserve (prompt + ``max_tokens``
            of each row); requests past it wait in the queue. None: ``max_batch`` full contexts.
    """

    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        max_batch: int = 32,
        max_queue: int = 256,
        max_total_tokens: int | None = None,
    ) -> None:
        checkpoint = resolve_checkpoint(model_path)
        model = load_model(checkpoint, dtype=dtype, device=device)
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.flop_model = FlopModel.from_model(model)
        self.context_length = int(model.config.max_position_embeddings)
        self.device = torch.device(device)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_total_tokens = max_total_tokens or max_batch * self.context_length
        self.current = ModelVersion(model, checkpoint_fingerprint(checkpoint), str(checkpoint))
        self.previous: ModelVersion | None = None
        self._lanes: list[_Lane] = [_Lane(self.current)]  # the last lane takes new requests
        self._waiting: collections.deque[_Request] = collections.deque()
        self._scores: collections.deque[_ScoreJob] = collections.deque()
        self._swaps: collections.deque[_SwapJob] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self.failure: str | None = None  # why the engine thread stopped, once it has
        self._admitted: list[_Request] = []
        self._thread = threading.Thread(target=self._loop, name="zeda-engine", daemon=True)
        self._thread.start()

    # -- public API (any thread / event loop) -------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch slot."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(len(lane.running) for lane in self._lanes)

    @property
    def model(self) -> torch.nn.Module:
        """The model new requests start on."""
        return self.current.model

    @property
    def fingerprint(self) -> str:
        return self.current.fingerprint

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    async def submit(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StepOutput]:
        """Stream the outputs of one request; closing the iterator early cancels it."""
        request = _Request(
            prompt_ids=list(prompt_ids),
            params=params,
            stream=TextStream(self.tokenizer, list(params.stop)),
            loop=asyncio.get_running_loop(),
            outputs=asyncio.Queue(),
            generator=torch.Generator().manual_seed(params.seed) if params.seed is not None else None,
        )
        with self._wake:
            if self.failure is not None:
                raise EngineFailed(self.failure)
            if len(self._waiting) + self.running >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests in flight")
            self._waiting.append(request)
            self._wake.notify()
        try:
            while True:
                output = await request.outputs.get()
                yield output
                if output.finish_reason is not None:
                    return
        finally:
            request.cancelled = True

    async def score(self, sequences: list[list[int]]) -> tuple[list[list[float]], FlopReport, str]:
        """Log-probs of tokens 1..n-1 of each sequence under the model, the FLOPs spent, the fingerprint."""
        job = _ScoreJob(sequences, Future())
        with self._wake:
            if self.failure is not None:
                raise EngineFailed(self.failure)
            self._scores.append(job)
            self._wake.notify()
        return await asyncio.wrap_future(job.future)

    async def swap_checkpoint(self, checkpoint: str, scope: Scope) -> dict[str, object]:
        """Validate ``checkpoint`` and swap it in (router rows or all weights); describes the new version.

        Raises:
            CandidateRejected: the checkpoint fails a check; the served version is unchanged.
        """
        version = await asyncio.to_thread(prepare_version, self.current, checkpoint, scope, self.tokenizer)
        await self.swap(version)
        return version.describe()

    async def swap(self, version: ModelVersion) -> ModelVersion:
        """Make ``version`` the one new requests start on (between two steps); returns the old one."""
        job = _SwapJob(version, Future())
        with self._wake:
            self._swaps.append(job)
            self._wake.notify()
        return await asyncio.wrap_future(job.future)

    def versions(self) -> dict[str, object]:
        """The version new requests start on, and the one a rollback returns to."""
        return {"current": self.current.describe(), "previous": self.previous.describe() if self.previous else None}

    async def rollback(self) -> dict[str, object]:
        """Swap the previous version back in (the current one becomes the previous); describes it."""
        if self.previous is None:
            raise LookupError("no previous version to roll back to")
        await self.swap(self.previous)
        return self.current.describe()

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # -- engine thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        """Serve until shutdown; if the loop itself fails, fail every request it holds and stop."""
        try:
            self._serve()
        except BaseException as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            raise

    def _fail(self, reason: str) -> None:
        """Mark the engine failed and end every waiting and running request and job with ``reason``."""
        with self._wake:
            self.failure = reason
            requests = [*self._admitted, *self._waiting, *(r for lane in self._lanes for r in lane.running)]
            jobs = [*self._scores, *self._swaps]
            for queue in (self._waiting, self._scores, self._swaps):
                queue.clear()
        for request in {id(r): r for r in requests}.values():
            request.emit(StepOutput("", [], [], finish_reason="error", error=f"the engine stopped: {reason}"))
            request.cancelled = True
        for job in jobs:
            job.future.set_exception(EngineFailed(reason))

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._scores or self._swaps or self.running):
                    self._wake.wait()
                if self._stopping:
                    return
                swaps = list(self._swaps)
                self._swaps.clear()
                for job in swaps:
                    self._install(job)
                jobs = list(self._scores)
                self._scores.clear()
                admitted = self._admit()
                self._admitted = admitted  # not in a lane yet: a failed loop must still end them
            for job in jobs:
                self._run_score(job)
            for lane in list(self._lanes):
                try:
                    self._step(lane, admitted if lane is self._lanes[-1] else [])
                except Exception as exc:  # fail this lane's requests, keep serving the next ones
                    for request in {id(r): r for r in [*lane.running, *admitted]}.values():
                        error = f"{type(exc).__name__}: {exc}"
                        request.emit(StepOutput("", [], [], finish_reason="error", error=error))
                        request.cancelled = True
                    lane.running, lane.kv = [], None
            self._lanes = [lane for lane in self._lanes[:-1] if lane.running] + self._lanes[-1:]

    def _admit(self) -> list[_Request]:
        """Waiting requests, first come first served, while batch rows and KV-cap tokens last (under the lock)."""
        rows = self.max_batch - self.running
        tokens = self.max_total_tokens - sum(r.reserved_tokens for lane in self._lanes for r in lane.running)
        admitted: list[_Request] = []
        while self._waiting and len(admitted) < rows and self._waiting[0].reserved_tokens <= tokens:
            tokens -= self._waiting[0].reserved_tokens
            admitted.append(self._waiting.popleft())
        return admitted

    def _install(self, job: _SwapJob) -> None:
        """Open a lane for the new version; the old lanes drain. Runs on the engine thread."""
        old = self.current
        self.previous, self.current = old, job.version
        self._lanes.append(_Lane(job.version))
        job.future.set_result(old)

    @torch.inference_mode()
    def _step(self, lane: _Lane, admitted: list[_Request]) -> None:
        self._drop_finished(lane)
        admitted = [r for r in admitted if not r.cancelled]
        if admitted:
            self._prefill(lane, admitted)
            self._drop_finished(lane)
        if lane.running:
            self._decode(lane)
            self._drop_finished(lane)

    def _prefill(self, lane: _Lane, requests: list[_Request]) -> None:
        padded = pad_batch([r.prompt_ids for r in requests], self.tokenizer.pad_token_id, left=True)
        ids, attention = (t.to(self.device) for t in padded)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=lane.version.model.config)
        with record_routing(token_mask=attention.bool()) as recorder:
            logits = lane.version.model(
                input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache, use_cache=True
            ).logits[:, -1]
        counts = recorder.slot_counts()
        for row, request in enumerate(requests):
            request.counts, request.processed = counts[row], len(request.prompt_ids)
        joined = KvBatch(cache, attention, positions[:, -1] + 1)
        lane.kv = joined if lane.kv is None else lane.kv.merge(joined)
        lane.running += requests
        self._sample_and_emit(lane, requests, logits)

    def _decode(self, lane: _Lane) -> None:
        kv = lane.kv
        ids = torch.tensor([[r.generated[-1]] for r in lane.running], device=self.device)
        kv.extend()
        with record_routing() as recorder:
            logits = lane.version.model(
                input_ids=ids,
                attention_mask=kv.attention,
                position_ids=(kv.positions - 1)[:, None],
                past_key_values=kv.cache,
                use_cache=True,
            ).logits[:, -1]
        counts = recorder.slot_counts()
        for row, request in enumerate(lane.running):
            request.counts += counts[row]
            request.processed += 1
        self._sample_and_emit(lane, lane.running, logits)

    def _sample_and_emit(self, lane: _Lane, requests: list[_Request], logits: torch.Tensor) -> None:
        """Sample one token per row of ``logits`` [B, V] and emit it to its request."""
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, request in enumerate(requests):
            if request.cancelled:
                continue
            token = _sample_row(logits[row], request.params, request.generator)
            request.generated.append(token)
            request.stream.update(request.generated)
            finish = None
            if token == self.tokenizer.eos_token_id or request.stream.stopped:
                finish = "stop"
            elif len(request.generated) >= request.params.max_tokens:
                finish = "length"
            delta = request.stream.delta(final=finish is not None)
            output = StepOutput(delta, [token], [float(logprobs[row, token])], fingerprint=lane.version.fingerprint)
            if finish is not None:
                output.finish_reason = finish
                output.report = flop_report(request.counts, request.processed, self.flop_model)
                output.prompt_tokens, output.completion_tokens = len(request.prompt_ids), len(request.generated)
                request.cancelled = True  # done: its row leaves the batch
            request.emit(output)

    def _drop_finished(self, lane: _Lane) -> None:
        keep = [row for row, request in enumerate(lane.running) if not request.cancelled]
        if len(keep) == len(lane.running):
            return
        lane.running = [lane.running[row] for row in keep]
        if keep:
            lane.kv.keep(keep)
        else:
            lane.kv = None

    def _run_score(self, job: _ScoreJob) -> None:
        try:
            padded = pad_batch(job.sequences, self.tokenizer.pad_token_id)
            ids, attention = (t.to(self.device) for t in padded)
            version = self.current
            with torch.inference_mode(), record_routing(token_mask=attention.bool()) as recorder:
                logits = version.model(input_ids=ids, attention_mask=attention).logits
            values = token_logprobs(logits[:, :-1], ids[:, 1:]).cpu()
            scores = [values[row, : len(s) - 1].tolist() for row, s in enumerate(job.sequences)]
            tokens = int(attention.sum())
            report = flop_report(recorder.slot_counts().sum(dim=0), tokens, self.flop_model)
            job.future.set_result((scores, report, version.fingerprint))
        except Exception as exc:  # handed to the awaiting request, which answers with an error
            job.future.set_exception(exc)


def _sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from [V] float logits: greedy at temperature 0, else temperature + top-p."""
    if params.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of chat ``messages`` (role, content) with the chat template and the assistant turn opened."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
