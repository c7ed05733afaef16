"""The ``triton`` MoE backend (``zeda_core.moe_backends`` imports it on first use).

It runs :func:`~zeda_kernels.moe.zero_aware_moe`, forward and backward, so both serving and
training use the kernel. It refuses, rather than silently falls back, where the kernel cannot run.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from zeda_core.errors import ZedaError
from zeda_core.experts import ActFn, is_silu
from zeda_core.routing import Routing
from zeda_kernels.moe import zero_aware_moe


class TritonExperts:
    """The ``triton`` backend: the zero-aware Triton kernel, for SwiGLU experts."""

    name = "triton"

    def check(self, device: torch.device, act_fn: ActFn) -> None:
        """Raise unless ``device`` is CUDA (or the interpreter is on) and ``act_fn`` is SiLU.

        Raises:
            ZedaError: the kernel cannot run there, or computes another activation.
        """
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ZedaError(
                f"MoE backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 on CPU), got {device.type}; "
                "use 'auto' or 'torch'"
            )
        if not is_silu(act_fn):
            raise ZedaError(
                f"MoE backend 'triton' computes SwiGLU (SiLU) experts only, not {type(act_fn).__name__}; "
                "use 'auto' or 'torch'"
            )

    def __call__(self, *, hidden_states: torch.Tensor, routing: Routing, experts: nn.Module) -> torch.Tensor:
        """[T, H] -> [T, H], see :class:`~zeda_core.experts.MoeExpertsBackend` (checked first)."""
        self.check(hidden_states.device, experts.act_fn)
        return zero_aware_moe(
            hidden_states.contiguous(),
            routing.topk_ids.contiguous(),
            routing.topk_weights.contiguous(),
            routing.zero_mask.contiguous(),
            experts.gate_up_proj,
            experts.down_proj,
        )


triton_experts = TritonExperts()
