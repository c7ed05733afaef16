"""SGLang backend of ``zeda serve``: ``sglang.Engine`` behind the :class:`~zeda_server.engine_api.Engine` contract.

The model runs in SGLang's engine with ZEDA's model classes (``zeda_server.sglang_models``,
registered through the ``sglang.srt.plugins`` entry point in every SGLang process) and the
routed-experts return on. On a GPU host the MoE runs SGLang's Triton runner, which skips zero
slots (id -1); on a CPU-only machine SGLang's CPU engine runs ZEDA's zero-skipping MoE forward
(``sglang_models.cpu_moe``), prepared by :func:`zeda_server.sglang_env.prepare_sglang_environment`.

Each request's ``usage.zeda`` comes from the routed-experts return: ids ``>= N`` are zero slots.
It covers every prompt token once and every generated token fed back once, as on the torch
engine. Prompt log-probs (remote teacher scoring) use ``return_logprob`` with
``logprob_start_len=0``.

Hot-swap goes through SGLang's weight-update API: ``update_weights_from_tensor`` for the router
rows (scope ``router``), ``update_weights_from_disk`` for whole checkpoints (scope ``all``). A
version lock (SGLang's writer-preferring ``RWLock``) spans the whole install: the update, the
smoke generation and, when that fails, the restore. Each request holds it shared from admission to
its last chunk, so running requests finish on the old weights, requests that arrive meanwhile wait
and run on the new ones, and no request changes version mid-stream. The candidate passes the torch
engine's file checks first.

The compute dial (``sglang_models.dial``): :meth:`SglangEngine.set_zero_offset` writes the
server-wide zero offset into every MoE layer through ``update_weights_from_tensor``, with
generation paused in place for that update only (running requests keep their KV and go on with
the next forward), without waiting for them to finish. A request's own ``zero_expert_bias``
travels in its SGLang request id, which only an eager forward reads: it is taken on SGLang's CPU
engine and refused on a GPU host (CUDA-graph replays would not see it). Requests routed with a
non-zero total offset salt SGLang's prefix cache with it, so cached KV is only reused between
requests routed alike. Weight updates (hot-swaps and the dial) run one at a time.

A dead SGLang subprocess (SGLang's watchdog sends SIGQUIT) is reported through
:meth:`SglangEngine.on_failure`, as the torch engine reports a dead engine thread. One that dies
while SGLang starts (its error is in the log) makes the engine raise :class:`ZedaError`, with the
other subprocesses stopped, instead of SGLang's launch handler killing the whole process tree.
Before SGLang starts, the checkpoint's router weights are checked against its config
(:func:`~zeda_core.checkpoint.check_router_weights`): SGLang's loader skips names it does not know.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from zeda_core.chat import chat_prompt_ids
from zeda_core.checkpoint import check_router_weights, read_state, resolve_checkpoint
from zeda_core.errors import ZedaError
from zeda_core.flops import FlopModel, FlopReport, expert_slot_flops, flop_report
from zeda_server.candidates import SMOKE_PROMPT, CandidateRejected, Scope, candidate_weights
from zeda_server.engine_api import FailureReport, QueueFull, SamplingParams, StepOutput
from zeda_server.sglang_env import SglangPlatform, prepare_sglang_environment
from zeda_server.sglang_models.dial import cache_salt, server_offset_weights, tagged_rid
from zeda_server.sglang_models.forward_counter import ForwardCounts, create_counter_file, read_forward_counts
from zeda_server.sglang_models.plugin import register_configs
from zeda_server.sglang_models.zero_slots import routed_slot_counts, served_routing_spec
from zeda_server.text_stream import TextStream
from zeda_server.versions import VersionInfo, checkpoint_fingerprint, describe_versions, router_fingerprint

CPU_KV_TOKENS_CAP = 65_536
CUSTOM_HANDLER_NOTICE = "Using custom SIGQUIT handler"


def _launch_phase_sigquit(signum: int, frame: FrameType | None) -> None:
    """SIGQUIT while SGLang starts: a subprocess failed. ``sglang.Engine`` then raises by itself (its
    scheduler pipe closes), so nothing is done here; SGLang's own handler would SIGKILL this process."""


