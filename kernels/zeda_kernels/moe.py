"""Zero-aware fused MoE: only real slots are computed.

1. :func:`~zeda_kernels.align.align_real_slots` groups the real slots by expert in blocks.
2. A grouped GEMM computes ``SiLU(x W_gate^T) * (x W_up^T)`` for every real slot.
3. A grouped GEMM computes ``h W_down^T`` and multiplies by the slot's routing weight.
4. The combine adds each slot's row to its token.

No kernel runs for zero slots, and an all-zero batch launches nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from zeda_core.experts import grouped_experts_forward
from zeda_kernels.align import align_real_slots
from zeda_kernels.checks import check_moe_inputs
from zeda_kernels.configs import GemmConfig, pick_config


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    sorted_slots_ptr,
    block_expert_ptr,
    token_of_slot_ptr,
    slot_weight_ptr,
    num_slots,
    N_OUT: tl.constexpr,
    K_IN: tl.constexpr,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    GATHER_TOKENS: tl.constexpr,
    SWIGLU: tl.constexpr,
    SCALE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[slot, n] = epilogue(sum_k A[row(slot), k] * B[expert, n, k]) for one block of real slots.

    With SWIGLU, B holds [gate; up] rows (2 * N_OUT of them) and the epilogue is SiLU(gate) * up.
    """
    pid = tl.program_id(0)
    blocks_n = tl.cdiv(N_OUT, BLOCK_N)
    pid_m, pid_n = pid // blocks_n, pid % blocks_n
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    slots = tl.load(sorted_slots_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = slots < num_slots
    rows = tl.load(token_of_slot_ptr + slots, mask=valid, other=0).to(tl.int64) if GATHER_TOKENS else slots
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N_OUT
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SWIGLU:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_IN, BLOCK_K):
        k_mask = (offs_k + k0) < K_IN
        a = tl.load(a_ptrs + k0, mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee" if IEEE else "tf32")
        if SWIGLU:
            b_up = tl.load(b_ptrs + N_OUT * stride_bn + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision="ieee" if IEEE else "tf32")
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    if SCALE:
        acc = acc * tl.load(slot_weight_ptr + slots, mask=valid, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + slots[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


def _grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    alignment,
    slot_weight: torch.Tensor,
    n_out: int,
    gather_tokens: bool,
    swiglu: bool,
    config: GemmConfig,
) -> None:
    grid = (alignment.num_blocks * triton.cdiv(n_out, config.block_n),)
    _grouped_gemm_kernel[grid](
        a,
        b,
        out,
        alignment.sorted_slots,
        alignment.block_expert,
        alignment.token_of_slot,
        slot_weight,
        alignment.num_slots,
        N_OUT=n_out,
        K_IN=a.shape[1],
        stride_am=a.stride(0),
        stride_be=b.stride(0),
        stride_bn=b.stride(1),
        stride_cm=out.stride(0),
        GATHER_TOKENS=gather_tokens,
        SWIGLU=swiglu,
        SCALE=not swiglu,
        IEEE=a.dtype == torch.float32,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def zero_aware_moe(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    zero_mask: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """SwiGLU MoE over the real slots only (Triton).

    Args:
        hidden: [T, H] activations (bf16, fp16 or fp32).
        topk_ids: [T, K] expert ids; zero slots' ids are ignored.
        topk_weights: [T, K] routing weights.
        zero_mask: [T, K] bool, True for zero slots.
        gate_up_proj: [N, 2I, H], gate rows first; same dtype as ``hidden``.
        down_proj: [N, H, I].
        config: launch configuration; default: tuned for the shape, else the fallback rule.

    Returns:
        [T, H] in the dtype of ``hidden``.
    """
    check_moe_inputs(hidden, topk_ids, topk_weights, zero_mask, gate_up_proj, down_proj)
    num_experts, double_inter, hidden_size = gate_up_proj.shape
    inter = double_inter // 2
    out = torch.zeros_like(hidden)
    real = int((~zero_mask).sum())
    if real == 0:
        return out
    config = config or pick_config(hidden.device, num_experts, hidden_size, inter, hidden.dtype, hidden.shape[0], real)
    alignment = align_real_slots(topk_ids, zero_mask, num_experts, config.block_m)
    slot_weight = topk_weights.flatten()[alignment.slot_position].float().contiguous()
    activated = torch.empty(real, inter, dtype=hidden.dtype, device=hidden.device)
    _grouped_gemm(hidden, gate_up_proj, activated, alignment, slot_weight, inter, True, True, config)
    expert_out = torch.empty(real, hidden_size, dtype=hidden.dtype, device=hidden.device)
    _grouped_gemm(activated, down_proj, expert_out, alignment, slot_weight, hidden_size, False, False, config)
    return out.index_add_(0, alignment.token_of_slot.long(), expert_out)


def moe_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    zero_mask: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Torch reference of :func:`zero_aware_moe` (same inputs; ``config`` is ignored)."""
    check_moe_inputs(hidden, topk_ids, topk_weights, zero_mask, gate_up_proj, down_proj)
    return grouped_experts_forward(hidden, topk_ids, topk_weights, zero_mask, gate_up_proj, down_proj, F.silu)
