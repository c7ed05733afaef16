"""Stage 1 of ZEDA: SFT of the zero-expert student on the frozen teacher's rollouts.

Loss = token NLL on the teacher's completions + L_GA (group auxiliary loss over real tokens,
averaged over MoE layers) + optionally ``kl_weight`` x forward KL to the teacher's logits.

Optionally each global batch also holds ``text.rows`` blocks of raw training text, trained with
the same losses: with the teacher KL on, this distils the teacher's whole next-token
distribution on general text, which keeps the student's perplexity close to the teacher's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import reduce
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from zeda_core.batching import pad_batch
from zeda_core.checkpoint import load_model, resolve_checkpoint
from zeda_core.convert import inject_zero_experts, nudge_zero_bias
from zeda_core.errors import ZedaError
from zeda_core.losses import (
    ONE_PROCESS,
    GlobalBatch,
    group_aux_loss_of_layers,
    group_aux_target_ratio,
    hidden_state_loss,
    logits_forward_kl,
    token_nll,
    zero_allocation_loss,
)
from zeda_core.model_queries import moe_blocks
from zeda_core.moe_backends import set_moe_backend
from zeda_core.recording import record_routing
from zeda_trainer.common.group_loss import GroupLossConfig
from zeda_trainer.common.loop import OptimConfig, global_batch_of, make_accelerator, process_rows, run_training
from zeda_trainer.common.metrics import MetricsLog, save_trained_model
from zeda_trainer.common.prompts import load_prompts
from zeda_trainer.common.sharding import deepspeed_zero3, shards_parameters
from zeda_trainer.data.packing import pack_blocks, read_user_jsonl
from zeda_trainer.stages.rollouts import RolloutConfig, cached_rollouts, teacher_rollouts

MAX_CHUNKS = 8
"""Most length groups one batch runs in (:func:`length_chunks`)."""


class TextMixConfig(BaseModel):
    """Raw-text blocks added to every global batch (``rows`` = 0 turns the mix off)."""

    model_config = ConfigDict(extra="forbid")
    path: Path = Path("build/data/text/train.jsonl")
    rows: int = Field(default=0, ge=0)
    block_size: int = 128
    in_group_loss: bool = True
    """Whether text tokens enter L_GA; when not, the zero share is steered on rollout tokens alone."""


class SftConfig(BaseModel):
    """SFT recipe (YAML keys; ``--set key=value`` overrides them)."""

    model_config = ConfigDict(extra="forbid")
    teacher: Path = Path("models/tiny-teacher")
    prompts: Path = Path("build/data/prompts/sft.jsonl")
    run_dir: Path = Path("build/runs/tiny-sft")
    out: Path = Path("build/models/tiny-zeda-sft")
    zero_experts: int = 4
    init: Literal["gaussian", "preserve"] = "gaussian"
    zero_ramp_steps: int = Field(default=0, ge=0)
    """With ``init: preserve``: steps over which the zero rows' offset is steered towards a zero
    share that rises linearly from 0 to the group loss's target."""
    zero_ramp_step_size: float = Field(default=0.25, gt=0.0)
    seed: int = 0
    rollout: RolloutConfig = RolloutConfig()
    batch_size: int = 32
    text: TextMixConfig = TextMixConfig()
    group_loss: GroupLossConfig = GroupLossConfig()
    kl_weight: float = 0.0
    kl_tokens: Literal["completion", "all"] = "completion"
    """Rollout positions the teacher KL covers: the completion, or also every prompt position
    (the teacher's next-token distribution over the prompt is a dense signal on each prompt token)."""
    hidden_weight: float = Field(default=0.0, ge=0.0)
    """Weight of the hidden-state loss: the student's residual stream after every layer is pulled
    to the teacher's on every real token (relative squared error, averaged over layers)."""
    allocation_weight: float = Field(default=0.0, ge=0.0)
    """Weight of the zero-allocation loss (needs the teacher KL): on the group-loss tokens whose
    next token the KL covers, zero-expert probability moves from tokens the student predicts
    worse than the average of their sequence (higher KL) to the sequence's easier tokens."""
    trainable: Literal["all", "router"] = "all"
    moe_backend: Literal["auto", "torch", "triton"] = "auto"
    """What computes the student's experts (forward and backward): ``auto`` (the Triton kernel on
    CUDA, torch on CPU), ``torch``, or ``triton`` (CUDA, or ``TRITON_INTERPRET=1`` on CPU)."""
    optim: OptimConfig = OptimConfig(max_steps=300, lr=5e-4, warmup_steps=30, betas=(0.9, 0.98))


