"""Grouped SwiGLU expert computation that never touches a zero slot.

This is the torch reference of the fused MoE kernel and the CPU fast path: real slots are
sorted by expert, each expert runs one GEMM pair over exactly its tokens, and zero slots are
dropped before any GEMM. The gather, the activation, the routing weights and the combine run
once over all real slots. A batch whose slots are all zero performs no matrix multiply.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


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


ExpertsFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Callable], torch.Tensor
]
_backend: ExpertsFn = grouped_experts_forward


def set_experts_backend(backend: ExpertsFn | None) -> None:
    """Route every zero-aware MoE block's expert computation through ``backend``.

    It takes the arguments of :func:`grouped_experts_forward`; ``None`` restores that torch path.
    ``zeda_kernels.use_triton_experts()`` installs the Triton kernels this way, keeping
    ``zeda_core`` free of any kernel import.
    """
    global _backend
    _backend = backend or grouped_experts_forward


def experts_forward(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    zero_mask: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor] = F.silu,
) -> torch.Tensor:
    """The installed experts backend (default :func:`grouped_experts_forward`); same arguments."""
    return _backend(hidden_states, topk_ids, topk_weights, zero_mask, gate_up_proj, down_proj, act_fn)
