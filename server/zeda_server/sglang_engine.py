"""SGLang backend of ``zeda serve`` (GPU hosts): the same interface as the torch engine.

The model runs in ``sglang.Engine`` with the ZEDA model classes (``zeda_server.sglang_models``),
the Triton fused-MoE runner (it skips zero slots) and the routed-experts return on. Each
request's ``usage.zeda`` comes from that return: ids ``>= N`` are zero slots. Prompt log-probs
(remote teacher scoring) use SGLang's ``return_logprob`` with ``logprob_start_len=0``.

Not exercised on this project's CPU machines (SGLang's engine needs a GPU); the pure parts
(usage from the routed-experts payload) are tested on CPU.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer

from zeda_core.checkpoint import resolve_checkpoint
from zeda_core.flops import FlopModel, FlopReport, expert_slot_flops, flop_report
from zeda_server.engine import QueueFull, SamplingParams, StepOutput, chat_prompt_ids, checkpoint_fingerprint
from zeda_server.sglang_models.plugin import register_configs
from zeda_server.sglang_models.zero_aware import routing_spec_of
from zeda_server.sglang_models.zero_slots import routed_slot_counts
from zeda_server.text_stream import TextStream


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
        self.fingerprint = checkpoint_fingerprint(checkpoint)
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
                output = StepOutput(stream.delta(final=finish is not None), new, [])
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

    async def score(self, sequences: list[list[int]]) -> tuple[list[list[float]], FlopReport]:
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
        return scores, report_of(total, self.flop_model)

    def shutdown(self) -> None:
        self.engine.shutdown()
