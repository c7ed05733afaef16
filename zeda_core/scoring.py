"""Scoring given token sequences: the one "pad, forward, gather target log-probs" of ZEDA.

The teacher, the evaluation NLL and the server's prompt log-probs all ask the same question:
the log-probability of every token of a sequence given the tokens before it
(:func:`score_sequences`). Tools that need the whole next-token distribution (KL, entropy) run the
same right-padded forwards through :func:`forward_batches`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from zeda_core.batching import pad_batch
from zeda_core.errors import ZedaError
from zeda_core.losses import token_logprobs
from zeda_core.model_queries import moe_blocks
from zeda_core.recording import RoutingRecorder, record_routing, zero_offset_tensor


@dataclass
class ForwardBatch:
    """One right-padded forward over a batch of sequences.

    Attributes:
        logits: [B, W, V] logits, on the model's device, in the model's dtype.
        ids: [B, W] int64 token ids (padding filled with the pad id), on the model's device.
        mask: [B, W] int64 attention mask, 1 for real tokens.
        recorder: the routing of the forward (padding excluded from its counts).
        slot_counts: [L, 2] int64 (real, zero) routed slots over the batch's real tokens; None for a
            model without zero-aware MoE blocks.
    """

    logits: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    recorder: RoutingRecorder
    slot_counts: torch.Tensor | None

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens of the batch."""
        return int(self.mask.sum())


@dataclass
class SequenceScores:
    """Scores of a list of sequences.

    Attributes:
        logprobs: per sequence, the log-probs (nats) of its tokens 1..n-1 (n - 1 values each).
        slot_counts: [L, 2] int64 (real, zero) routed slots summed over every valid (non-padding)
            token; None for a model without zero-aware MoE blocks.
        tokens: valid tokens the model processed (the sum of the sequence lengths).
    """

    logprobs: list[list[float]]
    slot_counts: torch.Tensor | None
    tokens: int


@torch.inference_mode()
def forward_batches(
    model: torch.nn.Module,
    sequences: list[list[int]],
    pad_token_id: int,
    batch_size: int | None = None,
    zero_offsets: list[float] | None = None,
) -> Iterator[ForwardBatch]:
    """Run ``model`` over ``sequences`` (token ids), ``batch_size`` at a time (None: all in one), right-padded.

    ``zero_offsets`` holds each sequence's compute dial in logits (:func:`zeda_core.routing.route`).

    Raises:
        ZedaError: a sequence is empty.
    """
    if any(not sequence for sequence in sequences):
        raise ZedaError("cannot score an empty sequence")
    device = next(model.parameters()).device
    zero_aware = bool(moe_blocks(model))
    step = batch_size or max(len(sequences), 1)
    for start in range(0, len(sequences), step):
        ids, mask = (t.to(device) for t in pad_batch(sequences[start : start + step], pad_token_id))
        chunk_offsets = zero_offsets[start : start + step] if zero_offsets is not None else None
        offsets = zero_offset_tensor(chunk_offsets, ids.shape[0], device)
        with record_routing(token_mask=mask.bool(), zero_offsets=offsets) as recorder:
            logits = model(input_ids=ids, attention_mask=mask).logits
        counts = recorder.slot_counts().sum(dim=0) if zero_aware else None
        yield ForwardBatch(logits, ids, mask, recorder, counts)


@torch.inference_mode()
def score_sequences(
    model: torch.nn.Module,
    sequences: list[list[int]],
    pad_token_id: int,
    batch_size: int | None = None,
    zero_offsets: list[float] | None = None,
) -> SequenceScores:
    """Log-probs of every token of each sequence given its prefix, from right-padded batched forwards.

    Args:
        model: a causal LM whose output has ``logits`` [B, S, V].
        sequences: token ids, each at least one token long.
        pad_token_id: id filling the padding (masked out; it never changes a score).
        batch_size: sequences per forward; None scores them all in one forward.
        zero_offsets: each sequence's compute dial in logits; None: 0 for all.

    Raises:
        ZedaError: a sequence is empty.
    """
    logprobs: list[list[float]] = []
    counts: torch.Tensor | None = None
    tokens = 0
    for batch in forward_batches(model, sequences, pad_token_id, batch_size, zero_offsets):
        values = token_logprobs(batch.logits[:, :-1], batch.ids[:, 1:]).cpu()
        logprobs += [values[row, : length - 1].tolist() for row, length in enumerate(batch.mask.sum(-1).tolist())]
        tokens += batch.tokens
        if batch.slot_counts is not None:
            counts = batch.slot_counts if counts is None else counts + batch.slot_counts
    return SequenceScores(logprobs, counts, tokens)
