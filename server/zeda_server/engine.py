"""Torch engine: continuous batching of concurrent requests over one HF model with a KV cache.

One engine thread owns the model. Each :meth:`TorchEngine._step` runs, in nano-vllm's shape, the
scheduler (:mod:`zeda_server.scheduler`: admission of waiting requests), the model runner
(:class:`zeda_core.runner.ModelRunner`: a batched prefill of the admitted requests, whose rows
join the running KV batch, then one decode step of every row in flight) and the postprocessing
(sampling, stop checks, outputs). Each request's routing counts come from the runner's per-row
counts, so they are exact even when requests share a batch: every prompt token counts once at
prefill and every generated token once when it is fed back.

Hot-swap: :meth:`TorchEngine.swap` installs a new :class:`ModelVersion` between two engine
steps. New requests start on it; the rows already running keep decoding on the version they
started on (its own lane) until they finish, then that version is released. Every output
carries the fingerprint of the version that produced it. The version swapped out is kept for
:meth:`TorchEngine.rollback`.

If the engine thread itself dies, the engine calls its :meth:`~TorchEngine.on_failure` callback,
ends every request it holds with an error output, and refuses new work with :class:`EngineFailed`.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from types import FrameType

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from zeda_core.chat import chat_prompt_ids
from zeda_core.checkpoint import load_model, resolve_checkpoint
from zeda_core.flops import FlopModel, FlopReport, flop_report
from zeda_core.runner import Forward, ModelRunner
from zeda_core.sampling import sample_next_tokens
from zeda_core.scoring import score_sequences
from zeda_server.candidates import Scope, prepare_version
from zeda_server.engine_api import EngineFailed, FailureReport, QueueFull, SamplingParams, StepOutput
from zeda_server.scheduler import Lane, Scheduler
from zeda_server.sequence import Request
from zeda_server.text_stream import TextStream
from zeda_server.versions import ModelVersion, checkpoint_fingerprint, describe_versions


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
        moe_backend: what computes the experts (``auto``, ``torch`` or ``triton``; see
            :func:`zeda_core.checkpoint.load_model`).
    """

    tokenizer: PreTrainedTokenizerBase
    context_length: int
    max_total_tokens: int | None
    request_zero_offsets: bool = True

    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        max_batch: int = 32,
        max_queue: int = 256,
        max_total_tokens: int | None = None,
        moe_backend: str = "auto",
    ) -> None:
        checkpoint = resolve_checkpoint(model_path)
        model = load_model(checkpoint, dtype=dtype, device=device, moe_backend=moe_backend)
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.flop_model = FlopModel.from_model(model)
        self.context_length = int(model.config.max_position_embeddings)
        self.max_queue = max_queue
        self.max_total_tokens = max_total_tokens or max_batch * self.context_length
        self.current = ModelVersion(checkpoint_fingerprint(checkpoint), str(checkpoint), model=model)
        self.previous: ModelVersion | None = None
        self._scheduler = Scheduler(self._lane(self.current), max_batch, self.max_total_tokens)
        self._scores: collections.deque[_ScoreJob] = collections.deque()
        self._swaps: collections.deque[_SwapJob] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._failure = FailureReport()
        self._admitted: list[Request] = []
        self._zero_offset = 0.0  # the server-wide compute dial, read at every forward
        self._thread = threading.Thread(target=self._loop, name="zeda-engine", daemon=True)
        self._thread.start()

    # -- public API (any thread / event loop) -------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch slot."""
        return len(self._scheduler.waiting)

    @property
    def running(self) -> int:
        return self._scheduler.running

    @property
    def model(self) -> torch.nn.Module:
        """The model new requests start on."""
        return self.current.model

    @property
    def fingerprint(self) -> str:
        return self.current.fingerprint

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    async def set_zero_offset(self, offset: float) -> None:
        """Route every token from the next forward on with ``offset`` (logits) plus its request's own."""
        self._zero_offset = float(offset)

    def forward_counts(self) -> None:
        """The torch engine counts slots per request only (``usage.zeda``), not per forward."""
        return None

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` (on the engine thread) when the engine thread dies; at once if it has."""
        self._failure.subscribe(callback)

    def route_signals_to(self, on_sigterm: Callable[[int, FrameType | None], None]) -> None:
        """Nothing to hand on: the torch engine claims no signal, so the server's own handlers see them."""

    async def submit(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StepOutput]:
        """Stream the outputs of one request; closing the iterator early cancels it."""
        request = Request(
            prompt_ids=list(prompt_ids),
            params=params,
            stream=TextStream(self.tokenizer, list(params.stop)),
            loop=asyncio.get_running_loop(),
            outputs=asyncio.Queue(),
            generator=torch.Generator().manual_seed(params.seed) if params.seed is not None else None,
        )
        with self._wake:
            self._failure.check()
            if self.queue_depth + self.running >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests in flight")
            self._scheduler.waiting.append(request)
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
            self._failure.check()
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
        return describe_versions(self.current, self.previous)

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

    def _lane(self, version: ModelVersion) -> Lane:
        return Lane(version, ModelRunner(version.model, self.tokenizer.pad_token_id))

    def _loop(self) -> None:
        """Serve until shutdown; if the loop itself fails, report it, fail every request it holds and stop."""
        try:
            self._serve()
        except BaseException as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            raise

    def _fail(self, reason: str) -> None:
        """Mark the engine failed, call the failure callback, and end every request and job with ``reason``."""
        # First, so the server knows why before the requests end; a submit that takes the lock after
        # this sees the failure, one that took it before has its request collected below.
        self._failure.fail(reason)
        with self._wake:
            requests = [*self._admitted, *self._scheduler.requests()]
            jobs = [*self._scores, *self._swaps]
            for queue in (self._scheduler.waiting, self._scores, self._swaps):
                queue.clear()
        for request in {id(r): r for r in requests}.values():
            request.end(f"the engine stopped: {reason}")
        for job in jobs:
            job.future.set_exception(EngineFailed(reason))

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._scheduler.waiting or self._scores or self._swaps or self.running):
                    self._wake.wait()
                if self._stopping:
                    return
                swaps = list(self._swaps)
                self._swaps.clear()
                for job in swaps:
                    self._install(job)
                jobs = list(self._scores)
                self._scores.clear()
                self._admitted = self._scheduler.schedule()  # not in a lane yet: a failed loop must still end them
            for job in jobs:
                self._run_score(job)
            self._step(self._admitted)

    def _install(self, job: _SwapJob) -> None:
        """Open a lane for the new version; the old lanes drain. Runs on the engine thread, under the lock."""
        old = self.current
        self.previous, self.current = old, job.version
        self._scheduler.open_lane(self._lane(job.version))
        job.future.set_result(old)

    def _step(self, admitted: list[Request]) -> None:
        """One engine step: ``admitted`` prefill on the current lane, then every lane decodes one token."""
        for lane in list(self._scheduler.lanes):
            try:
                self._run_lane(lane, admitted if lane is self._scheduler.current else [])
            except Exception as exc:  # fail this lane's requests, keep serving the next ones
                for request in {id(r): r for r in [*lane.running, *admitted]}.values():
                    request.end(f"{type(exc).__name__}: {exc}")
                lane.running, lane.kv = [], None
        with self._wake:
            self._scheduler.close_drained()

    def _run_lane(self, lane: Lane, admitted: list[Request]) -> None:
        """The model runner's part of a step on one lane: prefill ``admitted``, then decode its running rows."""
        lane.drop_finished()
        admitted = [r for r in admitted if not r.cancelled]
        if admitted:
            prompts = [r.prompt_ids for r in admitted]
            forward, lane.kv = lane.runner.prefill(prompts, lane.kv, self._zero_offsets(admitted))
            lane.running += admitted
            self._postprocess(lane, admitted, forward)
            lane.drop_finished()
        if lane.running:
            tokens = [r.generated[-1] for r in lane.running]
            forward = lane.runner.decode(lane.kv, tokens, self._zero_offsets(lane.running))
            self._postprocess(lane, lane.running, forward)
            lane.drop_finished()

    def _zero_offsets(self, requests: list[Request]) -> list[float]:
        """Each row's compute dial for the next forward: the server offset plus the request's own."""
        server = self._zero_offset
        return [server + request.params.zero_expert_bias for request in requests]

    def _postprocess(self, lane: Lane, requests: list[Request], forward: Forward) -> None:
        """Account each row of ``forward`` to its request, sample its next token and emit it."""
        logprobs = torch.log_softmax(forward.logits, dim=-1)
        for row, request in enumerate(requests):
            request.routing.add(forward, row)
            if request.cancelled:
                continue
            params = request.params
            logits = forward.logits[row : row + 1]
            token = int(sample_next_tokens(logits, params.temperature, params.top_p, request.generator)[0])
            request.generated.append(token)
            request.stream.update(request.generated)
            finish = None
            if token == self.tokenizer.eos_token_id or request.stream.stopped:
                finish = "stop"
            elif len(request.generated) >= params.max_tokens:
                finish = "length"
            delta = request.stream.delta(final=finish is not None)
            output = StepOutput(delta, [token], [float(logprobs[row, token])], fingerprint=lane.version.fingerprint)
            if finish is not None:
                output.finish_reason = finish
                output.report = flop_report(request.routing.slot_counts, request.routing.processed, self.flop_model)
                output.prompt_tokens, output.completion_tokens = len(request.prompt_ids), len(request.generated)
                request.cancelled = True  # done: its row leaves the batch
            request.emit(output)

    def _run_score(self, job: _ScoreJob) -> None:
        try:
            version = self.current
            offsets = [self._zero_offset] * len(job.sequences)
            scores = score_sequences(version.model, job.sequences, self.tokenizer.pad_token_id, zero_offsets=offsets)
            report = flop_report(scores.slot_counts, scores.tokens, self.flop_model)
            job.future.set_result((scores.logprobs, report, version.fingerprint))
        except Exception as exc:  # handed to the awaiting request, which answers with an error
            job.future.set_exception(exc)
