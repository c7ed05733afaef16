"""Batched generation with a KV cache and exact per-request routing attribution.

Each request's routing counts cover exactly the tokens the model processed for it: every prompt
token once at prefill and every generated token once when it is fed back at decode. Padding and
finished rows never count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from zeda_core.batching import pad_batch
from zeda_core.moe import ZeroExpertMoeBlock
from zeda_core.recording import record_routing


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


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] float logits -> [B] token ids; greedy when temperature is 0."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    probs = torch.softmax(warpers(None, logits), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
) -> list[Generation]:
    """Generate for every prompt (token ids), ``batch_size`` prompts at a time, left-padded.

    ``max_new_tokens`` is one limit for all prompts or one per prompt. ``record_routes`` keeps
    the expert ids of every processed token (zero-aware models only).
    """
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    zero_aware = any(isinstance(m, ZeroExpertMoeBlock) for m in model.modules())
    results: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        results += _generate_batch(
            model,
            prompts[chunk],
            limits[chunk],
            eos_token_id,
            pad_token_id,
            temperature,
            top_p,
            generator,
            zero_aware,
            record_routes and zero_aware,
        )
    return results


def _generate_batch(
    model: torch.nn.Module,
    prompts: list[list[int]],
    limits: list[int],
    eos_token_id: int,
    pad_token_id: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    zero_aware: bool,
    record_routes: bool,
) -> list[Generation]:
    device = model.device
    batch = len(prompts)
    input_ids, attention = (t.to(device) for t in pad_batch(prompts, pad_token_id, left=True))
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    counts = torch.zeros(batch, 0, 2, dtype=torch.long)
    processed = torch.tensor([len(p) for p in prompts])
    generated: list[list[int]] = [[] for _ in prompts]
    finish = ["length"] * batch
    active = torch.tensor([limit > 0 for limit in limits])
    step_mask = attention.bool()
    step_routes: list[tuple[torch.Tensor, dict[int, torch.Tensor]]] = []
    cache = None
    while True:
        with record_routing(token_mask=step_mask) as recorder:
            out = model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        if zero_aware:
            step_counts = recorder.slot_counts()
            counts = step_counts if counts.shape[1] == 0 else counts + step_counts
        if record_routes:
            step_routes.append((step_mask.cpu(), {i: ids.cpu() for i, ids in recorder.routes().items()}))
        cache = out.past_key_values
        next_tokens = _sample(out.logits[:, -1].float(), temperature, top_p, generator).cpu()
        for row in torch.nonzero(active).flatten().tolist():
            token = int(next_tokens[row])
            generated[row].append(token)
            if token == eos_token_id:
                finish[row], active[row] = "stop", False
            elif len(generated[row]) >= limits[row]:
                active[row] = False
        if not active.any():
            break
        processed += active.long()
        step_mask = active.clone().to(device)[:, None]  # a copy: `active` changes in place
        input_ids = torch.where(active, next_tokens, pad_token_id).to(device)[:, None]
        attention = torch.cat([attention, step_mask.long()], dim=-1)
        positions = positions[:, -1:] + 1
    return [
        Generation(
            generated[row],
            finish[row],
            int(processed[row]),
            counts[row] if zero_aware else None,
            _row_routes(step_routes, row) if record_routes else None,
        )
        for row in range(batch)
    ]


def _row_routes(step_routes: list[tuple[torch.Tensor, dict[int, torch.Tensor]]], row: int) -> dict[int, torch.Tensor]:
    """Layer -> [processed, K] ids of one row, gathered over the steps where the row ran a token."""
    layers = step_routes[0][1].keys()
    return {
        layer: torch.cat([routes[layer][row][mask[row]] for mask, routes in step_routes], dim=0) for layer in layers
    }
