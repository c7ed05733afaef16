"""How the SGLang backend hands zero slots to the MoE kernels, and reads them back per request.

Routing follows ``zeda_core.route``: a slot whose expert id is ``>= N`` is a zero slot. Before
the fused MoE runs, zero slots get id -1 and weight 0. SGLang 0.5.23's Triton fused-MoE runner
skips -1 blocks, so they are never computed (upstream's remap to expert 0 computes them).

SGLang's routed-experts return captures ids right after top-k, before the hand-off, so zero
slots appear there as ids ``>= N``: enough to count each request's real and zero slots.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import torch

from zeda_core.errors import ZedaError
from zeda_core.model_queries import spec_from_config
from zeda_core.spec import RoutingSpec

SKIPPED_SLOT = -1
SERVED_MODEL_TYPES = ("qwen3_moe", "qwen3_moe_plus_plus", "glm4_moe_lite", "glm4_moe_lite_plus_plus")


def served_routing_spec(config: Any) -> RoutingSpec:
    """The routing spec SGLang serves ``config`` with: N + Z rows for a ZEDA model, Z = 0 for a plain one.

    Raises:
        ZedaError: a family the SGLang backend does not serve.
    """
    model_type = str(config.model_type)
    if model_type not in SERVED_MODEL_TYPES:
        raise ZedaError(
            f"the sglang backend serves Qwen3-MoE and GLM4-MoE-Lite checkpoints, not {model_type!r}; "
            "use --backend torch"
        )
    return spec_from_config(config)


def hand_off_zero_slots(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, K] ids (zero slots ``>= num_experts``) and weights -> (ids with -1 for zero slots, weights with 0).

    The inputs are not modified; ids keep their dtype (int32 in SGLang).
    """
    zero = topk_ids >= num_experts
    ids = torch.where(zero, torch.full_like(topk_ids, SKIPPED_SLOT), topk_ids)
    weights = torch.where(zero, torch.zeros_like(topk_weights), topk_weights)
    return ids, weights


def routed_slot_counts(
    encoded: str, num_layers: int, top_k: int, num_experts: int, moe_layers: list[int]
) -> torch.Tensor:
    """[len(moe_layers), 2] int64 (real, zero) slot counts of one request from ``meta_info["routed_experts"]``.

    Args:
        encoded: base64 of little-endian int32 ids, shape [tokens, num_layers, top_k].
        num_layers: decoder layers the capture covers (all of them: dense layers' rows are unused).
        top_k: slots per token.
        num_experts: N; ids ``>= N`` are zero slots.
        moe_layers: indices of the MoE layers among the ``num_layers``.

    Raises:
        ZedaError: the payload is not base64 or its size is not a multiple of ``num_layers * top_k``.
    """
    try:
        raw = base64.b64decode(encoded, validate=True)
    except ValueError as exc:
        raise ZedaError(f"routed_experts is not base64: {exc}") from exc
    per_token = num_layers * top_k * 4
    if len(raw) % per_token:
        raise ZedaError(f"routed_experts has {len(raw)} bytes, not a multiple of {num_layers} x {top_k} int32")
    ids = torch.from_numpy(np.frombuffer(raw, dtype="<i4").astype(np.int64)).view(-1, num_layers, top_k)
    ids = ids[:, moe_layers]
    zero = (ids >= num_experts).sum(dim=(0, 2))
    real = ids.shape[0] * top_k - zero
    return torch.stack([real, zero], dim=1).long()
