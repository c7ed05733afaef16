"""Compaction of real slots into per-expert blocks of ``block_m`` rows.

Real slots get compact ids ``0..R-1`` (token-major order). They are grouped by expert, and each
expert's group is padded to a multiple of ``block_m`` with the sentinel ``R``. Zero slots get no
compact id at all, so no GEMM block is ever launched for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SlotAlignment:
    """Real slots arranged for a grouped GEMM.

    Attributes:
        token_of_slot: [R] int32, the token of each real slot.
        slot_position: [R] int64, the flat index ``t * K + k`` of each real slot.
        sorted_slots: [B * block_m] int32 compact slot ids grouped by expert; padding = R.
        block_expert: [B] int32, the expert of each block.
        expert_block_start: [N + 1] int32, expert e owns blocks ``expert_block_start[e]`` up to
            ``expert_block_start[e + 1]`` (equal for an expert without slots).
        block_m: rows per block.
    """

    token_of_slot: torch.Tensor
    slot_position: torch.Tensor
    sorted_slots: torch.Tensor
    block_expert: torch.Tensor
    expert_block_start: torch.Tensor
    block_m: int

    @property
    def num_slots(self) -> int:
        return int(self.token_of_slot.numel())

    @property
    def num_blocks(self) -> int:
        return int(self.block_expert.numel())


def align_real_slots(topk_ids: torch.Tensor, zero_mask: torch.Tensor, num_experts: int, block_m: int) -> SlotAlignment:
    """Group the real slots of ``topk_ids`` [T, K] (``zero_mask`` [T, K]) by expert in blocks."""
    top_k = topk_ids.shape[1]
    device = topk_ids.device
    slot_position = (~zero_mask).flatten().nonzero().squeeze(1)
    experts = topk_ids.flatten()[slot_position].long()
    num_slots = slot_position.numel()
    counts = torch.bincount(experts, minlength=num_experts)
    blocks_per_expert = (counts + block_m - 1) // block_m
    block_expert = torch.repeat_interleave(torch.arange(num_experts, device=device), blocks_per_expert)
    order = torch.argsort(experts, stable=True)
    expert_start = torch.cumsum(counts, 0) - counts
    block_end = torch.cumsum(blocks_per_expert, 0)
    padded_start = (block_end - blocks_per_expert) * block_m
    sorted_experts = experts[order]
    rank = torch.arange(num_slots, device=device) - expert_start[sorted_experts]
    sorted_slots = torch.full((block_expert.numel() * block_m,), num_slots, dtype=torch.int32, device=device)
    sorted_slots[padded_start[sorted_experts] + rank] = order.to(torch.int32)
    return SlotAlignment(
        token_of_slot=(slot_position // top_k).to(torch.int32),
        slot_position=slot_position,
        sorted_slots=sorted_slots,
        block_expert=block_expert.to(torch.int32),
        expert_block_start=torch.cat([block_end.new_zeros(1), block_end]).to(torch.int32),
        block_m=block_m,
    )
