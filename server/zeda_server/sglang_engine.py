"""SGLang backend of ``zeda serve`` (GPU hosts): the same interface as the torch engine.

The model runs in ``sglang.Engine`` with the ZEDA model classes (``zeda_server.sglang_models``),
the Triton fused-MoE runner (it skips zero slots) and the routed-experts return on. Each
request's ``usage.zeda`` comes from that return: ids ``>= N`` are zero slots. Prompt log-probs
(remote teacher scoring) use SGLang's ``return_logprob`` with ``logprob_start_len=0``.

Hot-swap goes through SGLang's weight-update API (``update_weights_from_disk``): its writer
lock lets running requests finish on the old weights while new ones wait for the new ones.
The candidate passes the same file checks as on the torch engine first, and a smoke generation
after the update; a failed smoke test loads the previous checkpoint back.

Not exercised on this project's CPU machines (SGLang's engine needs a GPU); the pure parts
(usage from the routed-experts payload) are tested on CPU.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer

from zeda_core.checkpoint import read_state, resolve_checkpoint
from zeda_core.flops import FlopModel, FlopReport, expert_slot_flops, flop_report
from zeda_server.candidates import SMOKE_PROMPT, CandidateRejected, Scope, candidate_weights
from zeda_server.engine import QueueFull, SamplingParams, StepOutput, chat_prompt_ids
from zeda_server.sglang_models.plugin import register_configs
from zeda_server.sglang_models.zero_aware import routing_spec_of
from zeda_server.sglang_models.zero_slots import routed_slot_counts
from zeda_server.text_stream import TextStream
from zeda_server.versions import checkpoint_fingerprint


def moe_layer_count(config: Any) -> int:
    """MoE layers of a Qwen3-MoE or GLM4-MoE-Lite config."""
    layers = int(config.num_hidden_layers)
    dense = int(getattr(config, "first_k_dense_replace", 0) or 0)
    only_mlp = set(getattr(config, "mlp_only_layers", []) or [])
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return sum(1 for i in range(dense, layers) if i not in only_mlp and (i + 1) % step == 0)


def flop_model_of(config: Any) -> FlopModel:
    """The routed-expert figures ``usage.zeda`` needs, read off the config."""
    spec = routing_spec_of(config)
    return FlopModel(
        slot_flops=expert_slot_flops(int(config.hidden_size), int(config.moe_intermediate_size)),
        top_k=spec.top_k,
        moe_layers=moe_layer_count(config),
        shared_flops_per_token=0,
        other_flops_per_token=0,
        attention_flops_per_context_token=0,
    )


def slot_counts_from_meta(meta: dict[str, Any], flop_model: FlopModel, num_experts: int) -> torch.Tensor:
    """[L, 2] (real, zero) slots of one request from SGLang's ``meta_info`` (prompt + output - 1 tokens)."""
    return routed_slot_counts(meta["routed_experts"], flop_model.moe_layers, flop_model.top_k, num_experts)


