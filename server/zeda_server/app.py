"""The OpenAI-compatible HTTP API of ZEDA over an engine.

Routes: ``/v1/chat/completions``, ``/v1/completions`` (streamed over SSE or not; prompt
log-probs with ``echo`` + ``max_tokens: 0`` for remote teachers), ``/v1/models``, ``/health``
(liveness), ``/ready`` (readiness: false while loading or draining), ``/metrics`` (Prometheus)
and ``/dashboard`` (a live page fed by ``/dashboard/stats``). While the server drains
(:mod:`zeda_server.lifecycle`) new inference requests get 503 with ``Retry-After``; once the
engine has stopped (it reports it to the lifecycle) they get 503 ``engine_unavailable``.
Every response's ``usage.zeda`` holds the request's own expert FLOPs, and its
``system_fingerprint`` names the model version that produced it.

Admin routes (bearer admin key; disabled without one): ``GET /admin/status``,
``POST /admin/swap`` (validate a checkpoint, then hot-swap its router rows or all weights),
``POST /admin/rollback`` and ``POST /admin/capture`` (pause or resume traffic capture).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from importlib.resources import files
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict
from sse_starlette import EventSourceResponse

from zeda_server.candidates import CandidateRejected, Scope
from zeda_server.capture import TrafficCapture
from zeda_server.compute_dial import ComputeDial
from zeda_server.engine_api import Engine, EngineFailed, QueueFull, SamplingParams, StepOutput
from zeda_server.errors import ApiError, error_response, install_error_handlers
from zeda_server.lifecycle import Cancelled, Lifecycle
from zeda_server.metrics import ServerMetrics
from zeda_server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, usage_body
from zeda_server.request_log import RequestLog
from zeda_server.settings import ServerSettings

RETRY_AFTER_SECONDS = "1"


class SwapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str
    scope: Scope = "router"


class CaptureToggle(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool


def create_app(settings: ServerSettings, engine: Engine, lifecycle: Lifecycle | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``settings`` (keys, limits, names).

    ``lifecycle`` (readiness, requests in flight, drain, engine failure) is shared with the server
    that runs the app; without one the app makes its own, ready at once. The engine reports its
    failure to it: the routes look only at the lifecycle to know the engine has stopped.
    """
    dial = ComputeDial(
        target=settings.target_zero_expert_ratio,
        adaptive=settings.adaptive_compute,
        queue_threshold=settings.adaptive_queue_depth,
        max_load_offset=settings.adaptive_max_offset,
        window_tokens=settings.zero_ratio_window_tokens,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await dial.stop()

    app = FastAPI(title="ZEDA", version="0.1.0", lifespan=lifespan)
    metrics = ServerMetrics()
    capture = TrafficCapture(settings)
    swap_lock = asyncio.Lock()
    if lifecycle is None:
        lifecycle = Lifecycle()
        lifecycle.ready = True
    engine.on_failure(lifecycle.fail)
    app.state.engine, app.state.metrics, app.state.settings, app.state.capture = engine, metrics, settings, capture
    app.state.lifecycle, app.state.dial = lifecycle, dial
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )

    @app.middleware("http")
    async def refuse_before_routing(request: Request, call_next):
        """503 while draining (inference routes), 413 past the body-size limit; starts the compute dial's ticks."""
        dial.run(lambda: engine.queue_depth, engine.set_zero_offset)
        if lifecycle.draining and request.url.path.startswith("/v1/"):
            error = ApiError(
                503,
                "the server is shutting down; retry on another replica",
                code="server_shutting_down",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
            return error_response(error)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            error = ApiError(413, f"request body over {settings.max_body_bytes} bytes", code="body_too_large")
            return error_response(error)
        return await call_next(request)

    def open_handle(endpoint: str, prompt: list[int], params: SamplingParams) -> _Handle:
        return _Handle(engine, metrics, dial, lifecycle, endpoint, prompt, params, settings.request_timeout)

    def require_api_key(request: Request) -> None:
        _check_bearer(request, settings.api_key.get_secret_value() if settings.api_key else None, "API key")

    def require_admin_key(request: Request) -> None:
        if settings.admin_key is None:
            raise ApiError(403, "the admin API is disabled: start the server with --admin-key", code="admin_disabled")
        _check_bearer(request, settings.admin_key.get_secret_value(), "admin key")

    @app.get("/admin/status", dependencies=[Depends(require_admin_key)])
    async def admin_status() -> dict[str, Any]:
        return engine.versions() | {"capture": capture.status()}

    @app.post("/admin/swap", dependencies=[Depends(require_admin_key)])
    async def admin_swap(body: SwapRequest) -> dict[str, Any]:
        if swap_lock.locked():
            raise ApiError(409, "another swap is in progress", code="swap_in_progress")
        async with swap_lock:
            try:
                await engine.swap_checkpoint(body.checkpoint, body.scope)
            except CandidateRejected as exc:
                metrics.swaps.labels("rejected").inc()
                raise ApiError(422, f"checkpoint rejected: {exc}", "checkpoint", "checkpoint_rejected") from exc
        metrics.swaps.labels("swap").inc()
        return {"swapped": True} | engine.versions()

    @app.post("/admin/rollback", dependencies=[Depends(require_admin_key)])
    async def admin_rollback() -> dict[str, Any]:
        async with swap_lock:
            try:
                await engine.rollback()
            except LookupError as exc:
                raise ApiError(409, str(exc), code="no_previous_version") from exc
            except CandidateRejected as exc:
                raise ApiError(422, f"rollback failed: {exc}", code="checkpoint_rejected") from exc
        metrics.swaps.labels("rollback").inc()
        return {"rolled_back": True} | engine.versions()

    @app.post("/admin/capture", dependencies=[Depends(require_admin_key)])
    async def admin_capture(body: CaptureToggle) -> dict[str, Any]:
        if capture.store is None:
            raise ApiError(409, "capture needs a store: start the server with --capture-db", code="capture_unavailable")
        capture.enabled = body.enabled
        return capture.status()

    @app.get("/health")
    async def health() -> Response:
        """Liveness: 503 once the engine has stopped, which only a restart mends."""
        failed = lifecycle.failure is not None
        body = {"status": "failed" if failed else "ok", "model": settings.model_name}
        body["system_fingerprint"] = engine.fingerprint
        return Response(json.dumps(body), 503 if failed else 200, media_type="application/json")

    @app.get("/ready")
    async def ready() -> Response:
        failed = lifecycle.failure is not None
        state = "failed" if failed else "draining" if lifecycle.draining else "ready" if lifecycle.ready else "loading"
        body = {"ready": state == "ready", "state": state, "in_flight": lifecycle.in_flight}
        return Response(json.dumps(body), 200 if state == "ready" else 503, media_type="application/json")

    @app.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def models() -> dict[str, Any]:
        card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "zeda"}
        return {"object": "list", "data": [card | {"max_model_len": engine.context_length}]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue_depth.set(engine.queue_depth)
        metrics.running.set(engine.running)
        metrics.loop_tasks.set(len(asyncio.all_tasks()))
        metrics.model.info({"fingerprint": engine.fingerprint, "name": settings.model_name})
        counts = engine.forward_counts()
        if counts is not None:
            metrics.record_forward_counts(counts)
        metrics.record_dial(dial)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard() -> str:
        return files("zeda_server").joinpath("dashboard.html").read_text()

    @app.get("/dashboard/stats")
    async def dashboard_stats() -> dict[str, Any]:
        stats = metrics.snapshot(engine.queue_depth, engine.running) | dial.snapshot()
        return stats | {"model_version": engine.fingerprint}

    @app.post("/v1/chat/completions", dependencies=[Depends(require_api_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(body, settings)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        prompt = engine.chat_prompt(messages)
        params = _sampling(body, body.token_limit(), len(prompt), engine, settings)
        handle = open_handle("chat", prompt, params)
        request.state.zeda_handles = [handle]
        if capture.wants(request):
            single_turn = len(messages) == 1 and messages[0]["role"] == "user"
            text = messages[0]["content"] if single_turn else engine.tokenizer.decode(prompt)
            handle.capture_as(capture, text, chat=single_turn)
        await handle.start()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(_chat_events(handle, body, settings, include_usage), ping=15)
        text, finish = await handle.collect()
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        return _envelope(handle, "chat.completion", settings) | {"choices": [choice], "usage": handle.usage()}

    @app.post("/v1/completions", dependencies=[Depends(require_api_key)])
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body, settings)
        prompts = _completion_prompts(body, engine)
        if body.max_tokens == 0:
            if not body.echo:
                raise ApiError(400, "max_tokens must be > 0 unless echo is true", param="max_tokens")
            if body.zero_expert_bias or body.compute_tier:
                message = "zero_expert_bias and compute_tier apply to generation; prompt scoring uses the server offset"
                raise ApiError(400, message, "zero_expert_bias" if body.zero_expert_bias else "compute_tier")
            return await _score(prompts, engine, metrics, dial, lifecycle, settings)
        if body.stream and len(prompts) > 1:
            raise ApiError(400, "streaming takes a single prompt", param="prompt")
        handles = request.state.zeda_handles = []
        for prompt in prompts:
            params = _sampling(body, body.max_tokens, len(prompt), engine, settings)
            handles.append(open_handle("completions", prompt, params))
            if capture.wants(request):
                handles[-1].capture_as(capture, engine.tokenizer.decode(prompt, skip_special_tokens=True), chat=False)
        for handle in handles:
            await handle.start()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(_completion_events(handles[0], body, settings, include_usage), ping=15)
        results = await asyncio.gather(*(h.collect() for h in handles))
        choices = []
        for index, (handle, (text, finish)) in enumerate(zip(handles, results, strict=True)):
            prefix = engine.tokenizer.decode(handle.prompt, skip_special_tokens=True) if body.echo else ""
            choice = {"index": index, "text": prefix + text, "finish_reason": finish, "logprobs": None}
            if body.logprobs is not None:
                choice["logprobs"] = {"tokens": handle.tokens_text(), "token_logprobs": handle.logprobs}
            choices.append(choice)
        usage = _usage_of(handles)
        return _envelope(handles[0], "text_completion", settings) | {"choices": choices, "usage": usage}

    app.add_middleware(RequestLog)  # outermost: every answer, 4xx and 503 included, gets its id and log line
    return app


class _Handle:
    """One request in the engine: its stream, timings, final usage, and its place among the requests in flight.

    From :meth:`start` to :meth:`aclose` it counts in ``lifecycle``; the drain or its deadline
    (``timeout`` s) can cancel it, which ends it with :class:`Cancelled` as an ``ApiError``.
    """

    def __init__(
        self,
        engine: Engine,
        metrics: ServerMetrics,
        dial: ComputeDial,
        lifecycle: Lifecycle,
        endpoint: str,
        prompt: list[int],
        params: SamplingParams,
        timeout: float | None = None,
    ) -> None:
        self.engine, self.metrics, self.dial, self.lifecycle = engine, metrics, dial, lifecycle
        self.endpoint = endpoint
        self.prompt, self.params, self.timeout = prompt, params, timeout
        self._cancelled: Cancelled | None = None
        self._waiting: asyncio.Task | None = None  # the task awaiting the engine's next output
        self._deadline: asyncio.TimerHandle | None = None
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.final: StepOutput | None = None
        self.fingerprint = engine.fingerprint
        self.text_parts: list[str] = []
        self._capture: tuple[TrafficCapture, str, bool] | None = None
        self._stream: AsyncIterator[StepOutput] | None = None

    def capture_as(self, capture: TrafficCapture, prompt: str, chat: bool) -> None:
        """Store this request in the traffic store when it finishes."""
        self._capture = (capture, prompt, chat)

    def cancel(self, why: Cancelled) -> None:
        """End the request early with ``why``: at once if it waits for the engine, else at its next output."""
        if self._cancelled is None:
            self._cancelled = why
            if self._waiting is not None:
                self._waiting.cancel()

    async def _next(self, stream: AsyncIterator[StepOutput]) -> StepOutput:
        """The engine's next output, or :class:`ApiError` once the request is cancelled."""
        if self._cancelled is None:
            self._waiting = asyncio.current_task()
            try:
                return await anext(stream)
            except asyncio.CancelledError:
                if self._cancelled is None:
                    raise
                self._waiting.uncancel()
            finally:
                self._waiting = None
        raise _refusal(self.metrics, self.endpoint, self._cancelled) from self._cancelled

    async def start(self) -> None:
        """Queue the request; a full engine answers 429 and a stopped one 503 before any response starts."""
        if self.lifecycle.failure is not None:
            raise _engine_unavailable(self.metrics, self.endpoint, self.lifecycle.failure)
        self.lifecycle.admit(self, self.cancel)
        if self.timeout is not None:
            why = Cancelled(f"the request ran past its deadline of {self.timeout:g} s", 504, "request_timeout")
            self._deadline = asyncio.get_running_loop().call_later(self.timeout, self.cancel, why)
        stream = self.engine.submit(self.prompt, self.params)
        try:
            self._first = await self._next(stream)
            self.fingerprint = self._first.fingerprint or self.fingerprint
        except EngineFailed as exc:
            await self._finish(stream)
            raise _engine_unavailable(self.metrics, self.endpoint, str(exc)) from exc
        except QueueFull as exc:
            await self._finish(stream)
            self.metrics.record_error(self.endpoint, 429)
            raise ApiError(
                429,
                f"server busy ({exc}); retry later",
                code="queue_full",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            ) from exc
        except BaseException:
            await self._finish(stream)
            raise
        self._stream = stream

    async def outputs(self) -> AsyncIterator[StepOutput]:
        output = self._first
        while True:
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
                self.metrics.ttft.observe(self.first_token_at - self.started)
            self.token_ids += output.token_ids
            self.logprobs += output.logprobs
            self.text_parts.append(output.text)
            if output.finish_reason == "error":
                if self.lifecycle.failure is not None:
                    raise _engine_unavailable(self.metrics, self.endpoint, self.lifecycle.failure)
                self.metrics.record_error(self.endpoint, 500)
                raise ApiError(500, f"generation failed: {output.error}", code="engine_error")
            if output.finish_reason is not None:
                self.final = output
                self.metrics.latency.observe(time.perf_counter() - self.started)
                self.metrics.record(self.endpoint, output.prompt_tokens, output.completion_tokens, output.report)
                self.dial.observe(output.report)
                if self._capture is not None:
                    capture, prompt, chat = self._capture
                    text = "".join(self.text_parts)
                    await capture.record(self.endpoint, prompt, chat, text, output.report, self.fingerprint)
                yield output
                return
            yield output
            output = await self._next(self._stream)

    async def collect(self) -> tuple[str, str]:
        finish = "length"
        try:
            async for output in self.outputs():
                finish = output.finish_reason or finish
        finally:
            await self.aclose()
        return "".join(self.text_parts), finish

    def usage(self) -> dict[str, Any]:
        return _usage_of([self])

    def tokens_text(self) -> list[str]:
        return [self.engine.tokenizer.decode([t]) for t in self.token_ids]

    async def aclose(self) -> None:
        """Stop the engine stream (aborting it if unfinished) and leave the requests in flight."""
        await self._finish(self._stream)

    async def _finish(self, stream: AsyncIterator[StepOutput] | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        try:
            if stream is not None:
                await stream.aclose()
        finally:
            self.lifecycle.release(self)


def _refusal(metrics: ServerMetrics, endpoint: str, why: Cancelled) -> ApiError:
    """The answer to a request the server ended early (counted as an error of ``endpoint``)."""
    metrics.record_error(endpoint, why.status)
    return ApiError(why.status, why.message, code=why.code)


def _engine_unavailable(metrics: ServerMetrics, endpoint: str, reason: str) -> ApiError:
    """The 503 for a request the stopped engine cannot serve."""
    return _refusal(metrics, endpoint, Cancelled.engine_stopped(reason))


def _check_bearer(request: Request, expected: str | None, what: str) -> None:
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    if not header.startswith("Bearer "):
        raise ApiError(401, f"missing {what}: send 'Authorization: Bearer <key>'", code="missing_api_key")
    if header.removeprefix("Bearer ").strip() != expected:
        raise ApiError(401, f"wrong {what}", code="invalid_api_key")


def _check_model(body: SamplingFields, settings: ServerSettings) -> None:
    if body.model != settings.model_name:
        message = f"model {body.model!r} does not exist; this server serves {settings.model_name!r}"
        raise ApiError(404, message, "model", "model_not_found")


def _sampling(
    body: SamplingFields, max_tokens: int | None, prompt_len: int, engine: Engine, settings: ServerSettings
) -> SamplingParams:
    """Sampling parameters after the context-window and ``max_tokens`` cap checks."""
    room = engine.context_length - prompt_len
    if room <= 0:
        raise ApiError(
            400,
            f"prompt is {prompt_len} tokens; the context window is {engine.context_length}",
            "messages",
            "context_length_exceeded",
        )
    if max_tokens is not None and max_tokens > settings.max_tokens_cap:
        raise ApiError(400, f"max_tokens {max_tokens} is over the cap of {settings.max_tokens_cap}", "max_tokens")
    if max_tokens is not None and max_tokens > room:
        raise ApiError(
            400,
            f"prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds the context window ({engine.context_length})",
            "max_tokens",
            "context_length_exceeded",
        )
    limit = max_tokens if max_tokens is not None else min(room, settings.max_tokens_cap)
    if engine.max_total_tokens is not None and prompt_len + limit > engine.max_total_tokens:
        raise ApiError(
            400,
            f"prompt ({prompt_len}) + max_tokens ({limit}) exceeds the server's KV-cache cap "
            f"(--max-total-tokens {engine.max_total_tokens})",
            "max_tokens",
            "context_length_exceeded",
        )
    offset = _zero_expert_bias(body, engine, settings)
    return SamplingParams(limit, body.temperature, body.top_p, body.seed, body.stop_list(), offset)


def _zero_expert_bias(body: SamplingFields, engine: Engine, settings: ServerSettings) -> float:
    """The request's own compute dial (logits): ``zero_expert_bias``, or its ``compute_tier``'s, else 0."""
    if body.zero_expert_bias is not None and body.compute_tier is not None:
        raise ApiError(400, "send zero_expert_bias or compute_tier, not both", param="compute_tier")
    offset = body.zero_expert_bias or 0.0
    if body.compute_tier is not None:
        tiers = settings.tiers
        if body.compute_tier not in tiers:
            known = ", ".join(sorted(tiers)) or "none (start the server with --compute-tiers)"
            raise ApiError(400, f"unknown compute_tier {body.compute_tier!r}; this server has: {known}", "compute_tier")
        offset = tiers[body.compute_tier]
    if offset and not engine.request_zero_offsets:
        message = (
            "this backend does not support per-request zero_expert_bias or compute_tier; "
            "set a server-wide target with --target-zero-expert-ratio instead"
        )
        param = "compute_tier" if body.compute_tier else "zero_expert_bias"
        raise ApiError(400, message, param, "unsupported_parameter")
    return offset


def _completion_prompts(body: CompletionRequest, engine: Engine) -> list[list[int]]:
    """The prompt(s) of a completions request as token-id lists (text is tokenized with BOS)."""
    prompt = body.prompt
    if isinstance(prompt, str):
        return [engine.tokenizer(prompt).input_ids]
    if all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif all(isinstance(p, str) for p in prompt):
        return [engine.tokenizer(p).input_ids for p in prompt]
    else:
        prompts = [list(p) for p in prompt]
    vocab = len(engine.tokenizer)
    for ids in prompts:
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"token ids must lie in [0, {vocab})", param="prompt")
    return prompts


async def _score(
    prompts: list[list[int]],
    engine: Engine,
    metrics: ServerMetrics,
    dial: ComputeDial,
    lifecycle: Lifecycle,
    settings: ServerSettings,
) -> dict[str, Any]:
    """``echo`` + ``max_tokens: 0``: the log-prob of every prompt token after the first."""
    if lifecycle.failure is not None:
        raise _engine_unavailable(metrics, "completions", lifecycle.failure)
    for ids in prompts:
        if len(ids) > engine.context_length:
            message = f"a prompt is {len(ids)} tokens; the context window is {engine.context_length}"
            raise ApiError(400, message, "prompt", "context_length_exceeded")
    try:
        scores, report, fingerprint = await engine.score(prompts)
    except EngineFailed as exc:
        raise _engine_unavailable(metrics, "completions", str(exc)) from exc
    tokens = sum(map(len, prompts))
    metrics.record("completions", tokens, 0, report)
    dial.observe(report)
    choices = []
    for index, (ids, values) in enumerate(zip(prompts, scores, strict=True)):
        logprobs = {
            "tokens": [engine.tokenizer.decode([t]) for t in ids],
            "token_logprobs": [None, *values],
            "top_logprobs": None,
        }
        text = engine.tokenizer.decode(ids, skip_special_tokens=True)
        choices.append({"index": index, "text": text, "finish_reason": "length", "logprobs": logprobs})
    envelope = _response_envelope(uuid.uuid4().hex[:24], int(time.time()), "text_completion", settings, fingerprint)
    return envelope | {"choices": choices, "usage": usage_body(tokens, 0, report)}


def _envelope(handle: _Handle, kind: str, settings: ServerSettings) -> dict[str, Any]:
    return _response_envelope(handle.id, handle.created, kind, settings, handle.fingerprint)


def _response_envelope(
    request_id: str, created: int, kind: str, settings: ServerSettings, fingerprint: str
) -> dict[str, Any]:
    """The fields every response and chunk carries: id, object, created, model, system_fingerprint."""
    prefix = "chatcmpl-" if kind.startswith("chat") else "cmpl-"
    return {
        "id": prefix + request_id,
        "object": kind,
        "created": created,
        "model": settings.model_name,
        "system_fingerprint": fingerprint,
    }


def _usage_of(handles: list[_Handle]) -> dict[str, Any]:
    """The ``usage`` of finished requests together: token counts and FLOP reports summed."""
    finals = [handle.final for handle in handles]
    prompt_tokens, completion_tokens = sum(f.prompt_tokens for f in finals), sum(f.completion_tokens for f in finals)
    return usage_body(prompt_tokens, completion_tokens, sum(f.report for f in finals))


async def _chat_events(
    handle: _Handle, body: ChatCompletionRequest, settings: ServerSettings, include_usage: bool
) -> AsyncIterator[dict[str, str]]:
    envelope = _envelope(handle, "chat.completion.chunk", settings)
    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    yield _event(envelope | {"choices": [first]})
    async for chunk in _stream_chunks(handle, envelope, include_usage, lambda text: {"delta": {"content": text}}):
        yield chunk


async def _completion_events(
    handle: _Handle, body: CompletionRequest, settings: ServerSettings, include_usage: bool
) -> AsyncIterator[dict[str, str]]:
    envelope = _envelope(handle, "text_completion", settings)
    if body.echo:
        prompt_text = handle.engine.tokenizer.decode(handle.prompt, skip_special_tokens=True)
        yield _event(envelope | {"choices": [{"index": 0, "text": prompt_text, "finish_reason": None}]})
    async for chunk in _stream_chunks(handle, envelope, include_usage, lambda text: {"text": text}):
        yield chunk


async def _stream_chunks(handle: _Handle, envelope: dict[str, Any], include_usage: bool, content) -> AsyncIterator:
    """One chunk per engine output; the finishing chunk (or the usage chunk) carries ``usage``."""
    try:
        async for output in handle.outputs():
            if not output.text and output.finish_reason is None:
                continue
            choice = {"index": 0, **content(output.text), "finish_reason": output.finish_reason}
            # Each chunk names the version that produced its tokens, as the engine reports it per step.
            fingerprint = output.fingerprint or envelope["system_fingerprint"]
            chunk = envelope | {"system_fingerprint": fingerprint, "choices": [choice]}
            if output.finish_reason is not None and not include_usage:
                chunk["usage"] = handle.usage()
            yield _event(chunk)
        if include_usage:
            yield _event(envelope | {"choices": [], "usage": handle.usage()})
    except ApiError as exc:
        yield _event({"error": {"message": exc.message, "type": "server_error", "code": exc.code}})
    finally:
        await handle.aclose()
    yield {"data": "[DONE]"}


def _event(payload: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(payload)}
