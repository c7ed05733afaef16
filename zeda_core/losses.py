"""Group auxiliary loss and distillation losses: pure functions on shape-documented tensors.

Every function takes an optional token mask; masked positions (padding) never enter a loss or
a ratio.

Under data parallelism the losses of the training stages take a :class:`GlobalBatch`: each
process then returns its share of the loss of the whole global batch, and the average over
processes (what DDP takes of the gradients) is exactly the loss of that batch in one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from zeda_core.errors import ZedaError
from zeda_core.recording import RoutingRecorder


@dataclass(frozen=True)
class GlobalBatch:
    """The global batch that a process's loss terms are normalised over (torchtitan's ``global_valid_tokens``).

    Each of ``world_size`` data-parallel processes holds a share of the step's batch, and the
    gradients are averaged over the processes. A mean over the global batch (of tokens, of
    sequences, or of any non-negative weight) is taken by each process as
    ``local_sum * world_size / global_count``, the count summed over processes: the average over
    processes is then exactly ``global_sum / global_count``, the loss of the whole batch in one
    process, however unevenly the valid tokens fall on the processes. (A per-process mean,
    averaged by DDP, is a mean of means instead.) The value one process returns is only its
    share; the average over processes is the loss.

    With ``world_size`` > 1 the counts are all-reduced on torch.distributed's default group, so
    every process must make the same calls in the same order (even one without tokens).
    """

    world_size: int = 1

    def total(self, local: torch.Tensor) -> torch.Tensor:
        """Sum over processes of ``local`` (any shape), detached, in float32 at least."""
        total = local.detach().to(torch.promote_types(local.dtype, torch.float32), copy=True)
        if self.world_size > 1:
            dist.all_reduce(total)
        return total

    def share(self, local_sum: torch.Tensor, global_count: torch.Tensor) -> torch.Tensor:
        """This process's share of ``global_sum / global_count`` (a :meth:`total`); 0 where the count is 0."""
        return local_sum * self.world_size / global_count.clamp(min=1e-12)

    def mean(self, local_sum: torch.Tensor, local_count: torch.Tensor | float) -> torch.Tensor:
        """This process's share of the global mean: ``local_sum`` [...] over the total of ``local_count`` [...]."""
        count = torch.as_tensor(local_count, dtype=torch.float32, device=local_sum.device)
        return self.share(local_sum, self.total(count))


ONE_PROCESS = GlobalBatch()
"""The batch is all in this process: every mean is a plain local mean."""


