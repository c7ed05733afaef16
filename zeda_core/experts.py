"""Grouped SwiGLU expert computation that never touches a zero slot.

This is the torch reference of the fused MoE kernel and the CPU fast path: real slots are
sorted by expert, each expert runs one GEMM pair over exactly its tokens, and zero slots are
dropped before any GEMM. The gather, the activation, the routing weights and the combine run
once over all real slots. A batch whose slots are all zero performs no matrix multiply.

It is also the ``torch`` MoE backend (:data:`torch_experts`); :class:`MoeExpertsBackend` is the
interface every backend (``zeda_core.moe_backends``) implements.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation

from zeda_core.routing import Routing


def grouped_experts_forward(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    zero_mask: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor] = F.silu,
) -> torch.Tensor:
    """Weighted sum over each token's real expert slots.

    Args:
        hidden_states: [T, H] token activations.
        topk_ids: [T, K] expert ids; ids of zero slots are ignored.
        topk_weights: [T, K] combine weights (float32 or the activation dtype).
        zero_mask: [T, K] bool, True for zero slots (never computed).
        gate_up_proj: [N, 2I, H] fused gate and up projections (gate rows first).
        down_proj: [N, H, I] down projections.
        act_fn: gate activation (SiLU for SwiGLU).

    Returns:
        [T, H] in the dtype of ``hidden_states``; rows of all-zero tokens are exactly 0.
    """
    out = torch.zeros_like(hidden_states)
    real_slots = (~zero_mask).nonzero()
    if real_slots.numel() == 0:
        return out
    token_idx, slot_idx = real_slots[:, 0], real_slots[:, 1]
    expert_ids = topk_ids[token_idx, slot_idx]
    order = torch.argsort(expert_ids, stable=True)
    token_idx, slot_idx = token_idx[order], slot_idx[order]
    counts = torch.bincount(expert_ids, minlength=gate_up_proj.shape[0]).tolist()
    gate, up = _per_expert_linear(hidden_states[token_idx], gate_up_proj, counts).chunk(2, dim=-1)
    expert_out = _per_expert_linear(act_fn(gate) * up, down_proj, counts)
    expert_out = expert_out * topk_weights[token_idx, slot_idx, None]
    return out.index_add_(0, token_idx, expert_out.to(out.dtype))


def _per_expert_linear(rows: torch.Tensor, weights: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """[R, in] rows grouped by expert (``counts[e]`` rows for expert e) -> [R, out].

    Each group is multiplied by its expert's ``weights[e]`` ([E, out, in]); experts without
    rows run nothing. Everything around the GEMMs runs once over all rows, not once per expert.
    """
    parts = [F.linear(group, weights[expert]) for expert, group in enumerate(rows.split(counts)) if group.shape[0]]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


ActFn = Callable[[torch.Tensor], torch.Tensor]


def is_silu(act_fn: ActFn) -> bool:
    """Whether ``act_fn`` is SiLU (the gate activation of SwiGLU experts)."""
    return act_fn is F.silu or isinstance(act_fn, nn.SiLU | SiLUActivation)


class MoeExpertsBackend(Protocol):
    """How a MoE layer's routed experts are computed; the layer holds the weights and calls it with keywords.

    Backends are picked by name (``zeda_core.moe_backends``); ``name`` is the one they are registered as.
    """

    name: str

    def check(self, device: torch.device, act_fn: ActFn) -> None:
        """Raise :class:`~zeda_core.errors.ZedaError` where experts with ``act_fn`` on ``device`` cannot run."""

    def __call__(self, *, hidden_states: torch.Tensor, routing: Routing, experts: nn.Module) -> torch.Tensor:
        """The routed experts' output of T tokens (keyword arguments only).

        Args:
            hidden_states: [T, H] activations.
            routing: the T tokens' slots (``topk_ids``, ``topk_weights``, ``zero_mask``: [T, K]),
                computed once by the layer's router.
            experts: the layer's experts module: ``gate_up_proj`` [N, 2I, H], ``down_proj`` [N, H, I], ``act_fn``.

        Returns:
            [T, H] in the dtype of ``hidden_states``.
        """


class TorchExperts:
    """The ``torch`` backend: :func:`grouped_experts_forward` (any device, any activation, autograd)."""

    name = "torch"

    def check(self, device: torch.device, act_fn: ActFn) -> None:
        """Runs everywhere."""

    def __call__(self, *, hidden_states: torch.Tensor, routing: Routing, experts: nn.Module) -> torch.Tensor:
        """[T, H] -> [T, H], see :class:`MoeExpertsBackend`."""
        return grouped_experts_forward(
            hidden_states,
            routing.topk_ids,
            routing.topk_weights,
            routing.zero_mask,
            experts.gate_up_proj,
            experts.down_proj,
            experts.act_fn,
        )


torch_experts = TorchExperts()