def collate(records: list[dict[str, Any]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion batch; ``labels`` is -100 on prompt and padding."""
    sequences = [r["prompt_ids"] + r["completion_ids"] for r in records]
    ids, mask = pad_batch(sequences, pad_id)
    labels = torch.full_like(ids, -100)
    for row, (record, sequence) in enumerate(zip(records, sequences, strict=True)):
        start = len(record["prompt_ids"])
        labels[row, start : len(sequence)] = torch.tensor(record["completion_ids"], dtype=torch.long)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def length_chunks(lengths: torch.Tensor, max_chunks: int = 8) -> list[torch.Tensor]:
    """Rows of a batch grouped by length, so that each group runs with little padding.

    Rows are taken shortest first; a new group opens when a row is more than twice as long as
    the current group's shortest, until ``max_chunks`` groups are open. Empty rows are left out.

    Args:
        lengths: [B] real tokens per row.
        max_chunks: most groups (1 = the whole batch in one group).

    Returns:
        [b_i] int64 row indices per group, every non-empty row exactly once.
    """
    order = [row for row in torch.argsort(lengths.cpu(), stable=True).tolist() if lengths[row] > 0]
    if not order:
        raise ZedaError("the batch has no real tokens")
    chunks = [[order[0]]]
    for row in order[1:]:
        if len(chunks) < max_chunks and lengths[row] > 2 * lengths[chunks[-1][0]]:
            chunks.append([row])
        else:
            chunks[-1].append(row)
    return [torch.tensor(chunk, device=lengths.device) for chunk in chunks]


def _chunk_forward(
    model: torch.nn.Module,
    teacher: torch.nn.Module | None,
    batch: dict[str, torch.Tensor],
    rows: torch.Tensor,
    config: SftConfig,
) -> dict[str, Any]:
    """Forward of some rows of a right-padded batch, cut to their longest row.

    Returns the real tokens' terms, flattened:

    - ``logits`` [P, V] and ``targets`` [P] at the P positions whose next token is real, and the
      teacher's ``teacher_logits`` [P, V] at the same positions;
    - per MoE layer, ``probs`` [G, N + Z] and ``zero`` [G, K] over the G group-loss tokens, and
      ``sequence`` [G], the batch row of each;
    - ``counts`` [L, 2], the (real, zero) slots per layer over the group-loss tokens;
    - with the allocation loss on, per layer ``next_probs`` [P, N + Z], ``next_group`` [P]
      (whether the position is a group-loss token) and ``next_row`` [P] (its batch row);
    - with the hidden-state loss on, per layer ``hidden`` / ``teacher_hidden`` [R, H] over the R
      real tokens.
    """
    width = int(batch["attention_mask"][rows].sum(dim=1).max())
    ids, attention = batch["input_ids"][rows, :width], batch["attention_mask"][rows, :width]
    group = batch.get("group_mask", batch["attention_mask"])[rows, :width].bool()
    real, has_next = attention.bool(), attention[:, 1:].bool()
    hidden = config.hidden_weight > 0
    with record_routing(token_mask=group, keep_probs=True) as recorder:
        output = model(input_ids=ids, attention_mask=attention, output_hidden_states=hidden)
    piece: dict[str, Any] = {
        "logits": output.logits[:, :-1][has_next],
        "targets": batch["labels"][rows, 1:width][has_next],
        "probs": [layer.probs[group] for layer in recorder.layers],
        "zero": [layer.zero_mask[group] for layer in recorder.layers],
        "sequence": rows[:, None].expand_as(group)[group],
        "counts": recorder.slot_counts().sum(dim=0),
    }
    if config.allocation_weight > 0:
        piece["next_probs"] = [layer.probs[:, :-1][has_next] for layer in recorder.layers]
        piece["next_group"] = group[:, :-1][has_next]
        piece["next_row"] = rows[:, None].expand_as(has_next)[has_next]
    if hidden:
        piece["hidden"] = [h[real] for h in output.hidden_states]
    if teacher is not None and (config.kl_weight > 0 or hidden):
        with torch.no_grad():
            teacher_output = teacher(input_ids=ids, attention_mask=attention, output_hidden_states=hidden)
        piece["teacher_logits"] = teacher_output.logits[:, :-1][has_next]
        if hidden:
            piece["teacher_hidden"] = [h[real] for h in teacher_output.hidden_states]
    return piece


def sft_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    num_experts: int,
    config: SftConfig,
    teacher: torch.nn.Module | None = None,
    max_chunks: int = MAX_CHUNKS,
    global_batch: GlobalBatch = ONE_PROCESS,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one right-padded batch and its metrics; padding enters neither the losses nor the ratios.

    ``config`` gives L_GA (``group_loss``) and, with a ``teacher``, the teacher terms: the KL
    (``kl_weight``) over the labelled positions, or with ``kl_tokens="all"`` every position whose
    next token is real (prompt included), and the hidden-state loss (``hidden_weight``) on every
    real token.

    ``batch["group_mask"]`` ([B, S], optional) narrows the tokens L_GA and the r_ze metrics see.

    Rows run in groups of similar length (:func:`length_chunks`, at most ``max_chunks``), so
    short rollouts next to long text blocks cost little padding. Every term is computed on the
    real tokens of all groups together, so the loss is that of the whole batch in one forward.

    Under data parallelism ``batch`` is this process's share of the global batch, and
    ``global_batch`` says how it is split: every term (NLL, KL, allocation and hidden-state
    losses, and L_GA's token statistics) is normalised over the global batch, the loss and the
    loss metrics are this process's shares (their average over processes is the global batch's
    value) and the r_ze metrics are those of the global batch.
    """
    mask = batch["attention_mask"].bool()
    if not (mask[:, 1:] <= mask[:, :-1]).all():
        raise ZedaError("SFT batches must be right-padded")
    chunks = length_chunks(mask.sum(dim=1), max_chunks)
    pieces = [_chunk_forward(model, teacher, batch, rows, config) for rows in chunks]

    def joined(key: str) -> torch.Tensor:
        return torch.cat([piece[key] for piece in pieces])

    def joined_layers(key: str) -> list[torch.Tensor]:
        return [torch.cat(layer) for layer in zip(*(piece[key] for piece in pieces), strict=True)]

    logits, targets = joined("logits"), joined("targets")
    nll = token_nll(logits, targets, global_batch)
    group = config.group_loss
    l_ga = group_aux_loss_of_layers(
        joined_layers("probs"),
        joined_layers("zero"),
        num_experts,
        None,
        group.zero_group_weight,
        group.alpha,
        joined("sequence") if group.per_sequence else None,
        group.pool_layers,
        global_batch,
    )
    loss = nll + l_ga
    counts = global_batch.total(torch.stack([piece["counts"] for piece in pieces]).sum(dim=0)).double()  # [L, 2]
    per_layer = (counts[:, 1] / counts.sum(dim=1)).tolist()
    metrics = {"nll": nll.item(), "l_ga": l_ga.item(), "r_ze": float(counts[:, 1].sum() / counts.sum())}
    metrics |= {f"r_ze_layer{i}": ratio for i, ratio in enumerate(per_layer)}
    if "teacher_logits" in pieces[0] and config.kl_weight > 0:
        # Every position with kl_tokens "all": a full slice, so the logits are not copied.
        covered = targets != -100 if config.kl_tokens == "completion" else slice(None)
        per_token = logits_forward_kl(joined("teacher_logits")[covered], logits[covered])
        kl = global_batch.mean(per_token.sum(), per_token.numel())
        loss = loss + config.kl_weight * kl
        metrics["kl"] = kl.item()
        if config.allocation_weight > 0:
            chosen = joined("next_group")[covered]
            layers = joined_layers("next_probs")
            zero_probs = torch.stack([probs[covered][chosen, num_experts:].sum(-1) for probs in layers])
            next_rows = joined("next_row")[covered][chosen]
            allocation = zero_allocation_loss(zero_probs, per_token[chosen], next_rows, global_batch)
            loss = loss + config.allocation_weight * allocation
            metrics["allocation"] = allocation.item()
    if "teacher_hidden" in pieces[0]:
        hidden = hidden_state_loss(joined_layers("teacher_hidden"), joined_layers("hidden"), global_batch=global_batch)
        loss = loss + config.hidden_weight * hidden
        metrics["hidden"] = hidden.item()
    return loss, metrics


def text_mix_blocks(tokenizer: PreTrainedTokenizerBase, text: TextMixConfig, seed: int) -> torch.Tensor | None:
    """[num_blocks, block_size] token blocks of the text mix, or None when it is off.

    Raises:
        ZedaError: the text file is missing, malformed, or has no ``text`` records.
    """
    if text.rows == 0:
        return None
    documents = []
    for where, record in read_user_jsonl(text.path, "text file"):
        if not isinstance(record.get("text"), str):
            raise ZedaError(f"{where}: needs a string field 'text'")
        documents.append(record["text"])
    if not documents:
        raise ZedaError(f"text file {text.path} has no records")
    return pack_blocks(tokenizer, documents, text.block_size, seed)


def rollout_text_batch(
    accelerator: Accelerator,
    step: int,
    records: list[dict[str, Any]],
    text_blocks: torch.Tensor | None,
    batch_size: int,
    text: TextMixConfig,
    seed: int,
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """This process's share of step ``step``'s stage-1 batch: ``batch_size`` rollouts, then ``text.rows`` text blocks.

    Returns :func:`collate`'s right-padded batch ([B, S] ``input_ids``, ``attention_mask``,
    ``labels``); unless ``text.in_group_loss``, ``group_mask`` [B, S] leaves the text rows out of
    L_GA and the r_ze metrics. The rows depend only on ``step`` and ``seed``, so every recipe that
    reads the same rollouts and text (ZEDA stage 1, same-data AdaMoE) sees the same batches.
    """
    rows = process_rows(accelerator, step, batch_size, len(records), seed).tolist()
    chosen = [records[i] for i in rows]
    if text_blocks is not None:
        text_rows = process_rows(accelerator, step, text.rows, len(text_blocks), seed + 1)
        chosen += [{"prompt_ids": [], "completion_ids": text_blocks[i].tolist()} for i in text_rows.tolist()]
    batch = collate(chosen, pad_id, accelerator.device)
    if text_blocks is not None and not text.in_group_loss:
        group_mask = batch["attention_mask"].clone()
        group_mask[len(rows) :] = 0
        batch["group_mask"] = group_mask
    return batch


def build_student(config: SftConfig) -> tuple[torch.nn.Module, int]:
    """(student, N): the teacher with Z zero experts injected, all or only router parameters trainable."""
    if config.zero_experts < 1:
        raise ZedaError(f"zero_experts must be >= 1, got {config.zero_experts}")
    student = load_model(config.teacher, zero_aware=False)
    spec = inject_zero_experts(student, config.zero_experts, init=config.init, seed=config.seed)
    if config.trainable == "router":
        student.requires_grad_(False)
        for block in moe_blocks(student):
            block.gate.requires_grad_(True)
    return student, spec.num_experts


def train_sft(config: SftConfig, resume: bool = False) -> Path:
    """Rollouts (cached), then SFT of the student; returns ``config.out``."""
    accelerator = make_accelerator()
    config = config.model_copy(update={"teacher": resolve_checkpoint(config.teacher)})
    tokenizer = AutoTokenizer.from_pretrained(config.teacher)
    prompts = load_prompts(config.prompts)
    cache = config.run_dir / "rollouts.jsonl"
    if accelerator.is_main_process:
        teacher = load_model(config.teacher)
        teacher_rollouts(teacher, tokenizer, prompts, cache, config.rollout, config.seed)
        del teacher
    accelerator.wait_for_everyone()
    records = cached_rollouts(cache, prompts)
    text_blocks = text_mix_blocks(tokenizer, config.text, config.seed)
    student, num_experts = build_student(config)
    set_moe_backend(student, config.moe_backend, device=accelerator.device)
    distils = config.kl_weight > 0 or config.hidden_weight > 0
    teacher = load_model(config.teacher).to(accelerator.device) if distils else None
    global_batch = global_batch_of(accelerator)
    # Sharded parameters are gathered at every forward, so every process must run as many
    # forwards: the batch runs in one group (more padding, but the same loss).
    max_chunks = 1 if shards_parameters(accelerator) else MAX_CHUNKS

    def step_loss(model: torch.nn.Module, step: int, acc: Accelerator) -> tuple[torch.Tensor, dict[str, float]]:
        batch = rollout_text_batch(
            acc, step, records, text_blocks, config.batch_size, config.text, config.seed, tokenizer.pad_token_id
        )
        loss, metrics = sft_loss(model, batch, num_experts, config, teacher, max_chunks, global_batch)
        return loss, metrics | {"tokens": float(batch["attention_mask"].sum())}

    target = group_aux_target_ratio(num_experts, config.zero_experts, config.group_loss.zero_group_weight)

    def ramp(model: torch.nn.Module, done: int, metrics: dict[str, float]) -> None:
        if done <= config.zero_ramp_steps:
            keys = sorted((k for k in metrics if k.startswith("r_ze_layer")), key=lambda k: int(k[len("r_ze_layer") :]))
            # The same measured shares on every process, so replicated offsets stay equal.
            ratios = reduce(torch.tensor([metrics[k] for k in keys], device=accelerator.device), "mean").tolist()
            scheduled = target * done / config.zero_ramp_steps
            nudge_zero_bias(model, ratios, [scheduled] * len(ratios), config.zero_ramp_step_size)

    after_step = ramp if config.init == "preserve" and config.zero_ramp_steps else None
    if after_step is not None and deepspeed_zero3(accelerator):
        raise ZedaError("the zero ramp moves zero-row offsets that DeepSpeed ZeRO-3 partitions: use FSDP2")
    model, log = run_training(accelerator, student, config.optim, config.run_dir, step_loss, resume, "sft", after_step)
    if accelerator.is_main_process:
        _save_student(model, config, log, num_experts)
    accelerator.wait_for_everyone()
    return config.out


def _save_student(model: torch.nn.Module, config: SftConfig, log: MetricsLog, num_experts: int) -> None:
    target = group_aux_target_ratio(num_experts, config.zero_experts, config.group_loss.zero_group_weight)
    summary = {"stage": "sft", "config": json.loads(config.model_dump_json()), "target_zero_ratio": target}
    curves = ["loss", "nll", "l_ga", "r_ze", "kl", "hidden"]
    save_trained_model(
        model, config.out, Path(config.teacher), log, curves, config.run_dir / "curves.png", "ZEDA SFT", summary
    )
