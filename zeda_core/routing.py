"""``route``: the one routing rule shared by the trainer, the engines, the SGLang plugin and the kernels.

Zero slots keep their share of the normalised weight, and that share is dropped: real experts
are not renormalised among themselves ("dilution"). With ``Z = 0`` the result equals the
family's own Hugging Face router.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zeda_core.errors import ZedaError
from zeda_core.spec import RoutingSpec

ZERO_EXPERT_BIAS_LIMIT = 100.0  # |compute dial| a request, a tier or an evaluation may ask for, in logits


@dataclass(frozen=True)
class Routing:
    """Routing of T tokens into K slots each.

    Attributes:
        topk_ids: [T, K] int64 in ``[0, N + Z)``; a zero slot has an id ``>= N``.
        topk_weights: [T, K] float32 combine weights; 0 on zero slots.
        zero_mask: [T, K] bool, True where the slot went to a zero expert.
        probs: [T, N + Z] float32 routing probabilities used by the group loss
            (softmax, or sum-normalised sigmoid without the selection bias).
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    zero_mask: torch.Tensor
    probs: torch.Tensor


def route(
    router_logits: torch.Tensor,
    spec: RoutingSpec,
    selection_bias: torch.Tensor | None = None,
    forced_ids: torch.Tensor | None = None,
    zero_offset: torch.Tensor | None = None,
) -> Routing:
    """Route tokens over real and zero experts.

    Args:
        router_logits: [T, N + Z] router logits (any float dtype; computed in float32).
        spec: the layer's routing spec.
        selection_bias: [N + Z] bias added to sigmoid scores for selection only
            (``e_score_correction_bias``); required iff ``spec.selection_bias``.
        forced_ids: [T, K] expert ids to use instead of top-k (routing replay); weights are
            computed from the current logits for those ids exactly as for a fresh selection.
        zero_offset: [T] float32 offset (logits) added to each token's zero-expert columns: the
            compute dial. Softmax families add it to the zero logits (so it also moves the
            softmax mass); sigmoid families add it to the zero columns' selection score only.
            Negative values send fewer slots to zero experts, positive ones more; None is 0.

    Returns:
        The :class:`Routing` of the T tokens.
    """
    if router_logits.dim() != 2 or router_logits.shape[-1] != spec.num_rows:
        raise ZedaError(
            f"router_logits must be [T, {spec.num_rows}] (N={spec.num_experts} + Z={spec.num_zero_experts}), "
            f"got {list(router_logits.shape)}"
        )
    if spec.selection_bias != (selection_bias is not None):
        raise ZedaError("selection_bias must be given exactly when spec.selection_bias is set")
    masked = spec.mask_zero_experts and spec.num_zero_experts > 0
    logits = router_logits.float()
    if masked:
        logits = _mask_zero_columns(logits, spec)
    dialled = zero_offset is not None and spec.num_zero_experts > 0 and not masked
    if dialled and zero_offset.shape != (router_logits.shape[0],):
        raise ZedaError(f"zero_offset must be [{router_logits.shape[0]}], got {list(zero_offset.shape)}")

    if spec.score_func == "softmax":
        if dialled:
            logits = add_to_zero_columns(logits, zero_offset[:, None], spec.num_experts)
        scores = torch.softmax(logits, dim=-1)
        probs = scores
        choice = scores
    else:
        scores = logits.sigmoid()
        probs = scores / scores.sum(dim=-1, keepdim=True)
        choice = scores + selection_bias.float() if selection_bias is not None else scores
        choice = _limit_groups(choice, spec)
        if dialled:
            choice = add_to_zero_columns(choice, zero_offset[:, None], spec.num_experts)
        if masked:
            choice = _mask_zero_columns(choice, spec)

    if forced_ids is None:
        topk_ids = torch.topk(choice, spec.top_k, dim=-1, sorted=spec.topk_sorted)[1]
    else:
        topk_ids = _check_forced_ids(forced_ids, router_logits.shape[0], spec)
    weights = scores.gather(1, topk_ids)
    if spec.norm_topk_prob:
        denominator = weights.sum(dim=-1, keepdim=True)
        weights = weights / (denominator + 1e-20 if spec.score_func == "sigmoid" else denominator)
    weights = weights * spec.routed_scaling_factor
    zero_mask = topk_ids >= spec.num_experts
    weights = weights.masked_fill(zero_mask, 0.0)
    return Routing(topk_ids=topk_ids, topk_weights=weights, zero_mask=zero_mask, probs=probs)


def add_to_zero_columns(values: torch.Tensor, offset: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, N + Z] -> same, with ``offset`` added to the zero columns (those from ``num_experts`` on).

    ``offset`` is [T, 1] (one value per token: the compute dial) or [Z] (one per zero row: a
    router's ``zero_logit_bias``); it is cast to ``values``' dtype.
    """
    n = num_experts
    return torch.cat([values[:, :n], values[:, n:] + offset.to(values)], dim=-1)


def _mask_zero_columns(values: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """[T, N + Z] -> same, with the zero columns at -inf (``use_zce_mask``: the static model)."""
    return values.index_fill(1, torch.arange(spec.num_experts, spec.num_rows, device=values.device), float("-inf"))


def _limit_groups(choice: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """DeepSeek-V3 group-limited selection over the real columns; zero columns stay eligible.

    ``choice`` is [T, N + Z]; real experts form ``n_group`` equal groups scored by the sum of
    their two best choice scores, and only the ``topk_group`` best groups stay selectable.
    """
    if spec.n_group == 1:
        return choice
    n, tokens = spec.num_experts, choice.shape[0]
    real = choice[:, :n]
    group_scores = real.view(tokens, spec.n_group, n // spec.n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, spec.n_group, n // spec.n_group).reshape(tokens, n)
    real = real.masked_fill(~score_mask.bool(), float("-inf"))
    return torch.cat([real, choice[:, n:]], dim=-1)


def _check_forced_ids(forced_ids: torch.Tensor, tokens: int, spec: RoutingSpec) -> torch.Tensor:
    if forced_ids.shape != (tokens, spec.top_k):
        raise ZedaError(f"forced_ids must be [{tokens}, {spec.top_k}], got {list(forced_ids.shape)}")
    if forced_ids.numel() and (forced_ids.min() < 0 or forced_ids.max() >= spec.num_rows):
        raise ZedaError(f"forced_ids must lie in [0, {spec.num_rows})")
    return forced_ids.long()