def report_of(counts: torch.Tensor, flop_model: FlopModel) -> FlopReport:
    """The FLOP report of [L, 2] slot counts (every token routes K slots in every MoE layer)."""
    return flop_report(counts, int(counts[0].sum()) // flop_model.top_k, flop_model)


class SglangEngine:
    """``sglang.Engine`` behind the torch engine's interface (``submit``, ``score``, ``chat_prompt``)."""

    def __init__(self, model_path: str, max_batch: int = 256, max_queue: int = 1024, **engine_args: Any) -> None:
        import sglang

        os.environ.setdefault("SGLANG_EXTERNAL_MODEL_PACKAGE", "zeda_server.sglang_models")
        register_configs()
        checkpoint = resolve_checkpoint(model_path)
        config = AutoConfig.from_pretrained(checkpoint)
        self.spec = routing_spec_of(config)
        self.flop_model = flop_model_of(config)
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.context_length = int(config.max_position_embeddings)
        self.checkpoint = checkpoint
        self.fingerprint = checkpoint_fingerprint(checkpoint)
        self.previous: tuple[Path, str] | None = None
        self.max_queue = max_queue
        self._in_flight = 0
        self.engine = sglang.Engine(
            model_path=str(checkpoint),
            moe_runner_backend="triton",
            enable_return_routed_experts=True,
            disable_shared_experts_fusion=True,
            max_running_requests=max_batch,
            **engine_args,
        )

    @property
    def queue_depth(self) -> int:
        return max(0, self._in_flight - self.running)

    @property
    def running(self) -> int:
        return self._in_flight

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    async def submit(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StepOutput]:
        if self._in_flight >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests in flight")
        self._in_flight += 1
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
        try:
            chunks = await self.engine.async_generate(
                input_ids=prompt_ids, sampling_params=sampling, stream=True, return_routed_experts=True
            )
            async for chunk in chunks:
                new = chunk["output_ids"][len(generated) :]
                generated += new
                stream.update(generated)
                meta = chunk["meta_info"]
                finish = meta.get("finish_reason")
                output = StepOutput(stream.delta(final=finish is not None), new, [], fingerprint=self.fingerprint)
                if finish is not None:
                    output.finish_reason = "length" if finish.get("type") == "length" else "stop"
                    counts = slot_counts_from_meta(meta, self.flop_model, self.spec.num_experts)
                    output.report = report_of(counts, self.flop_model)
                    output.prompt_tokens, output.completion_tokens = len(prompt_ids), len(generated)
                yield output
                if finish is not None:
                    return
        finally:
            self._in_flight -= 1

    async def score(self, sequences: list[list[int]]) -> tuple[list[list[float]], FlopReport, str]:
        results = await self.engine.async_generate(
            input_ids=sequences,
            sampling_params={"max_new_tokens": 1, "temperature": 0.0},
            return_logprob=True,
            logprob_start_len=0,
            return_routed_experts=True,
        )
        scores, total = [], torch.zeros(self.flop_model.moe_layers, 2, dtype=torch.long)
        for sequence, result in zip(sequences, results, strict=True):
            values = [entry[0] for entry in result["meta_info"]["input_token_logprobs"]][1 : len(sequence)]
            scores.append([float(v) for v in values])
            total += slot_counts_from_meta(result["meta_info"], self.flop_model, self.spec.num_experts)
        return scores, report_of(total, self.flop_model), self.fingerprint

    def versions(self) -> dict[str, Any]:
        previous = {"fingerprint": self.previous[1], "source": str(self.previous[0])} if self.previous else None
        return {"current": {"fingerprint": self.fingerprint, "source": str(self.checkpoint)}, "previous": previous}

    async def swap_checkpoint(self, checkpoint: str, scope: Scope) -> dict[str, Any]:
        """Validate ``checkpoint`` and load all its weights into the running SGLang engine."""
        if scope != "all":
            raise CandidateRejected("the sglang backend swaps whole checkpoints: use scope 'all'")
        served = await asyncio.to_thread(read_state, self.checkpoint)
        await asyncio.to_thread(candidate_weights, checkpoint, self.spec, served, "all")
        await self._load(resolve_checkpoint(checkpoint))
        return self.versions()["current"]

    async def rollback(self) -> dict[str, Any]:
        if self.previous is None:
            raise LookupError("no previous version to roll back to")
        await self._load(self.previous[0])
        return self.versions()["current"]

    async def _load(self, checkpoint: Path) -> None:
        from sglang.srt.managers.io_struct import UpdateWeightFromDiskReqInput

        request = UpdateWeightFromDiskReqInput(model_path=str(checkpoint))
        success, message, *_ = await self.engine.tokenizer_manager.update_weights_from_disk(request, None)
        if not success:
            raise CandidateRejected(f"SGLang refused the weights: {message}")
        old, older = (self.checkpoint, self.fingerprint), self.previous
        self.checkpoint, self.fingerprint = checkpoint, checkpoint_fingerprint(checkpoint)
        self.previous = old
        smoke = SamplingParams(max_tokens=4, temperature=0.0)
        try:
            async for _ in self.submit(self.tokenizer(SMOKE_PROMPT).input_ids, smoke):
                pass
        except Exception as exc:  # the new weights do not serve: put the old ones back
            back = UpdateWeightFromDiskReqInput(model_path=str(old[0]))
            await self.engine.tokenizer_manager.update_weights_from_disk(back, None)
            (self.checkpoint, self.fingerprint), self.previous = old, older
            raise CandidateRejected(f"smoke generation failed: {type(exc).__name__}: {exc}") from exc

    def shutdown(self) -> None:
        self.engine.shutdown()
