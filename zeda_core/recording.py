"""Capture of per-layer routing during a forward pass.

The zero-aware MoE blocks report to the recorder active in the current context. One recorder
serves three users: per-request FLOP attribution (slot counts per batch row, padding excluded),
the group loss during training (probabilities with gradient), and routing replay (forcing the
expert ids recorded while sampling).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from zeda_core.errors import ZedaError
from zeda_core.routing import Routing

_ACTIVE: ContextVar[RoutingRecorder | None] = ContextVar("zeda_routing_recorder", default=None)


@dataclass(frozen=True)
class LayerRouting:
    """Routing of one MoE layer for a [B, S] batch.

    Attributes:
        layer_idx: decoder layer index.
        topk_ids: [B, S, K] int64 expert ids (zero slots ``>= N``).
        zero_mask: [B, S, K] bool.
        probs: [B, S, N + Z] float32 routing probabilities, kept only when asked for.
    """

    layer_idx: int
    topk_ids: torch.Tensor
    zero_mask: torch.Tensor
    probs: torch.Tensor | None


class RoutingRecorder:
    """Collects :class:`LayerRouting` for every MoE layer of one forward pass.

    Args:
        token_mask: [B, S] bool, True for real tokens; padding is excluded from every count.
            ``None`` counts every position.
        keep_probs: keep the routing probabilities (with autograd) for the group loss.
        replay: layer index -> [B, S, K] expert ids to force instead of top-k.
        zero_offsets: [B] float32 compute dial of each batch row, in logits, added to the zero
            experts' router logits (softmax) or selection scores (sigmoid) of every token of the
            row in every MoE layer (see :func:`zeda_core.routing.route`); None: 0 for all rows.
    """

    def __init__(
        self,
        token_mask: torch.Tensor | None = None,
        keep_probs: bool = False,
        replay: Mapping[int, torch.Tensor] | None = None,
        zero_offsets: torch.Tensor | None = None,
    ) -> None:
        self.token_mask = token_mask
        self.keep_probs = keep_probs
        self.replay = dict(replay or {})
        self.zero_offsets = zero_offsets
        self._token_offsets: torch.Tensor | None = None
        self.layers: list[LayerRouting] = []

    def token_zero_offsets(self, batch: int, seq: int) -> torch.Tensor | None:
        """[B*S] float32 zero-expert offset of every token (its row's), or None when no row has one."""
        if self.zero_offsets is None:
            return None
        if self.zero_offsets.shape != (batch,):
            raise ZedaError(f"zero_offsets are {list(self.zero_offsets.shape)}, batch has {batch} rows")
        if self._token_offsets is None or self._token_offsets.numel() != batch * seq:
            self._token_offsets = self.zero_offsets.float().repeat_interleave(seq)  # once per forward, not per layer
        return self._token_offsets

    def forced_ids(self, layer_idx: int, batch: int, seq: int) -> torch.Tensor | None:
        """[B*S, K] ids recorded for this layer, or None when not replaying it."""
        ids = self.replay.get(layer_idx)
        if ids is None:
            return None
        if ids.shape[:2] != (batch, seq):
            raise ZedaError(f"replayed routes of layer {layer_idx} are {list(ids.shape)}, batch is [{batch}, {seq}]")
        return ids.reshape(batch * seq, -1)

    def add(self, layer_idx: int, routing: Routing, batch: int, seq: int) -> None:
        """Store one layer's routing of a [B, S] batch."""
        self.layers.append(
            LayerRouting(
                layer_idx=layer_idx,
                topk_ids=routing.topk_ids.view(batch, seq, -1),
                zero_mask=routing.zero_mask.view(batch, seq, -1),
                probs=routing.probs.view(batch, seq, -1) if self.keep_probs else None,
            )
        )

    def routes(self) -> dict[int, torch.Tensor]:
        """Layer index -> [B, S, K] ids, the input of a later replay."""
        return {layer.layer_idx: layer.topk_ids for layer in self.layers}

    def slot_counts(self) -> torch.Tensor:
        """[B, L, 2] int64: per batch row and MoE layer, (real slots, zero slots) over real tokens."""
        if not self.layers:
            raise ZedaError("no MoE layer reported routing: is the model converted with zeda_core?")
        counts = []
        for layer in self.layers:
            zero = layer.zero_mask
            if self.token_mask is not None:
                mask = self.token_mask.to(zero.device).bool()[..., None]
                real_slots = ((~zero) & mask).sum(dim=(1, 2))
                zero_slots = (zero & mask).sum(dim=(1, 2))
            else:
                real_slots, zero_slots = (~zero).sum(dim=(1, 2)), zero.sum(dim=(1, 2))
            counts.append(torch.stack([real_slots, zero_slots], dim=-1))
        return torch.stack(counts, dim=1).cpu()


def zero_offset_tensor(offsets: list[float] | None, rows: int, device: torch.device) -> torch.Tensor | None:
    """[rows] float32 tensor of per-row compute dials, or None when every row's is 0 (or none is given)."""
    if offsets is None or not any(offsets):
        return None
    if len(offsets) != rows:
        raise ZedaError(f"{len(offsets)} zero-expert offsets for {rows} rows")
    return torch.tensor(offsets, dtype=torch.float32, device=device)


def active_recorder() -> RoutingRecorder | None:
    """The recorder of the current context, if any."""
    return _ACTIVE.get()


@contextmanager
def record_routing(
    token_mask: torch.Tensor | None = None,
    keep_probs: bool = False,
    replay: Mapping[int, torch.Tensor] | None = None,
    zero_offsets: torch.Tensor | None = None,
) -> Iterator[RoutingRecorder]:
    """Record routing of every zero-aware MoE layer for the forward passes inside the block.

    ``zero_offsets`` [B] is each row's compute dial (see :class:`RoutingRecorder`).
    """
    recorder = RoutingRecorder(token_mask=token_mask, keep_probs=keep_probs, replay=replay, zero_offsets=zero_offsets)
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)
