"""Batched generation with a KV cache and exact per-request routing attribution.

A thin loop over :class:`zeda_core.runner.ModelRunner`, the runner the serving engine uses: each
request's routing counts cover exactly the tokens the model processed for it, every prompt token
once at prefill and every generated token once when it is fed back at decode. Padding and
finished rows (which leave the batch) never count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zeda_core.runner import ModelRunner, RequestRouting
from zeda_core.sampling import sample_next_tokens


@dataclass
class Generation:
    """One finished request.

    Attributes:
        tokens: generated token ids, the stop token included when one was produced.
        finish_reason: ``stop`` (EOS) or ``length``.
        processed_tokens: tokens the model ran on for this request (prompt + fed-back tokens).
        slot_counts: [L, 2] int64 (real, zero) routed slots over those tokens; None for a model
            without zero-aware MoE blocks.
        routes: layer index -> [processed_tokens, K] int64 expert ids taken for those tokens, in
            sequence order (prompt, then fed-back tokens); only when asked for (routing replay).
    """

    tokens: list[int]
    finish_reason: str
    processed_tokens: int
    slot_counts: torch.Tensor | None
    routes: dict[int, torch.Tensor] | None = None


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int | list[int],
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    record_routes: bool = False,
    zero_expert_bias: float = 0.0,
) -> list[Generation]:
    """Generate for every prompt (token ids), ``batch_size`` prompts at a time, left-padded.

    ``max_new_tokens`` is one limit for all prompts or one per prompt. ``record_routes`` keeps
    the expert ids of every processed token (zero-aware models only). ``zero_expert_bias`` is the
    compute dial of every request, in logits (:func:`zeda_core.routing.route`).
    """
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    runner = ModelRunner(model, pad_token_id, record_routes)
    results: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        results += _generate_batch(
            runner, prompts[chunk], limits[chunk], eos_token_id, temperature, top_p, generator, zero_expert_bias
        )
    return results


def _generate_batch(
    runner: ModelRunner,
    prompts: list[list[int]],
    limits: list[int],
    eos_token_id: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    zero_expert_bias: float,
) -> list[Generation]:
    """Prefill ``prompts`` together, then decode the unfinished rows until every request is done."""
    routing = [RequestRouting() for _ in prompts]
    generated: list[list[int]] = [[] for _ in prompts]
    finish = ["length"] * len(prompts)
    forward, kv = runner.prefill(prompts, zero_offsets=[zero_expert_bias] * len(prompts))
    rows = list(range(len(prompts)))  # the request of each batch row
    while True:
        tokens = sample_next_tokens(forward.logits, temperature, top_p, generator).tolist()
        for row, (request, token) in enumerate(zip(rows, tokens, strict=True)):
            routing[request].add(forward, row)
            if len(generated[request]) < limits[request]:
                generated[request].append(token)
                finish[request] = "stop" if token == eos_token_id else finish[request]
        keep = [row for row, r in enumerate(rows) if finish[r] != "stop" and len(generated[r]) < limits[r]]
        if not keep:
            break
        if len(keep) < len(rows):
            kv.keep(keep)
            rows = [rows[row] for row in keep]
        tokens = [generated[request][-1] for request in rows]
        forward = runner.decode(kv, tokens, zero_offsets=[zero_expert_bias] * len(rows))
    return [
        Generation(generated[i], finish[i], routing[i].processed, routing[i].slot_counts, routing[i].routes())
        for i in range(len(prompts))
    ]
