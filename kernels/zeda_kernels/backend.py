"""The ``triton`` MoE backend (``zeda_core.moe_backends`` imports it on first use).

It runs :func:`~zeda_kernels.moe.zero_aware_moe`, forward and backward, so both serving and
training use the kernel. It refuses, rather than silently falls back, where the kernel cannot run.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from zeda_core.errors import ZedaError
from zeda_core.experts import ActFn, is_silu
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

    def __call__(
        self,
        *,
        hidden_states: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        zero_mask: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        act_fn: ActFn = F.silu,
    ) -> torch.Tensor:
        """[T, H] -> [T, H], see :func:`~zeda_core.experts.grouped_experts_forward` (checked first)."""
        self.check(hidden_states.device, act_fn)
        return zero_aware_moe(
            hidden_states.contiguous(),
            topk_ids.contiguous(),
            topk_weights.contiguous(),
            zero_mask.contiguous(),
            gate_up_proj,
            down_proj,
        )


triton_experts = TritonExperts()