class _DropNotice(logging.Filter):
    """Drops SGLang's error-level notice that a custom SIGQUIT handler is in use (it is ZEDA's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(CUSTOM_HANDLER_NOTICE)


def moe_layer_indices(config: Any) -> list[int]:
    """Indices of the MoE layers of a Qwen3-MoE or GLM4-MoE-Lite config."""
    layers = int(config.num_hidden_layers)
    kinds = getattr(config, "mlp_layer_types", None)
    if kinds is not None:
        return [i for i, kind in enumerate(kinds) if kind != "dense"]
    dense = int(getattr(config, "first_k_dense_replace", 0) or 0)
    only_mlp = set(getattr(config, "mlp_only_layers", []) or [])
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return [i for i in range(dense, layers) if i not in only_mlp and (i + 1) % step == 0]


def flop_model_of(config: Any) -> FlopModel:
    """The routed-expert figures ``usage.zeda`` needs, read off the config."""
    spec = served_routing_spec(config)
    return FlopModel(
        slot_flops=expert_slot_flops(int(config.hidden_size), int(config.moe_intermediate_size)),
        top_k=spec.top_k,
        moe_layers=len(moe_layer_indices(config)),
        shared_flops_per_token=0,
        other_flops_per_token=0,
        attention_flops_per_context_token=0,
    )


@dataclass(frozen=True)
class CaptureLayout:
    """How SGLang's routed-experts capture is laid out: [tokens, num_layers, top_k], MoE rows ``moe_layers``."""

    num_layers: int
    top_k: int
    moe_layers: list[int]

    @classmethod
    def of(cls, config: Any) -> CaptureLayout:
        return cls(int(config.num_hidden_layers), int(config.num_experts_per_tok), moe_layer_indices(config))


def slot_counts_from_meta(meta: dict[str, Any], layout: CaptureLayout, num_experts: int) -> torch.Tensor:
    """[MoE layers, 2] (real, zero) slots of one request from SGLang's ``meta_info`` (prompt + output - 1 tokens)."""
    encoded = meta["routed_experts"]
    return routed_slot_counts(encoded, layout.num_layers, layout.top_k, num_experts, layout.moe_layers)


