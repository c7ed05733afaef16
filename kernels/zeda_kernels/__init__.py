"""Triton kernels that skip zero-expert slots, each with a torch reference of the same API.

- :func:`fused_route`: softmax or sigmoid scoring, selection bias, group limit, top-k over real
  and zero rows, normalisation with the zero slots' weight dropped, routed scaling, zero mask.
- :func:`align_real_slots`: compaction of the real slots into per-expert blocks; zero slots
  never reach a GEMM and an all-zero batch launches none.
- :func:`zero_aware_moe`: grouped GEMM (gate_up) with a fused SiLU(gate)*up, grouped GEMM
  (down) with the routing weight fused, then the combine.

The Triton path runs on CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``); the references
are the CPU default. :func:`use_triton_experts` makes every zero-aware MoE block use the kernel
for inference.
"""

from zeda_kernels.align import SlotAlignment, align_real_slots
from zeda_kernels.backend import triton_experts, use_triton_experts
from zeda_kernels.moe import moe_reference, zero_aware_moe
from zeda_kernels.routing import fused_route, route_reference

__all__ = [
    "SlotAlignment",
    "align_real_slots",
    "fused_route",
    "moe_reference",
    "route_reference",
    "triton_experts",
    "use_triton_experts",
    "zero_aware_moe",
]
