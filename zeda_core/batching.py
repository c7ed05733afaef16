"""Padding token-id lists into one batch: the layout every forward over several sequences uses."""

from __future__ import annotations

import torch


def pad_batch(sequences: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, W] int64 token ids, [B, W] int64 attention mask) with every sequence padded to the longest.

    Right padding by default; ``left=True`` pads on the left (generation, so the last column is
    every row's newest token).
    """
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        ids[row, span] = torch.tensor(sequence, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask
