"""Zero-aware fused MoE: only real slots are computed, forward and backward.

1. :func:`~zeda_kernels.align.align_real_slots` groups the real slots by expert in blocks, once:
   the same alignment drives every GEMM of the forward and of the backward (ScatterMoE-style).
2. A grouped GEMM computes ``SiLU(x W_gate^T) * (x W_up^T)`` for every real slot.
3. A grouped GEMM computes ``h W_down^T`` and multiplies by the slot's routing weight.
4. The combine adds each slot's row to its token.

The backward runs the input gradients as the same grouped GEMM over transposed weights, and the
weight gradients as a grouped per-expert ``A^T B`` kernel over each expert's slots. No kernel runs
for zero slots, and an all-zero batch launches nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from zeda_core.experts import grouped_experts_forward
from zeda_kernels.align import SlotAlignment, align_real_slots
from zeda_kernels.checks import check_moe_inputs
from zeda_kernels.configs import GemmConfig, pick_config


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    pre_ptr,
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
    stride_bk,
    stride_cm,
    stride_pm,
    GATHER_TOKENS: tl.constexpr,
    SWIGLU: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    SCALE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[slot, n] = epilogue(sum_k A[row(slot), k] * B[expert, n, k]) for one block of real slots.

    With SWIGLU, B holds [gate; up] rows (2 * N_OUT of them) and the epilogue is SiLU(gate) * up;
    SAVE_PRE also stores the [gate, up] pre-activations in ``pre``. SCALE multiplies by the slot weight.
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
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SWIGLU:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_IN, BLOCK_K):
        k_mask = (offs_k + k0) < K_IN
        a = tl.load(a_ptrs + k0, mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs + k0 * stride_bk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee" if IEEE else "tf32")
        if SWIGLU:
            b_up = tl.load(
                b_ptrs + N_OUT * stride_bn + k0 * stride_bk, mask=k_mask[:, None] & n_mask[None, :], other=0.0
            )
            acc_up = tl.dot(a, b_up, acc_up, input_precision="ieee" if IEEE else "tf32")
    out_mask = valid[:, None] & n_mask[None, :]
    if SAVE_PRE:
        pre_ptrs = pre_ptr + slots[:, None] * stride_pm + offs_n[None, :]
        tl.store(pre_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
        tl.store(pre_ptrs + N_OUT, acc_up.to(pre_ptr.dtype.element_ty), mask=out_mask)
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    if SCALE:
        acc = acc * tl.load(slot_weight_ptr + slots, mask=valid, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + slots[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    sorted_slots_ptr,
    expert_block_start_ptr,
    token_of_slot_ptr,
    slot_weight_ptr,
    num_slots,
    M_OUT: tl.constexpr,
    N_OUT: tl.constexpr,
    stride_am,
    stride_bm,
    stride_ce,
    stride_cm,
    GATHER_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    SCALE_A: tl.constexpr,
    IEEE: tl.constexpr,
    SLOT_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[e, m, n] = sum over the real slots s of expert e of A[row_a(s), m] * B[row_b(s), n].

    A row is the slot's token (GATHER) or the slot itself; SCALE_A multiplies A's row by the slot
    weight. The slots of expert e are its blocks in ``sorted_slots`` (padding masked); an expert
    without slots gets an all-zero C[e].
    """
    expert = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    blocks_n = tl.cdiv(N_OUT, BLOCK_N)
    pid_m, pid_n = pid // blocks_n, pid % blocks_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M_OUT, offs_n < N_OUT
    start = tl.load(expert_block_start_ptr + expert) * SLOT_BLOCK
    end = tl.load(expert_block_start_ptr + expert + 1) * SLOT_BLOCK
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_K):
        offs_s = s0 + tl.arange(0, BLOCK_K)
        slots = tl.load(sorted_slots_ptr + offs_s, mask=offs_s < end, other=num_slots).to(tl.int64)
        valid = slots < num_slots
        tokens = tl.load(token_of_slot_ptr + slots, mask=valid, other=0).to(tl.int64)
        rows_a = tokens if GATHER_A else slots
        rows_b = tokens if GATHER_B else slots
        a = tl.load(
            a_ptr + rows_a[None, :] * stride_am + offs_m[:, None], mask=m_mask[:, None] & valid[None, :], other=0.0
        )
        if SCALE_A:
            weight = tl.load(slot_weight_ptr + slots, mask=valid, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * weight[None, :]).to(b_ptr.dtype.element_ty)
        b = tl.load(
            b_ptr + rows_b[:, None] * stride_bm + offs_n[None, :], mask=valid[:, None] & n_mask[None, :], other=0.0
        )
        acc = tl.dot(a, b, acc, input_precision="ieee" if IEEE else "tf32")
    c_ptrs = c_ptr + expert * stride_ce + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    alignment: SlotAlignment,
    config: GemmConfig,
    gather_tokens: bool,
    transpose_b: bool = False,
    swiglu: bool = False,
    slot_weight: torch.Tensor | None = None,
    pre: torch.Tensor | None = None,
) -> None:
    """``out`` [R, n] = epilogue(``a``[row] @ ``b``[expert]^T) per real slot.

    ``a``: [T or R, k] (rows are tokens when ``gather_tokens``, else slots); ``b``: [N, n, k]
    ([N, 2n, k] with ``swiglu``), or [N, k, n] with ``transpose_b``. ``slot_weight`` [R] scales the
    rows; ``pre`` [R, 2n] receives the SwiGLU pre-activations.
    """
    n_out = out.shape[1]
    stride_bn, stride_bk = (b.stride(2), b.stride(1)) if transpose_b else (b.stride(1), b.stride(2))
    grid = (alignment.num_blocks * triton.cdiv(n_out, config.block_n),)
    _grouped_gemm_kernel[grid](
        a,
        b,
        out,
        out if pre is None else pre,
        alignment.sorted_slots,
        alignment.block_expert,
        alignment.token_of_slot,
        out if slot_weight is None else slot_weight,
        alignment.num_slots,
        N_OUT=n_out,
        K_IN=a.shape[1],
        stride_am=a.stride(0),
        stride_be=b.stride(0),
        stride_bn=stride_bn,
        stride_bk=stride_bk,
        stride_cm=out.stride(0),
        stride_pm=0 if pre is None else pre.stride(0),
        GATHER_TOKENS=gather_tokens,
        SWIGLU=swiglu,
        SAVE_PRE=pre is not None,
        SCALE=slot_weight is not None,
        IEEE=a.dtype == torch.float32,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _grouped_wgrad(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    alignment: SlotAlignment,
    config: GemmConfig,
    gather_a: bool = False,
    gather_b: bool = False,
    slot_weight: torch.Tensor | None = None,
) -> None:
    """``out`` [N, m, n] = per expert, the sum over its real slots of ``a``[row]^T ``b``[row].

    ``a``: [T or R, m], ``b``: [T or R, n] (token rows when gathered, else slot rows);
    ``slot_weight`` [R] scales ``a``'s rows. Output tiles are ``block_n`` x ``block_k``, slots
    are reduced ``block_m`` at a time.
    """
    num_experts, m_out, n_out = out.shape
    grid = (num_experts, triton.cdiv(m_out, config.block_n) * triton.cdiv(n_out, config.block_k))
    _grouped_wgrad_kernel[grid](
        a,
        b,
        out,
        alignment.sorted_slots,
        alignment.expert_block_start,
        alignment.token_of_slot,
        out if slot_weight is None else slot_weight,
        alignment.num_slots,
        M_OUT=m_out,
        N_OUT=n_out,
        stride_am=a.stride(0),
        stride_bm=b.stride(0),
        stride_ce=out.stride(0),
        stride_cm=out.stride(1),
        GATHER_A=gather_a,
        GATHER_B=gather_b,
        SCALE_A=slot_weight is not None,
        IEEE=a.dtype == torch.float32,
        SLOT_BLOCK=alignment.block_m,
        BLOCK_M=config.block_n,
        BLOCK_N=config.block_k,
        BLOCK_K=config.block_m,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _swiglu_backward(pre: torch.Tensor, grad_activated: torch.Tensor) -> torch.Tensor:
    """[R, 2I] pre-activations [gate, up] and dL/d(SiLU(gate) * up) [R, I] (float32) -> dL/d[gate, up]."""
    gate, up = pre.float().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    grad_gate = grad_activated * up * sig * (1 + gate * (1 - sig))
    return torch.cat([grad_gate, grad_activated * gate * sig], dim=-1).to(pre.dtype)


class _ZeroAwareMoe(torch.autograd.Function):
    """The Triton MoE with its backward; one slot alignment feeds every GEMM of both passes."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        topk_weights: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        alignment: SlotAlignment,
        config: GemmConfig,
    ) -> torch.Tensor:
        training = any(ctx.needs_input_grad[:4])
        num_slots, inter = alignment.num_slots, down_proj.shape[2]
        slot_weight = topk_weights.flatten()[alignment.slot_position].float()
        activated = hidden.new_empty(num_slots, inter)
        pre = hidden.new_empty(num_slots, 2 * inter) if training else None
        _grouped_gemm(hidden, gate_up_proj, activated, alignment, config, gather_tokens=True, swiglu=True, pre=pre)
        expert_out = hidden.new_empty(num_slots, hidden.shape[1])
        _grouped_gemm(activated, down_proj, expert_out, alignment, config, gather_tokens=False, slot_weight=slot_weight)
        if training:
            ctx.save_for_backward(hidden, topk_weights, gate_up_proj, down_proj, slot_weight, activated, pre)
            ctx.alignment, ctx.config = alignment, config
        return torch.zeros_like(hidden).index_add_(0, alignment.token_of_slot.long(), expert_out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, topk_weights, gate_up_proj, down_proj, slot_weight, activated, pre = ctx.saved_tensors
        alignment, config = ctx.alignment, ctx.config
        need_hidden, need_weights, need_gate_up, need_down = ctx.needs_input_grad[:4]
        grad_out = grad_out.contiguous()
        grad_hidden = grad_weights = grad_gate_up = grad_down = None
        if need_down:
            grad_down = torch.empty_like(down_proj)
            _grouped_wgrad(grad_out, activated, grad_down, alignment, config, gather_a=True, slot_weight=slot_weight)
        if need_hidden or need_weights or need_gate_up:
            grad_unscaled = torch.empty_like(activated)  # dL/d(h W_down^T) before the routing weight, per slot
            _grouped_gemm(grad_out, down_proj, grad_unscaled, alignment, config, gather_tokens=True, transpose_b=True)
            grad_unscaled = grad_unscaled.float()
        if need_weights:
            slot_grad = (grad_unscaled * activated.float()).sum(dim=-1).to(topk_weights.dtype)
            grad_weights = torch.zeros_like(topk_weights).view(-1).index_copy_(0, alignment.slot_position, slot_grad)
            grad_weights = grad_weights.view_as(topk_weights)
        if need_hidden or need_gate_up:
            grad_pre = _swiglu_backward(pre, grad_unscaled * slot_weight[:, None])
        if need_gate_up:
            grad_gate_up = torch.empty_like(gate_up_proj)
            _grouped_wgrad(grad_pre, hidden, grad_gate_up, alignment, config, gather_b=True)
        if need_hidden:
            slot_grad_hidden = torch.empty(
                alignment.num_slots, hidden.shape[1], dtype=hidden.dtype, device=hidden.device
            )
            _grouped_gemm(
                grad_pre, gate_up_proj, slot_grad_hidden, alignment, config, gather_tokens=False, transpose_b=True
            )
            grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
            grad_hidden = grad_hidden.index_add_(0, alignment.token_of_slot.long(), slot_grad_hidden.float())
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weights, grad_gate_up, grad_down, None, None


def zero_aware_moe(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    zero_mask: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """SwiGLU MoE over the real slots only (Triton), differentiable.

    Args:
        hidden: [T, H] activations (bf16, fp16 or fp32).
        topk_ids: [T, K] expert ids; zero slots' ids are ignored.
        topk_weights: [T, K] routing weights.
        zero_mask: [T, K] bool, True for zero slots.
        gate_up_proj: [N, 2I, H], gate rows first; same dtype as ``hidden``.
        down_proj: [N, H, I].
        config: launch configuration; default: tuned for the shape, else the fallback rule.

    Returns:
        [T, H] in the dtype of ``hidden``. Under autograd, gradients flow to ``hidden``,
        ``topk_weights``, ``gate_up_proj`` and ``down_proj`` (zero slots get a zero weight
        gradient). An all-zero batch returns zeros that do not depend on the inputs.
    """
    check_moe_inputs(hidden, topk_ids, topk_weights, zero_mask, gate_up_proj, down_proj)
    num_experts, double_inter, hidden_size = gate_up_proj.shape
    real = int((~zero_mask).sum())
    if real == 0:
        return torch.zeros_like(hidden)
    config = config or pick_config(
        hidden.device, num_experts, hidden_size, double_inter // 2, hidden.dtype, hidden.shape[0], real
    )
    alignment = align_real_slots(topk_ids, zero_mask, num_experts, config.block_m)
    return _ZeroAwareMoe.apply(hidden, topk_weights, gate_up_proj, down_proj, alignment, config)


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
