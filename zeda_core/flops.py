"""Expert-FLOP accounting: per routed slot, per token, per layer and per request.

A multiply-add counts as 2 FLOPs. One routed SwiGLU slot costs ``2 * 3 * H * I`` (gate, up and
down projections). Zero slots cost nothing; the static model would have computed all K slots of
every token, which is the ``dense`` figure. Shared experts, attention, dense MLP layers and the
LM head are accounted separately so that "expert FLOPs saved" and "total FLOPs saved" are both
honest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zeda_core.errors import ZedaError
from zeda_core.model_queries import moe_blocks


def expert_slot_flops(hidden_size: int, intermediate_size: int) -> int:
    """FLOPs of one routed SwiGLU slot: ``2 * 3 * H * I``."""
    return 2 * 3 * hidden_size * intermediate_size


def _linear_flops(module: nn.Module) -> int:
    """2 x the weights of every ``nn.Linear`` in ``module``: its FLOPs per token."""
    return sum(2 * m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class FlopModel:
    """Per-token FLOPs of the parts of one model.

    Attributes:
        slot_flops: one routed slot.
        top_k: K slots per token per MoE layer.
        moe_layers: number of MoE layers.
        shared_flops_per_token: shared experts (and their gates) over all MoE layers.
        other_flops_per_token: attention projections, dense MLP layers and the LM head.
        attention_flops_per_context_token: QK^T and AV products per attended position, all layers.
    """

    slot_flops: int
    top_k: int
    moe_layers: int
    shared_flops_per_token: int
    other_flops_per_token: int
    attention_flops_per_context_token: int

    @classmethod
    def from_model(cls, model: nn.Module) -> FlopModel:
        """Read the figures off a model with zero-aware MoE blocks."""
        blocks = moe_blocks(model)
        if not blocks:
            raise ZedaError("model has no zero-aware MoE block; load it with zeda_core.load_model")
        _, double_inter, hidden = blocks[0].experts.gate_up_proj.shape
        shared = 0
        for block in blocks:
            if block.shared_name is not None:
                shared += _linear_flops(getattr(block, block.shared_name))
                if hasattr(block, "shared_expert_gate"):
                    shared += _linear_flops(block.shared_expert_gate)
        moe_ids = {id(m) for b in blocks for m in b.modules()}
        other = sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in moe_ids)
        config = model.config
        heads = config.num_attention_heads
        qk_dim = getattr(config, "qk_head_dim", None) or getattr(config, "head_dim", None)
        qk_dim = qk_dim or config.hidden_size // heads
        v_dim = getattr(config, "v_head_dim", None) or qk_dim
        return cls(
            slot_flops=expert_slot_flops(hidden, double_inter // 2),
            top_k=blocks[0].spec.top_k,
            moe_layers=len(blocks),
            shared_flops_per_token=shared,
            other_flops_per_token=other,
            attention_flops_per_context_token=2 * heads * (qk_dim + v_dim) * config.num_hidden_layers,
        )


@dataclass(frozen=True)
class FlopReport:
    """FLOPs spent on a set of tokens (one request, one batch row, or an evaluation set).

    Attributes:
        tokens: real tokens processed (each prompt token once at prefill, each generated token
            once at decode; padding excluded).
        real_slots, zero_slots: routed slots over all MoE layers.
        per_layer_zero_ratio: zero share of each MoE layer.
        expert_flops: routed-expert FLOPs actually spent.
        dense_expert_flops: what the static model spends on the same tokens (K real slots each).
        shared_expert_flops: shared experts (spent by both models).
        other_flops: attention (projections and context products), dense MLPs, LM head.
    """

    tokens: int
    real_slots: int
    zero_slots: int
    per_layer_zero_ratio: tuple[float, ...]
    expert_flops: int
    dense_expert_flops: int
    shared_expert_flops: int
    other_flops: int

    @property
    def zero_expert_ratio(self) -> float:
        """r_ze: zero slots / all routed slots (0 when nothing was routed)."""
        total = self.real_slots + self.zero_slots
        return self.zero_slots / total if total else 0.0

    @property
    def expert_flops_saved(self) -> int:
        return self.dense_expert_flops - self.expert_flops

    @property
    def total_flops(self) -> int:
        return self.expert_flops + self.shared_expert_flops + self.other_flops

    @property
    def dense_total_flops(self) -> int:
        return self.dense_expert_flops + self.shared_expert_flops + self.other_flops

    @property
    def total_flops_saved_ratio(self) -> float:
        """Share of all model FLOPs saved (expert savings diluted by everything else)."""
        return self.expert_flops_saved / self.dense_total_flops if self.dense_total_flops else 0.0

    @property
    def expert_flops_per_token(self) -> float:
        return self.expert_flops / self.tokens if self.tokens else 0.0

    def __add__(self, other: FlopReport) -> FlopReport:
        """The report of both token sets together (``sum(reports)`` works too).

        Every MoE layer routes K slots per token, so a layer's zero share over both sets is the
        token-weighted mean of the two.
        """
        if not isinstance(other, FlopReport):
            return NotImplemented
        if len(self.per_layer_zero_ratio) != len(other.per_layer_zero_ratio):
            raise ZedaError(
                f"cannot add FLOP reports of {len(self.per_layer_zero_ratio)} and "
                f"{len(other.per_layer_zero_ratio)} MoE layers"
            )
        tokens = self.tokens + other.tokens
        per_layer = tuple(
            (a * self.tokens + b * other.tokens) / tokens if tokens else 0.0
            for a, b in zip(self.per_layer_zero_ratio, other.per_layer_zero_ratio, strict=True)
        )
        return FlopReport(
            tokens=tokens,
            real_slots=self.real_slots + other.real_slots,
            zero_slots=self.zero_slots + other.zero_slots,
            per_layer_zero_ratio=per_layer,
            expert_flops=self.expert_flops + other.expert_flops,
            dense_expert_flops=self.dense_expert_flops + other.dense_expert_flops,
            shared_expert_flops=self.shared_expert_flops + other.shared_expert_flops,
            other_flops=self.other_flops + other.other_flops,
        )

    def __radd__(self, other: object) -> FlopReport:
        """``0 + report`` is the report, so the builtin ``sum`` needs no start value."""
        if other == 0:
            return self
        return NotImplemented

    def usage(self) -> dict[str, float | int]:
        """The ``usage.zeda`` object of the HTTP API."""
        return {
            "zero_expert_ratio": self.zero_expert_ratio,
            "real_slots": self.real_slots,
            "zero_slots": self.zero_slots,
            "expert_flops": self.expert_flops,
            "expert_flops_saved": self.expert_flops_saved,
            "dense_expert_flops": self.dense_expert_flops,
        }


def flop_report(slot_counts: torch.Tensor, tokens: int, model: FlopModel, context_tokens: int = 0) -> FlopReport:
    """Account the FLOPs of ``tokens`` real tokens from their routed slot counts.

    Args:
        slot_counts: [L, 2] int (real slots, zero slots) per MoE layer over those tokens, e.g. one
            row of :meth:`RoutingRecorder.slot_counts` summed over the steps of a request.
        tokens: number of real tokens the counts cover.
        model: the model's per-token FLOP figures.
        context_tokens: attended positions summed over the tokens (attention context products).
    """
    if slot_counts.shape != (model.moe_layers, 2):
        raise ZedaError(f"slot_counts must be [{model.moe_layers}, 2], got {list(slot_counts.shape)}")
    counts = slot_counts.long()
    per_layer_slots = counts.sum(dim=1)
    if bool((per_layer_slots != tokens * model.top_k).any()):
        raise ZedaError(f"slot counts {per_layer_slots.tolist()} do not match {tokens} tokens x K={model.top_k}")
    real_slots, zero_slots = int(counts[:, 0].sum()), int(counts[:, 1].sum())
    per_layer = (counts[:, 1].double() / per_layer_slots.clamp(min=1).double()).tolist()
    return FlopReport(
        tokens=tokens,
        real_slots=real_slots,
        zero_slots=zero_slots,
        per_layer_zero_ratio=tuple(per_layer),
        expert_flops=real_slots * model.slot_flops,
        dense_expert_flops=(real_slots + zero_slots) * model.slot_flops,
        shared_expert_flops=tokens * model.shared_flops_per_token,
        other_flops=tokens * model.other_flops_per_token + context_tokens * model.attention_flops_per_context_token,
    )
