"""Triton kernels that skip zero-expert slots, each with a torch reference of the same API.

- :func:`fused_route`: softmax or sigmoid scoring, selection bias, group limit, top-k over real
  and zero rows, normalisation with the zero slots' weight dropped, routed scaling, zero mask.
- :func:`align_real_slots`: compaction of the real slots into per-expert blocks; zero slots
  never reach a GEMM and an all-zero batch launches none.
- :func:`zero_aware_moe`: grouped GEMM (gate_up) with a fused SiLU(gate)*up, grouped GEMM
  (down) with the routing weight fused, then the combine; differentiable (grouped GEMMs over
  transposed weights for the input gradients, grouped per-expert GEMMs for the weight gradients).

The Triton path runs on CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``); the references
are the CPU default. :data:`triton_experts` is the ``triton`` MoE backend of
``zeda_core.moe_backends`` (``set_moe_backend(model, "triton")``, ``load_model(..., moe_backend=...)``).
"""

from zeda_kernels.align import SlotAlignment, align_real_slots
from zeda_kernels.backend import TritonExperts, triton_experts
from zeda_kernels.moe import moe_reference, zero_aware_moe
from zeda_kernels.routing import fused_route, route_reference

__all__ = [
    "SlotAlignment",
    "TritonExperts",
    "align_real_slots",
    "fused_route",
    "moe_reference",
    "route_reference",
    "triton_experts",
    "zero_aware_moe",
]
