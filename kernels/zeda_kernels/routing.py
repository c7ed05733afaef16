"""Fused zero-aware routing: one Triton program routes one token.

It gives exactly ``zeda_core.route``'s ids and weights, except for the slot order of sigmoid
families, where ``route`` (like the HF routers) leaves top-k unsorted. The kernel always emits
slots in descending selection score.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zeda_core.errors import ZedaError
from zeda_core.routing import route
from zeda_core.spec import RoutingSpec
from zeda_kernels.checks import FLOAT_DTYPES, check_same_device, check_tensor

RouteResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@triton.jit
def _route_kernel(
    logits_ptr,
    bias_ptr,
    ids_ptr,
    weights_ptr,
    zero_ptr,
    scale,
    NUM_EXPERTS: tl.constexpr,
    NUM_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    TOP_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    MASK_ZERO: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < NUM_ROWS
    is_zero = offs >= NUM_EXPERTS
    logits = tl.load(logits_ptr + row * NUM_ROWS + offs, mask=valid, other=float("-inf")).to(tl.float32)
    if MASK_ZERO:
        logits = tl.where(is_zero, float("-inf"), logits)
    if SIGMOID:
        scores = tl.where(valid, tl.sigmoid(logits), 0.0)
        choice = scores
        if HAS_BIAS:
            choice = choice + tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        if N_GROUP > 1:
            group_size: tl.constexpr = NUM_EXPERTS // N_GROUP
            group_scores = tl.full([BLOCK], float("-inf"), tl.float32)
            for g in tl.static_range(N_GROUP):
                member = (offs >= g * group_size) & (offs < (g + 1) * group_size)
                best = tl.max(tl.where(member, choice, float("-inf")), 0)
                best_idx = tl.min(tl.where(member & (choice == best), offs, BLOCK), 0)
                second = tl.max(tl.where(member & (offs != best_idx), choice, float("-inf")), 0)
                group_scores = tl.where(offs == g, best + second, group_scores)
            allowed = is_zero
            for _ in tl.static_range(TOPK_GROUP):
                top = tl.max(group_scores, 0)
                group = tl.min(tl.where(group_scores == top, offs, BLOCK), 0)
                allowed = allowed | ((offs >= group * group_size) & (offs < (group + 1) * group_size))
                group_scores = tl.where(offs == group, float("-inf"), group_scores)
            choice = tl.where(allowed, choice, float("-inf"))
        if MASK_ZERO:
            choice = tl.where(is_zero, float("-inf"), choice)
    else:
        shifted = tl.exp(logits - tl.max(logits, 0))
        scores = tl.where(valid, shifted / tl.sum(shifted, 0), 0.0)
        choice = scores
    choice = tl.where(valid, choice, float("-inf"))
    rank = tl.full([BLOCK], -1, tl.int32)
    for k in tl.static_range(TOP_K):
        top = tl.max(choice, 0)
        idx = tl.min(tl.where(choice == top, offs, BLOCK), 0)
        rank = tl.where(offs == idx, k, rank)
        choice = tl.where(offs == idx, float("-inf"), choice)
    total = tl.sum(tl.where(rank >= 0, scores, 0.0), 0)
    if SIGMOID:
        total = total + 1e-20
    for k in tl.static_range(TOP_K):
        idx = tl.sum(tl.where(rank == k, offs, 0), 0)
        weight = tl.sum(tl.where(rank == k, scores, 0.0), 0)
        if NORM:
            weight = weight / total
        zero = idx >= NUM_EXPERTS
        tl.store(ids_ptr + row * TOP_K + k, idx.to(tl.int64))
        tl.store(weights_ptr + row * TOP_K + k, tl.where(zero, 0.0, weight * scale))
        tl.store(zero_ptr + row * TOP_K + k, zero.to(tl.int8))


def _check(router_logits: torch.Tensor, spec: RoutingSpec, selection_bias: torch.Tensor | None) -> None:
    check_tensor("router_logits", router_logits, (None, spec.num_rows), FLOAT_DTYPES)
    if spec.selection_bias != (selection_bias is not None):
        raise ZedaError("selection_bias must be given exactly when spec.selection_bias is set")
    if selection_bias is not None:
        check_tensor("selection_bias", selection_bias, (spec.num_rows,), FLOAT_DTYPES)
        check_same_device(router_logits=router_logits, selection_bias=selection_bias)


def fused_route(
    router_logits: torch.Tensor, spec: RoutingSpec, selection_bias: torch.Tensor | None = None
) -> RouteResult:
    """Route T tokens with one kernel launch.

    Args:
        router_logits: [T, N + Z] contiguous float logits.
        spec: routing spec of the layer.
        selection_bias: [N + Z] selection-only bias (sigmoid families).

    Returns:
        ``(topk_ids [T, K] int64, topk_weights [T, K] float32, zero_mask [T, K] bool)``.
    """
    _check(router_logits, spec, selection_bias)
    tokens, top_k = router_logits.shape[0], spec.top_k
    device = router_logits.device
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=device)
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=device)
    zero = torch.empty(tokens, top_k, dtype=torch.int8, device=device)
    if tokens:
        _route_kernel[(tokens,)](
            router_logits,
            selection_bias if selection_bias is not None else router_logits,
            ids,
            weights,
            zero,
            float(spec.routed_scaling_factor),
            NUM_EXPERTS=spec.num_experts,
            NUM_ROWS=spec.num_rows,
            BLOCK=triton.next_power_of_2(spec.num_rows),
            TOP_K=top_k,
            SIGMOID=spec.score_func == "sigmoid",
            HAS_BIAS=selection_bias is not None,
            NORM=spec.norm_topk_prob,
            N_GROUP=spec.n_group,
            TOPK_GROUP=spec.topk_group,
            MASK_ZERO=spec.mask_zero_experts and spec.num_zero_experts > 0,
        )
    return ids, weights, zero.bool()


def route_reference(
    router_logits: torch.Tensor, spec: RoutingSpec, selection_bias: torch.Tensor | None = None
) -> RouteResult:
    """The torch reference of :func:`fused_route`: ``zeda_core.route`` with the same inputs and outputs."""
    _check(router_logits, spec, selection_bias)
    routing = route(router_logits, spec, selection_bias=selection_bias)
    return routing.topk_ids, routing.topk_weights, routing.zero_mask
