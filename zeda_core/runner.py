"""The one model runner: batched prefill and decode over a KV batch, with exact per-row routing.

The serving engine and the trainer's generation run every forward through :class:`ModelRunner`.
A prefill runs new prompts (left-padded) and appends their rows to a :class:`KvBatch`; a decode
feeds one token per row. Each forward reports, per batch row, the routed slot counts of that row's
real tokens (and, on request, their expert ids), so a request's :class:`RequestRouting` counts
every prompt token once at prefill and every fed-back token once at decode. Padding never counts,
and a finished row leaves the batch (:meth:`KvBatch.keep`), so it never counts either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from zeda_core.batching import pad_batch
from zeda_core.model_queries import moe_blocks
from zeda_core.recording import record_routing, zero_offset_tensor


class KvBatch:
    """KV cache, attention mask [B, T] and next positions [B] of the rows in flight.

    Rows are left-padded and keep their own positions; the attention mask hides each row's left
    padding, so a row's attention sees exactly its own tokens whatever else shares the batch.
    """

    def __init__(self, cache: DynamicCache, attention: torch.Tensor, positions: torch.Tensor) -> None:
        self.cache = cache
        self.attention = attention
        self.positions = positions

    @property
    def rows(self) -> int:
        return self.attention.shape[0]

    def merge(self, other: KvBatch) -> KvBatch:
        """This batch's rows followed by ``other``'s, both left-padded to the longer length."""
        width = max(self.attention.shape[1], other.attention.shape[1])
        attention = torch.cat([_pad_left(self.attention, width), _pad_left(other.attention, width)])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, dim=-2), _pad_left(theirs.keys, width, dim=-2)])
            mine.values = torch.cat([_pad_left(mine.values, width, dim=-2), _pad_left(theirs.values, width, dim=-2)])
        return KvBatch(self.cache, attention, torch.cat([self.positions, other.positions]))

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order) and drop the left columns no remaining row uses."""
        index = torch.tensor(rows, dtype=torch.long, device=self.attention.device)
        attention = self.attention.index_select(0, index)
        used = attention.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else attention.shape[1]
        self.attention = attention[:, start:]
        self.positions = self.positions.index_select(0, index)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[..., start:, :]
            layer.values = layer.values.index_select(0, index)[..., start:, :]

    def extend(self) -> None:
        """Account one new token per row (the decode step about to run appends it to the cache)."""
        self.attention = torch.cat([self.attention, torch.ones_like(self.attention[:, :1])], dim=1)
        self.positions = self.positions + 1


def _pad_left(tensor: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


@dataclass
class Forward:
    """What one batched forward gave for each of its B rows.

    Attributes:
        logits: [B, V] float32 next-token logits after each row's last token.
        tokens: [B] real tokens each row ran in this forward (its prompt length, or 1 at decode).
        slot_counts: [B, L, 2] int64 (real, zero) routed slots per MoE layer over each row's real
            tokens; None for a model without zero-aware MoE blocks.
        routes: per row, layer index -> [tokens, K] int64 expert ids of its real tokens in order;
            None unless the runner records routes.
    """

    logits: torch.Tensor
    tokens: list[int]
    slot_counts: torch.Tensor | None
    routes: list[dict[int, torch.Tensor]] | None


@dataclass
class RequestRouting:
    """The routing one request accumulated over the forwards it took part in.

    Attributes:
        processed: tokens the model ran for it (prompt + fed-back tokens).
        slot_counts: [L, 2] int64 (real, zero) routed slots over those tokens; None for a plain model.
    """

    processed: int = 0
    slot_counts: torch.Tensor | None = None
    _route_parts: list[dict[int, torch.Tensor]] = field(default_factory=list)

    def add(self, forward: Forward, row: int) -> None:
        """Account row ``row`` of ``forward`` to this request."""
        self.processed += forward.tokens[row]
        if forward.slot_counts is not None:
            counts = forward.slot_counts[row]
            self.slot_counts = counts if self.slot_counts is None else self.slot_counts + counts
        if forward.routes is not None:
            self._route_parts.append(forward.routes[row])

    def routes(self) -> dict[int, torch.Tensor] | None:
        """Layer index -> [processed, K] int64 expert ids in sequence order; None when routes were not recorded."""
        if not self._route_parts:
            return None
        layers = self._route_parts[0].keys()
        return {layer: torch.cat([part[layer] for part in self._route_parts]) for layer in layers}


class ModelRunner:
    """Batched prefill and decode of one HF causal LM, with per-row routing counts.

    Args:
        model: the causal LM (zero-aware MoE blocks give routing counts; a plain model gives none).
        pad_token_id: id filling the left padding of a prefill.
        record_routes: also return the expert ids of every real token (routing replay).
    """

    def __init__(self, model: torch.nn.Module, pad_token_id: int, record_routes: bool = False) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.zero_aware = bool(moe_blocks(model))
        self.record_routes = record_routes and self.zero_aware
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def prefill(
        self, prompts: list[list[int]], kv: KvBatch | None = None, zero_offsets: list[float] | None = None
    ) -> tuple[Forward, KvBatch]:
        """Run ``prompts`` (token ids) in one left-padded forward.

        ``zero_offsets`` holds each prompt's compute dial in logits (see
        :func:`zeda_core.routing.route`); None: 0 for all.

        Returns:
            The forward of the new rows, and the batch: ``kv``'s rows (if any) followed by the new ones.
        """
        ids, attention = (t.to(self.device) for t in pad_batch(prompts, self.pad_token_id, left=True))
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        forward = self._forward(ids, attention, positions, cache, attention.bool(), zero_offsets)
        joined = KvBatch(cache, attention, positions[:, -1] + 1)
        return forward, joined if kv is None else kv.merge(joined)

    @torch.no_grad()
    def decode(self, kv: KvBatch, tokens: list[int], zero_offsets: list[float] | None = None) -> Forward:
        """Feed one token per row of ``kv`` (``tokens[row]``, dial ``zero_offsets[row]``) and extend the batch by it."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        kv.extend()
        return self._forward(ids, kv.attention, (kv.positions - 1)[:, None], kv.cache, None, zero_offsets)

    def _forward(
        self,
        ids: torch.Tensor,
        attention: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        token_mask: torch.Tensor | None,
        zero_offsets: list[float] | None,
    ) -> Forward:
        """One forward of [B, S] ``ids``; ``token_mask`` [B, S] marks real tokens (None: all are)."""
        offsets = zero_offset_tensor(zero_offsets, ids.shape[0], self.device)
        with record_routing(token_mask=token_mask, zero_offsets=offsets) as recorder:
            logits = self.model(
                input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache, use_cache=True
            ).logits[:, -1]
        mask = token_mask if token_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        routes = None
        if self.record_routes:
            routes = [
                {layer: row_ids[row][mask[row]].cpu() for layer, row_ids in recorder.routes().items()}
                for row in range(ids.shape[0])
            ]
        counts = recorder.slot_counts() if self.zero_aware else None
        return Forward(logits.float(), mask.sum(-1).tolist(), counts, routes)
