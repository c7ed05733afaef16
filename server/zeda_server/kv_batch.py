"""The running batch's KV cache: left-padded rows that join and leave between decode steps.

Rows keep their own positions; the attention mask hides each row's left padding, so a row's
attention sees exactly its own tokens whatever else shares the batch.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class KvBatch:
    """KV cache, attention mask [B, T] and next positions [B] of the rows in flight."""

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
        """Account one new token per row (after a decode step appended it to the cache)."""
        self.attention = torch.cat([self.attention, torch.ones_like(self.attention[:, :1])], dim=1)
        self.positions = self.positions + 1


def _pad_left(tensor: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
