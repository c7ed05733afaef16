"""Install the Triton MoE kernel as the experts backend of every zero-aware MoE block.

The kernel has no backward pass, so it serves inference only: while autograd records (training),
and for activations other than SiLU, the torch reference runs instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from zeda_core.experts import grouped_experts_forward, set_experts_backend
from zeda_kernels.moe import zero_aware_moe


def triton_experts(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    zero_mask: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor] = F.silu,
) -> torch.Tensor:
    """Experts backend: the Triton kernel where it applies, else the torch reference."""
    runnable = hidden_states.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    recording = torch.is_grad_enabled() and (hidden_states.requires_grad or gate_up_proj.requires_grad)
    silu = act_fn is F.silu or isinstance(act_fn, torch.nn.SiLU)
    if runnable and silu and not recording:
        return zero_aware_moe(
            hidden_states.contiguous(),
            topk_ids.contiguous(),
            topk_weights.contiguous(),
            zero_mask.contiguous(),
            gate_up_proj,
            down_proj,
        )
    return grouped_experts_forward(hidden_states, topk_ids, topk_weights, zero_mask, gate_up_proj, down_proj, act_fn)


def use_triton_experts(enabled: bool = True) -> None:
    """Make zero-aware MoE blocks run their experts with the Triton kernel (``False`` restores torch)."""
    set_experts_backend(triton_experts if enabled else None)