def report_of(counts: torch.Tensor, flop_model: FlopModel) -> FlopReport:
    """The FLOP report of [L, 2] slot counts (every token routes K slots in every MoE layer)."""
    return flop_report(counts, int(counts[0].sum()) // flop_model.top_k, flop_model)


def engine_arguments(
    platform: SglangPlatform,
    dtype: str,
    max_batch: int,
    context_length: int,
    max_total_tokens: int | None,
    tp_size: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Keyword arguments of ``sglang.Engine`` (``ServerArgs`` fields) for this platform.

    On CPU: float32 unless a dtype is given, a KV pool of at most ``max_batch`` full contexts
    (``CPU_KV_TOKENS_CAP`` tokens) unless ``max_total_tokens`` says otherwise, and no overlap
    scheduling (it overlaps nothing on one CPU device, and runs one more decode step for every
    finished request, whose routing no request reports), and a scheduler that sleeps when idle
    (it otherwise spins one core at 100 % with no request in flight). On GPU: the Triton MoE runner and
    SGLang's own sizing and scheduling. ``extra`` (``--sglang-arg``) overrides everything but the
    settings ZEDA needs: the routed-experts return and unfused shared experts.
    """
    args: dict[str, Any] = {
        "enable_return_routed_experts": True,
        "disable_shared_experts_fusion": True,
        "max_running_requests": max_batch,
        "tp_size": tp_size,
    }
    if platform.on_cpu:
        args |= {"device": "cpu", "dtype": "float32" if dtype == "auto" else dtype, "disable_overlap_schedule": True}
        args["sleep_on_idle"] = True
        args["max_total_tokens"] = max_total_tokens or min(max_batch * context_length, CPU_KV_TOKENS_CAP)
    else:
        args |= {"moe_runner_backend": "triton"}
        if dtype != "auto":
            args["dtype"] = dtype
        if max_total_tokens is not None:
            args["max_total_tokens"] = max_total_tokens
    fixed = {"enable_return_routed_experts", "disable_shared_experts_fusion", "custom_sigquit_handler"}
    refused = sorted(fixed & set(extra))
    if refused:
        raise ZedaError(f"--sglang-arg {refused[0]} cannot be changed: the ZEDA backend needs it")
    return args | extra


@dataclass(kw_only=True)
class _ServedVersion(VersionInfo):
    """What SGLang holds: the weights of checkpoint ``base``, optionally with another checkpoint's ``router`` rows."""

    base: Path
    router: dict[str, torch.Tensor] | None = None


class SglangEngine:
    """``sglang.Engine`` behind the :class:`~zeda_server.engine_api.Engine` contract.

    Args:
        model_path: local directory or hub id (a ZEDA, reference-format or plain Qwen3-MoE /
            GLM4-MoE-Lite checkpoint).
        max_batch: requests SGLang runs together (``max_running_requests``).
        max_queue: requests held (running + waiting) before :class:`QueueFull`.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        max_total_tokens: KV pool size in tokens (None: see :func:`engine_arguments`).
        tp_size: tensor-parallel ranks.
        sglang_args: further ``ServerArgs`` fields.

    Raises:
        ZedaError: an unservable checkpoint or configuration, or SGLang failed to start.
    """

    tokenizer: PreTrainedTokenizerBase
    context_length: int
    max_total_tokens: int | None
    request_zero_offsets: bool

    def __init__(
        self,
        model_path: str,
        max_batch: int = 32,
        max_queue: int = 256,
        dtype: str = "auto",
        max_total_tokens: int | None = None,
        tp_size: int = 1,
        sglang_args: dict[str, Any] | None = None,
    ) -> None:
        self._counter_dir = tempfile.TemporaryDirectory(prefix="zeda-sglang-")
        self.forward_counter = create_counter_file(Path(self._counter_dir.name) / "forward.bin")
        self.platform = prepare_sglang_environment(self.forward_counter, tp_size)
        import sglang
        from sglang.srt.utils.aio_rwlock import RWLock

        register_configs()
        checkpoint = resolve_checkpoint(model_path)
        config = AutoConfig.from_pretrained(checkpoint)
        self.spec = served_routing_spec(config)
        check_router_weights(checkpoint)
        self.layout = CaptureLayout.of(config)
        self.flop_model = flop_model_of(config)
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.context_length = int(config.max_position_embeddings)
        self.current = _ServedVersion(checkpoint_fingerprint(checkpoint), str(checkpoint), base=checkpoint)
        self.previous: _ServedVersion | None = None
        self.max_queue = max_queue
        self._in_flight = 0
        self._version_lock = RWLock()
        self._weight_updates = asyncio.Lock()  # one SGLang weight-update call or session at a time
        self.zero_offset = 0.0  # the server-wide compute dial (logits), as SGLang holds it
        self.request_zero_offsets = self.platform.on_cpu  # see the module docstring
        self._failure = FailureReport()  # fails when an SGLang subprocess dies
        self._on_sigterm: Callable[[int, FrameType | None], None] | None = None
        args = engine_arguments(
            self.platform, dtype, max_batch, self.context_length, max_total_tokens, tp_size, sglang_args or {}
        )
        self.max_total_tokens: int | None = args.get("max_total_tokens")  # None: SGLang sizes its pool (GPU)
        logging.getLogger("sglang.srt.entrypoints.engine").addFilter(_DropNotice())
        try:
            self.engine = sglang.Engine(
                model_path=str(checkpoint), log_level="warning", custom_sigquit_handler=_launch_phase_sigquit, **args
            )
        except TypeError as exc:  # an unknown ServerArgs field
            raise ZedaError(f"invalid SGLang engine argument: {exc}") from exc
        except Exception as exc:
            from sglang.srt.utils import kill_process_tree

            kill_process_tree(os.getpid(), include_parent=False)
            raise ZedaError(
                f"SGLang failed to start on {checkpoint} (its error is in the log above): {type(exc).__name__}: {exc}"
            ) from exc
        self._hand_on_signals()

    @property
    def fingerprint(self) -> str:
        return self.current.fingerprint

    @property
    def queue_depth(self) -> int:
        return 0

    @property
    def running(self) -> int:
        return self._in_flight

    def route_signals_to(self, on_sigterm: Callable[[int, FrameType | None], None]) -> None:
        """Hand SIGTERM to ``on_sigterm`` (``zeda serve``'s drain) instead of SGLang's own drain."""
        self._on_sigterm = on_sigterm

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` (on the event loop) when an SGLang subprocess dies; at once if one has."""
        self._failure.subscribe(callback)

    def _hand_on_signals(self) -> None:
        """Swap SGLang's signal handler class for one that hands SIGTERM and a dead subprocess on.

        SGLang's tokenizer manager claims SIGTERM and SIGQUIT on its event loop at the first
        request: on SIGTERM it runs its own drain, and on the SIGQUIT its watchdog sends when a
        subprocess dies it kills the whole process tree, so waiting requests see their
        connection reset. Instead, SIGTERM goes to :meth:`route_signals_to`'s handler (when one
        is set), and a dead subprocess marks the engine failed and goes to :meth:`on_failure`'s
        callback, which answers what the server held with 503.
        """
        manager, engine = self.engine.tokenizer_manager, self

        class HandOnSignals(manager.signal_handler_class):
            def sigterm_handler(self, signum=None, frame=None) -> None:
                if engine._on_sigterm is None:
                    return super().sigterm_handler(signum, frame)
                engine._on_sigterm(signal.SIGTERM, frame)

            def running_phase_sigquit_handler(self, signum=None, frame=None) -> None:
                if self.tokenizer_manager._subprocess_watchdog is not None:
                    self.tokenizer_manager._subprocess_watchdog.stop()
                engine._failure.fail("an SGLang subprocess died")

        manager.signal_handler_class = HandOnSignals

    def forward_counts(self) -> ForwardCounts:
        """Slots the CPU MoE forward computed and skipped, and seconds in MoE blocks and model forwards,
        since start (all 0 on GPU)."""
        return read_forward_counts(self.forward_counter)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    async def submit(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StepOutput]:
        """Stream one request's outputs, all from one served version; closing the iterator aborts it.

        Raises:
            ValueError: ``params.zero_expert_bias`` is set but this engine takes no request offsets.
        """
        self._failure.check()
        if params.zero_expert_bias and not self.request_zero_offsets:
            raise ValueError("zero_expert_bias is not supported by the SGLang backend on a GPU host")
        if self._in_flight >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests in flight")
        self._in_flight += 1
        try:
            async with self._version_lock.reader_lock:
                async for output in self._generate(prompt_ids, params, self.fingerprint):
                    yield output
        finally:
            self._in_flight -= 1

    async def _generate(
        self, prompt_ids: list[int], params: SamplingParams, fingerprint: str
    ) -> AsyncIterator[StepOutput]:
        """One request's outputs from SGLang, each tagged with ``fingerprint`` (the version it runs on)."""
        sampling = {
            "max_new_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stop": list(params.stop),
        }
        if params.seed is not None:
            sampling["sampling_seed"] = params.seed
        stream = TextStream(self.tokenizer, list(params.stop))
        generated: list[int] = []
        chunks = await self.engine.async_generate(
            input_ids=list(prompt_ids),
            sampling_params=sampling,
            stream=True,
            return_logprob=True,
            return_routed_experts=True,
            rid=tagged_rid(params.zero_expert_bias) if params.zero_expert_bias else None,
            cache_salt=cache_salt(self.zero_offset + params.zero_expert_bias),
        )
        async for chunk in chunks:
            new = chunk["output_ids"][len(generated) :]
            meta = chunk["meta_info"]
            logprobs = [float(entry[0]) for entry in meta["output_token_logprobs"][len(generated) :]]
            generated += new
            stream.update(generated)
            finish = meta.get("finish_reason")
            delta = stream.delta(final=finish is not None)
            output = StepOutput(delta, new, logprobs, fingerprint=fingerprint)
            if finish is not None:
                output.finish_reason = "length" if finish.get("type") == "length" else "stop"
                counts = slot_counts_from_meta(meta, self.layout, self.spec.num_experts)
                output.report = report_of(counts, self.flop_model)
                output.prompt_tokens, output.completion_tokens = len(prompt_ids), len(generated)
            yield output
            if finish is not None:
                return

    async def score(self, sequences: list[list[int]]) -> tuple[list[list[float]], FlopReport, str]:
        """Log-probs of tokens 1..n-1 of each sequence, the FLOPs spent, the fingerprint."""
        self._failure.check()
        async with self._version_lock.reader_lock:
            return await self._score(sequences, self.fingerprint)

    async def _score(self, sequences: list[list[int]], fingerprint: str) -> tuple[list[list[float]], FlopReport, str]:
        """:meth:`score` without the version lock (the smoke test runs under the writer lock)."""
        results = await self.engine.async_generate(
            input_ids=[list(s) for s in sequences],
            sampling_params={"max_new_tokens": 1, "temperature": 0.0},
            return_logprob=True,
            logprob_start_len=0,
            return_routed_experts=True,
            cache_salt=cache_salt(self.zero_offset),
        )
        scores, reports = [], []
        for sequence, result in zip(sequences, results, strict=True):
            values = [entry[0] for entry in result["meta_info"]["input_token_logprobs"]][1 : len(sequence)]
            scores.append([float(v) for v in values])
            counts = slot_counts_from_meta(result["meta_info"], self.layout, self.spec.num_experts)
            reports.append(report_of(counts, self.flop_model))
        return scores, sum(reports), fingerprint

    def versions(self) -> dict[str, object]:
        return describe_versions(self.current, self.previous)

    async def set_zero_offset(self, offset: float) -> None:
        """Make ``offset`` (logits) the server-wide zero offset of every MoE layer from the next forward on.

        One weight-update session over every MoE layer's ``topk.zero_offset``, loaded between two
        forwards: running requests are neither waited for nor dropped, and go on at ``offset``.

        Raises:
            ZedaError: SGLang refused the update; the offset is unchanged.
        """
        weights = server_offset_weights(self.layout.moe_layers, offset)
        try:
            await self._update_from_tensors(weights, between_forwards=True)
        except CandidateRejected as exc:
            raise ZedaError(f"SGLang did not take zero offset {offset}: {exc}") from exc
        self.zero_offset = float(offset)

    async def swap_checkpoint(self, checkpoint: str, scope: Scope) -> dict[str, Any]:
        """Validate ``checkpoint`` and load its router rows or all its weights into the running engine.

        Raises:
            CandidateRejected: a failed check, SGLang refused the weights, or the smoke test failed;
                the served version is unchanged.
        """
        served = await asyncio.to_thread(read_state, self.current.base)
        weights = await asyncio.to_thread(candidate_weights, checkpoint, self.spec, served, scope)
        path = resolve_checkpoint(checkpoint)
        if scope == "all":
            version = _ServedVersion(checkpoint_fingerprint(path), str(checkpoint), base=path)
        else:
            fingerprint = router_fingerprint(self.current.fingerprint, checkpoint_fingerprint(path))
            version = _ServedVersion(fingerprint, str(checkpoint), "router", base=self.current.base, router=weights)
        await self._install(version)
        return version.describe()

    async def rollback(self) -> dict[str, Any]:
        """Load the previous version back (the current one becomes the previous)."""
        if self.previous is None:
            raise LookupError("no previous version to roll back to")
        await self._install(self.previous)
        return self.current.describe()

    async def _install(self, version: _ServedVersion) -> None:
        """Load ``version`` into SGLang, smoke-test it, and make it current; restore the old one on failure.

        Holds the version lock exclusively: waits for running requests, and new ones wait for it.
        """
        async with self._version_lock.writer_lock:
            old, older = self.current, self.previous
            await self._load(version, old)
            self.current, self.previous = version, old
            try:
                await self._smoke_test()
            except Exception as exc:  # the new weights do not serve: put the old ones back
                await self._load(old, version)
                self.current, self.previous = old, older
                raise CandidateRejected(f"smoke generation failed: {type(exc).__name__}: {exc}") from exc

    async def _load(self, version: _ServedVersion, loaded: _ServedVersion) -> None:
        """Make SGLang hold ``version``'s weights, given that it holds ``loaded``'s."""
        if version.base != loaded.base or (loaded.router is not None and version.router is None):
            await self._update_from_disk(version.base)
        if version.router is not None:
            await self._update_from_tensors(version.router)

    async def _update_from_disk(self, checkpoint: Path) -> None:
        from sglang.srt.managers.io_struct import UpdateWeightFromDiskReqInput

        request = UpdateWeightFromDiskReqInput(model_path=str(checkpoint))
        async with self._weight_updates:
            success, message, *_ = await self.engine.tokenizer_manager.update_weights_from_disk(request, None)
        if not success:
            raise CandidateRejected(f"SGLang refused the weights: {message}")

    async def _update_from_tensors(self, tensors: dict[str, torch.Tensor], between_forwards: bool = False) -> None:
        """Load ``tensors`` (router rows, or the dial's offsets) in a weight-update session (SGLang 0.5.23 needs one).

        By default SGLang's update waits for every running request to finish and flushes the prefix
        cache (a hot-swap, which holds the version lock, has none running). ``between_forwards``
        instead loads the tensors between two forwards of the running batch (see
        :meth:`_paused_in_place`) and keeps the prefix cache, whose entries are salted with the
        offset they were routed with (:func:`~zeda_server.sglang_models.dial.cache_salt`).
        """
        from sglang.srt.managers.io_struct import (
            BeginWeightUpdateReqInput,
            EndWeightUpdateReqInput,
            UpdateWeightsFromTensorReqInput,
        )

        manager = self.engine.tokenizer_manager
        payload = self.engine._serialize_tensors_per_rank(list(tensors.items()), None)
        async with self._weight_updates, self._paused_in_place(between_forwards):
            opened, message = await manager.begin_weight_update(BeginWeightUpdateReqInput(), None)
            if not opened:
                raise CandidateRejected(f"SGLang opened no weight-update session: {message}")
            try:
                request = UpdateWeightsFromTensorReqInput(
                    serialized_named_tensors=payload, flush_cache=not between_forwards
                )
                success, message = await manager.update_weights_from_tensor(request, None)
            finally:
                closed, end_message = await manager.end_weight_update(EndWeightUpdateReqInput(), None)
        if not success:
            raise CandidateRejected(f"SGLang refused the weights: {message}")
        if not closed:
            raise CandidateRejected(f"SGLang could not close the weight update: {end_message}")

    @contextlib.asynccontextmanager
    async def _paused_in_place(self, pause: bool) -> AsyncIterator[None]:
        """Hold SGLang's scheduler between two forwards for the block, when ``pause``.

        SGLang's ``pause_generation`` in place: running requests keep their KV and go on afterwards.
        Weight updates meanwhile skip SGLang's model-update lock, which waits for every running
        request to finish.
        """
        if not pause:
            yield
            return
        from sglang.srt.managers.io_struct import ContinueGenerationReqInput, PauseGenerationReqInput

        manager = self.engine.tokenizer_manager
        await manager.pause_generation(PauseGenerationReqInput(mode="in_place"))
        try:
            yield
        finally:
            await manager.continue_generation(ContinueGenerationReqInput(torch_empty_cache=False))

    async def _smoke_test(self) -> None:
        """Score the smoke prompt on the weights just loaded; raises on an engine error or non-finite log-probs."""
        scores, _, _ = await self._score([self.tokenizer(SMOKE_PROMPT).input_ids], self.fingerprint)
        if not all(torch.isfinite(torch.tensor(s)).all() for s in scores if s):
            raise ValueError("non-finite log-probs")

    def shutdown(self) -> None:
        self.engine.shutdown()
        self._counter_dir.cleanup()


def parse_sglang_args(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``--sglang-arg``) -> ServerArgs fields; VALUE is JSON when it parses, else text.

    Raises:
        ZedaError: a pair without ``=`` or with an empty key.
    """
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ZedaError(f"--sglang-arg {pair!r}: expected KEY=VALUE, e.g. disable_radix_cache=true")
        try:
            args[key] = json.loads(value)
        except json.JSONDecodeError:
            args[key] = value
    return args