def _group_means(values: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column means of ``values`` [T, C] within each group: ([S, C] means, [T] group index of
    each row). ``groups`` [T] holds any ids. Summed in float32 at least: bf16 routing
    probabilities would lose the small terms of a long running sum."""
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    _, inverse = torch.unique(groups, return_inverse=True)
    count = torch.bincount(inverse).to(values.dtype)
    totals = torch.zeros(count.numel(), values.shape[1], dtype=values.dtype, device=values.device)
    return totals.index_add_(0, inverse, values) / count[:, None], inverse


def group_aux_target_ratio(num_experts: int, num_zero_experts: int, zero_group_weight: float = 2.0) -> float:
    """Zero-slot share that minimises L_GA: ``w*Z / (w*Z + N)`` (0.5 for w = 2, Z = N/2)."""
    weighted = zero_group_weight * num_zero_experts
    return weighted / (weighted + num_experts)


def zero_group_weight_for(target_ratio: float, num_experts: int, num_zero_experts: int) -> float:
    """The ``w`` whose L_GA target share is ``target_ratio``: the inverse of :func:`group_aux_target_ratio`."""
    if not 0.0 < target_ratio < 1.0:
        raise ValueError(f"target zero ratio must lie in (0, 1), got {target_ratio}")
    return target_ratio * num_experts / (num_zero_experts * (1.0 - target_ratio))


def group_aux_loss(
    probs: torch.Tensor,
    zero_mask: torch.Tensor,
    num_experts: int,
    token_mask: torch.Tensor | None = None,
    zero_group_weight: float = 2.0,
    alpha: float = 0.1,
    sequence_ids: torch.Tensor | None = None,
    global_batch: GlobalBatch = ONE_PROCESS,
) -> torch.Tensor:
    """L_GA of one layer: two groups (real experts, zero experts), nothing balanced inside a group.

    ``L = alpha * (N + w*Z) / K * (f_E * P_E / N + f_Z * P_Z / (w*Z))`` where ``f`` is the share of
    routed slots and ``P`` the mean routing probability of each group over real tokens.

    With ``sequence_ids`` the loss is taken within each sequence and averaged over sequences
    (sequence-wise, like a sequence-wise balance loss): every sequence is pulled to the target
    share, so no request gives up far more or far less expert compute than the others, while
    the tokens inside a sequence still share its zero slots freely.

    Under data parallelism (``global_batch``) ``f`` and ``P`` are taken over the real tokens of
    the global batch, as in one process: the zero-slot share (no gradient) is all-reduced and
    this process's probability sums enter as their shares of the global means. Sequence-wise,
    the mean is over the global batch's sequences (a sequence lies on one process).

    Args:
        probs: [..., N + Z] routing probabilities (softmax, or sum-normalised sigmoid).
        zero_mask: [..., K] bool, True for slots routed to a zero expert.
        num_experts: N.
        token_mask: [...] bool, True for real tokens; ``None`` counts every position.
        zero_group_weight: w; the loss is minimal at a zero share of ``w*Z / (w*Z + N)``.
        alpha: loss coefficient.
        sequence_ids: [...] int64 sequence of each position, or ``None`` for one batch-wide loss.
        global_batch: the processes the batch is split over (default: all in this one).

    Returns:
        Scalar loss (this process's share); gradient flows through ``probs`` only. 0 when no
        real token is present.
    """
    num_zero = probs.shape[-1] - num_experts
    if num_zero < 1:
        raise ZedaError(f"group loss needs zero experts: probs has {probs.shape[-1]} rows for N={num_experts}")
    if probs.shape[:-1] != zero_mask.shape[:-1]:
        raise ZedaError(f"probs {list(probs.shape)} and zero_mask {list(zero_mask.shape)} disagree on tokens")
    top_k = zero_mask.shape[-1]
    probs = probs.reshape(-1, probs.shape[-1])
    zero_mask = zero_mask.reshape(-1, top_k)
    sequences = None
    if sequence_ids is not None:
        if sequence_ids.numel() != probs.shape[0]:
            raise ZedaError(f"sequence_ids {list(sequence_ids.shape)} does not match {probs.shape[0]} positions")
        sequences = sequence_ids.reshape(-1).to(probs.device)
    if token_mask is not None:
        keep = token_mask.reshape(-1).bool()
        probs, zero_mask = probs[keep], zero_mask[keep]
        sequences = None if sequences is None else sequences[keep]
    per_token = torch.stack(
        [zero_mask.float().mean(dim=-1), probs[:, :num_experts].sum(dim=-1), probs[:, num_experts:].sum(dim=-1)],
        dim=-1,
    )  # [T, 3]: zero-slot share, real and zero probability
    weighted_zero = zero_group_weight * num_zero
    scale = alpha * (num_experts + weighted_zero) / top_k

    def loss(f_zero: torch.Tensor, p_real: torch.Tensor, p_zero: torch.Tensor) -> torch.Tensor:
        return scale * ((1.0 - f_zero) * p_real / num_experts + f_zero * p_zero / weighted_zero)

    if sequences is None:
        sums = per_token.to(torch.promote_types(per_token.dtype, torch.float32)).sum(dim=0)  # [3]
        zero_slots, tokens = global_batch.total(torch.stack([sums[0], sums.new_tensor(per_token.shape[0])]))
        p_real, p_zero = global_batch.share(sums[1:], tokens)
        return loss(zero_slots / tokens.clamp(min=1.0), p_real, p_zero)
    f_zero, p_real, p_zero = _group_means(per_token, sequences)[0].unbind(dim=-1)  # each [S]
    return global_batch.mean(loss(f_zero, p_real, p_zero).sum(), f_zero.shape[0])


def group_aux_loss_of_layers(
    probs: Sequence[torch.Tensor],
    zero_masks: Sequence[torch.Tensor],
    num_experts: int,
    token_mask: torch.Tensor | None = None,
    zero_group_weight: float = 2.0,
    alpha: float = 0.1,
    sequence_ids: torch.Tensor | None = None,
    pool_layers: bool = False,
    global_batch: GlobalBatch = ONE_PROCESS,
) -> torch.Tensor:
    """L_GA over several MoE layers (each argument as in :func:`group_aux_loss`, one per layer).

    The mean of each layer's loss, so every layer is pulled to the target share; or, with
    ``pool_layers``, one loss over the slots of all layers together: the layers share one zero
    budget, and the distillation losses decide which layers can give up more compute.
    """
    if pool_layers:

        def tiled(positions: torch.Tensor | None) -> torch.Tensor | None:
            return None if positions is None else positions.reshape(-1).repeat(len(probs))

        return group_aux_loss(
            torch.cat([layer.reshape(-1, layer.shape[-1]) for layer in probs]),
            torch.cat([layer.reshape(-1, layer.shape[-1]) for layer in zero_masks]),
            num_experts,
            tiled(token_mask),
            zero_group_weight,
            alpha,
            tiled(sequence_ids),
            global_batch,
        )
    losses = [
        group_aux_loss(
            layer_probs, layer_zero, num_experts, token_mask, zero_group_weight, alpha, sequence_ids, global_batch
        )
        for layer_probs, layer_zero in zip(probs, zero_masks, strict=True)
    ]
    return torch.stack(losses).mean()


def group_aux_loss_over_layers(
    recorder: RoutingRecorder,
    num_experts: int,
    zero_group_weight: float = 2.0,
    alpha: float = 0.1,
    per_sequence: bool = False,
    pool_layers: bool = False,
    global_batch: GlobalBatch = ONE_PROCESS,
) -> torch.Tensor:
    """L_GA of a recorded forward (recorded with ``keep_probs=True``), see :func:`group_aux_loss_of_layers`.

    ``per_sequence`` takes it within each batch row (see :func:`group_aux_loss`).
    """
    if not recorder.layers or recorder.layers[0].probs is None:
        raise ZedaError("the forward was not recorded with keep_probs=True")
    rows = None
    if per_sequence:
        batch, length = recorder.layers[0].probs.shape[:2]
        rows = torch.arange(batch, device=recorder.layers[0].probs.device)[:, None].expand(batch, length)
    return group_aux_loss_of_layers(
        [layer.probs for layer in recorder.layers],
        [layer.zero_mask for layer in recorder.layers],
        num_experts,
        recorder.token_mask,
        zero_group_weight,
        alpha,
        rows,
        pool_layers,
        global_batch,
    )


def load_balance_loss(recorder: RoutingRecorder, global_batch: GlobalBatch = ONE_PROCESS) -> torch.Tensor:
    """Switch-style load balance over all N + Z rows, averaged over layers (AdaMoE's loss).

    Per layer: ``E * sum_i f_i * P_i``, with E = N + Z rows, ``f_i`` the share of routed slots
    that went to row i (real or null) and ``P_i`` the mean routing probability of row i, over
    the recorded tokens (``recorder.token_mask``) of the global batch (``f`` all-reduced, this
    process's share of ``P``, as in :func:`group_aux_loss`). 1.0 when routing is uniform.
    Recorded with ``keep_probs=True``.
    """
    if not recorder.layers or recorder.layers[0].probs is None:
        raise ZedaError("the forward was not recorded with keep_probs=True")
    losses = []
    for layer in recorder.layers:
        rows = layer.probs.shape[-1]
        mask = recorder.token_mask
        mask = torch.ones(layer.probs.shape[:2], dtype=torch.bool, device=layer.probs.device) if mask is None else mask
        mask = mask.to(layer.probs.device).bool()
        probs, ids = layer.probs[mask], layer.topk_ids[mask]  # [T, E], [T, K]
        counts = torch.zeros(rows + 1, device=probs.device)  # [E + 1]: slots routed to each row, then tokens
        counts[-1] = probs.shape[0]
        counts.scatter_add_(0, ids.reshape(-1), torch.ones(ids.numel(), device=probs.device))
        totals = global_batch.total(counts)
        slot_share = totals[:-1] / totals[:-1].sum().clamp(min=1.0)
        losses.append(rows * (slot_share * global_batch.share(probs.sum(dim=0), totals[-1])).sum())
    return torch.stack(losses).mean()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, S, V] logits and [B, S] token ids -> [B, S] float32 log-probabilities of those tokens."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_nll(logits: torch.Tensor, targets: torch.Tensor, global_batch: GlobalBatch = ONE_PROCESS) -> torch.Tensor:
    """Mean NLL over the labelled targets of the global batch (this process's share).

    Args:
        logits: [..., V] logits at each position.
        targets: [...] int64 target token of each position, -100 where there is none.
        global_batch: the processes the batch is split over (default: all in this one).
    """
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return global_batch.mean(total, (targets != -100).sum())


def causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor, global_batch: GlobalBatch = ONE_PROCESS) -> torch.Tensor:
    """Next-token NLL of unpadded [B, S] ``ids`` from their [B, S, V] ``logits``, see :func:`token_nll`."""
    return token_nll(logits, F.pad(ids[:, 1:], (0, 1), value=-100), global_batch)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _masked_sum(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return values.sum() if mask is None else (values * mask.to(values.dtype)).sum()


def per_token_forward_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) at every position: log-probs [..., V] -> [...] in nats."""
    return F.kl_div(student_logprobs, teacher_logprobs, log_target=True, reduction="none").sum(-1)


def logits_forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) at every position: logits [..., V] -> [...] float32 nats."""
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    student = torch.log_softmax(student_logits.float(), dim=-1)
    return per_token_forward_kl(teacher, student)


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor | None = None):
    """Mean over tokens of KL(p_teacher || p_student); logits [B, S, V], mask [B, S]."""
    return _masked_mean(logits_forward_kl(teacher_logits, student_logits), mask)


def zero_allocation_loss(
    zero_probs: torch.Tensor,
    difficulty: torch.Tensor,
    groups: torch.Tensor | None = None,
    global_batch: GlobalBatch = ONE_PROCESS,
) -> torch.Tensor:
    """Moves zero-expert probability from hard tokens to easy ones, at an unchanged mean.

    ``mean over layers and tokens of (d_t / mean(d) - 1) * P_zero(t)``: the weight is positive on
    tokens harder than average (their zero probability is pushed down) and negative on easier
    ones, and sums to 0 over the tokens, so the loss redistributes zero slots and leaves their
    overall share to L_GA. With ``groups``, the average is taken within each group (a sequence),
    so zero slots move between the tokens of a sequence, never from one sequence to another.

    Args:
        zero_probs: [L, T] routing probability of the zero group per MoE layer and token.
        difficulty: [T] non-negative per-token difficulty (e.g. the KL to the teacher); detached.
        groups: [T] int64 group id of each token, or ``None`` for one group (the global batch's
            tokens: the mean difficulty is all-reduced).
        global_batch: the processes the batch is split over; the mean is over the layers and
            tokens of the global batch (this process's share).

    Returns:
        Scalar; 0 when there is no token or every token is equally hard.
    """
    if zero_probs.shape[-1] != difficulty.shape[-1]:
        shapes = f"zero_probs {list(zero_probs.shape)} and difficulty {list(difficulty.shape)}"
        raise ZedaError(f"{shapes} disagree on tokens")
    difficulty = difficulty.detach().float()
    if groups is None:
        total, count = global_batch.total(torch.stack([difficulty.sum(), difficulty.new_tensor(difficulty.numel())]))
        mean = total / count.clamp(min=1.0)
    else:
        means, inverse = _group_means(difficulty[:, None], groups)
        mean = means[inverse, 0]
    weight = difficulty / mean.clamp(min=1e-12) - 1.0
    return global_batch.mean((zero_probs.float() * weight).sum(), zero_probs.numel())


def hidden_state_loss(
    teacher_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    student_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    mask: torch.Tensor | None = None,
    global_batch: GlobalBatch = ONE_PROCESS,
) -> torch.Tensor:
    """Relative squared error of the student's residual stream, averaged over layers.

    Args:
        teacher_hidden: per-layer hidden states [B, S, H] (``output_hidden_states``); the first
            (the embeddings) is skipped, since the student shares them.
        student_hidden: the student's, same shapes.
        mask: [B, S] bool, True on real tokens.
        global_batch: the processes the batch is split over; the sums run over the masked
            tokens of the global batch (this process's share).

    Returns:
        Scalar: mean over layers of ``sum ||h_s - h_t||^2 / sum ||h_t||^2`` over masked tokens.
    """
    errors, scales = [], []
    for teacher_h, student_h in zip(teacher_hidden[1:], student_hidden[1:], strict=True):
        errors.append(_masked_sum((student_h.float() - teacher_h.float()).pow(2).sum(-1), mask))
        scales.append(_masked_sum(teacher_h.float().pow(2).sum(-1), mask))
    return global_batch.mean(torch.stack(errors), torch.stack(scales)).mean()


def reverse_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor | None = None):
    """Mean over tokens of KL(p_student || p_teacher); logits [B, S, V], mask [B, S]."""
    return forward_kl(student_logits, teacher_logits, mask)


def opd_advantage(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token on-policy distillation advantage ``log p_T(y_t) - log p_S(y_t)``.

    This is minus the single-sample estimate of the reverse KL at each sampled token.

    Args:
        teacher_logprobs: [B, S] teacher log-probs of the sampled tokens.
        student_logprobs: [B, S] student log-probs of the same tokens (at sampling time).
        mask: [B, S] bool, True on generated tokens; 0 elsewhere.

    Returns:
        [B, S] float32 advantages, detached (a reward, not a path for gradients).
    """
    advantage = (teacher_logprobs.float() - student_logprobs.float()).detach()
    return advantage if mask is None else advantage * mask.to(advantage.dtype)
