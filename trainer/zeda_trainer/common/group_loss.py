"""The group auxiliary loss recipe section (L_GA), shared by SFT, OPD and retraining."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class GroupLossConfig(BaseModel):
    """L_GA: ``alpha`` and the zero-group weight ``w`` (target zero share ``w*Z / (w*Z + N)``)."""

    model_config = ConfigDict(extra="forbid")
    alpha: float = 0.1
    zero_group_weight: float = 2.0
    per_sequence: bool = False
    """Take L_GA within each sequence and average (every sequence is pulled to the target share),
    instead of over all the batch's tokens together."""
    pool_layers: bool = False
    """Take L_GA over the slots of all MoE layers together (the layers share one zero budget),
    instead of per layer and averaged (every layer pulled to the target share)."""
