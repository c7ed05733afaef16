"""Measure routing and FLOPs of a model on a probe sequence."""

from __future__ import annotations

import torch
from torch import nn

from zeda_core.flops import FlopModel, FlopReport, flop_report
from zeda_core.recording import record_routing


def random_tokens(vocab_size: int, length: int, seed: int) -> torch.Tensor:
    """[1, length] token ids drawn uniformly with a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, length), generator=generator)


@torch.no_grad()
def probe_flops(model: nn.Module, tokens: torch.Tensor) -> FlopReport:
    """FLOP report of one prefill of ``tokens`` [1, S] (every position is a real token)."""
    with record_routing() as recorder:
        model(tokens.to(model.device))
    length = tokens.shape[1]
    context = length * (length + 1) // 2
    return flop_report(recorder.slot_counts()[0], length, FlopModel.from_model(model), context_tokens=context)
