"""Next-token sampling: the one sampler of the trainer's generation and the serving engines."""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper


def sample_next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample one token per row: greedy (argmax) at temperature 0, else temperature then top-p (nucleus).

    Args:
        logits: [B, V] next-token logits (any float dtype; warped in float32).
        temperature: 0 for greedy decoding, else the softmax temperature (> 0).
        top_p: nucleus mass in (0, 1]; 1 keeps every token.
        generator: random source of the draw; it may live on another device than ``logits`` (a
            CPU generator with CUDA logits draws on the CPU).

    Returns:
        [B] int64 token ids on the device of ``logits``.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    probs = torch.softmax(warpers(None, logits.float()), dim=-1)
    if generator is not None:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)
