"""Training-free dynamic-MoE baselines as routing rules over the same :class:`Routing` and FLOP accounting.

A skipped slot is a zero slot: ``zero_mask`` True, weight 0, never computed by the experts and
counted as saved by the recorder, exactly like a ZEDA zero expert. Both rules keep K slots per
token, so the FLOP figures of every method come from the same code.

- **Dynamic Skipping** (Lu et al., 2024): slot j of a token is skipped when its weight is below
  ``beta`` times the token's top weight; ``beta`` per layer is a quantile (the median in the
  paper) of the ratios ``w_j / w_top`` on calibration data. The top slot is never skipped.
- **Top-P routing** (Huang et al., 2024): experts in probability order until their
  cumulative probability reaches ``p``, at most K of them.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from torch import nn

from zeda_core.errors import ZedaError
from zeda_core.model_queries import moe_blocks
from zeda_core.moe import ZeroExpertRouter
from zeda_core.routing import Routing, route
from zeda_core.spec import RoutingSpec

RoutingRule = Callable[[torch.Tensor, Routing], Routing]
"""(router logits [T, N + Z], the layer's own routing of them) -> the routing to use."""


def dynamic_skip(routing: Routing, beta: float) -> Routing:
    """Skip the slots whose weight is below ``beta`` times the token's top weight.

    Args:
        routing: [T, K] routing of a layer.
        beta: threshold in [0, 1]; 0 skips nothing.

    Returns:
        The same ids; skipped slots get ``zero_mask`` True and weight 0 (weights are not renormalised).
    """
    if not 0.0 <= beta <= 1.0:
        raise ZedaError(f"dynamic-skip beta must lie in [0, 1], got {beta}")
    top = routing.topk_weights.max(dim=-1, keepdim=True).values
    zero_mask = routing.zero_mask | (routing.topk_weights < beta * top)
    return Routing(routing.topk_ids, routing.topk_weights.masked_fill(zero_mask, 0.0), zero_mask, routing.probs)


def weight_ratios(routing: Routing) -> torch.Tensor:
    """[M] ratios ``w_j / w_top`` of every non-top real slot: the calibration sample of ``beta``."""
    weights = routing.topk_weights.masked_fill(routing.zero_mask, 0.0)
    top, top_slot = weights.max(dim=-1, keepdim=True)
    others = torch.ones_like(routing.zero_mask).scatter(1, top_slot, False) & ~routing.zero_mask
    return (weights / top.clamp(min=1e-20))[others]


def top_p_routing(router_logits: torch.Tensor, spec: RoutingSpec, p: float) -> Routing:
    """Experts in probability order until their cumulative probability reaches ``p`` (at most K).

    Args:
        router_logits: [T, N] logits of a softmax router without zero experts.
        spec: the layer's spec (``top_k`` caps the experts taken).
        p: cumulative-probability threshold in (0, 1]; 1 takes all K.

    Returns:
        [T, K] slots in probability order; slots past the threshold are zero slots. Weights are
        the probabilities, renormalised over the taken experts when ``spec.norm_topk_prob``.
    """
    if spec.score_func != "softmax" or spec.num_zero_experts:
        raise ZedaError("top-p routing applies to softmax routers without zero experts")
    if not 0.0 < p <= 1.0:
        raise ZedaError(f"top-p threshold must lie in (0, 1], got {p}")
    probs = torch.softmax(router_logits.float(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    taken_probs, ids = sorted_probs[:, : spec.top_k], order[:, : spec.top_k]
    mass_before = taken_probs.cumsum(dim=-1) - taken_probs
    zero_mask = mass_before >= p
    weights = taken_probs.masked_fill(zero_mask, 0.0)
    if spec.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(ids, weights * spec.routed_scaling_factor, zero_mask, probs)


class RuledRouter(nn.Module):
    """A layer's router with a :data:`RoutingRule` applied to its routing."""

    def __init__(self, router: ZeroExpertRouter, rule: RoutingRule) -> None:
        super().__init__()
        self.router, self.rule, self.spec = router, rule, router.spec

    def forward(
        self,
        hidden_states: torch.Tensor,
        forced_ids: torch.Tensor | None = None,
        zero_offset: torch.Tensor | None = None,
    ) -> Routing:
        """[T, H] -> the rule's :class:`Routing`; the arguments are :meth:`ZeroExpertRouter.forward`'s."""
        logits = self.router.logits(hidden_states)
        bias = self.router.e_score_correction_bias if self.spec.selection_bias else None
        routing = route(logits, self.spec, selection_bias=bias, forced_ids=forced_ids, zero_offset=zero_offset)
        return self.rule(logits, routing)


@contextlib.contextmanager
def routing_rule(model: nn.Module, rule_for_layer: Callable[[int], RoutingRule]) -> Iterator[nn.Module]:
    """Route every MoE layer of ``model`` through ``rule_for_layer(layer_idx)`` inside the block."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ZedaError("the model has no zero-aware MoE blocks: load it with zeda_core.load_model")
    routers = [block.gate for block in blocks]
    try:
        for block, router in zip(blocks, routers, strict=True):
            block.gate = RuledRouter(router, rule_for_layer(block.layer_idx))
        yield model
    finally:
        for block, router in zip(blocks, routers, strict=True):
            block.gate = router


def calibrate_dynamic_skip(model: nn.Module, batches: list[torch.Tensor], quantile: float = 0.5) -> dict[int, float]:
    """Per-layer ``beta``: the ``quantile`` of ``w_j / w_top`` over the tokens of ``batches``.

    Args:
        model: a zero-aware model (``zeda_core.load_model``).
        batches: [B, S] token-id tensors without padding (every position counts).
        quantile: 0.5 is the paper's median; higher skips more.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ZedaError(f"calibration quantile must lie in [0, 1], got {quantile}")
    ratios: dict[int, list[torch.Tensor]] = defaultdict(list)

    def collect(layer_idx: int) -> RoutingRule:
        def rule(_: torch.Tensor, routing: Routing) -> Routing:
            ratios[layer_idx].append(weight_ratios(routing).cpu())
            return routing

        return rule

    with torch.no_grad(), routing_rule(model, collect):
        for batch in batches:
            model(input_ids=batch.to(next(model.parameters()).device))
    betas = {}
    for layer, values in sorted(ratios.items()):
        ordered = torch.cat(values).sort().values
        betas[layer] = float(ordered[round(quantile * (ordered.numel() - 1))]) if ordered.numel() else 0.0
    return betas
