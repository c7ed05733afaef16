"""The training loop shared by every stage: AdamW, cosine schedule, accelerate, resumable checkpoints.

A stage supplies ``step_loss(model, step, accelerator) -> (loss, metrics)``: the loss of this
process's share of global batch ``step``. Because the batch is a function of the step alone, a
resumed run sees exactly the batches an uninterrupted run would have seen.

Loss terms are normalised over the global batch (:func:`global_batch_of`): each process returns its
share of the whole batch's loss, so the gradients that DDP averages over processes, and the loss
and metrics that are logged (averaged over processes), are those of the global batch in one
process, whatever the number of processes and however unevenly the valid tokens fall on them.

Under FSDP2 (or DeepSpeed ZeRO-3) the same holds: the gradients are reduce-scattered instead of
all-reduced, the checkpoints are saved as accelerate's sharded state, and the trained model is
gathered into a plain module at the end (:mod:`zeda_trainer.common.sharding`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from zeda_core.losses import GlobalBatch
from zeda_trainer.common.checkpointing import load_latest_checkpoint, save_checkpoint
from zeda_trainer.common.metrics import MetricsLog
from zeda_trainer.common.sharding import (
    deepspeed_process_group,
    enable_fsdp_on_cpu,
    gathered_model,
    plain_twin,
    prepare_deepspeed,
    shards_parameters,
    zero3_leaf_blocks,
)
from zeda_trainer.data.packing import global_batch_rows

StepLoss = Callable[[torch.nn.Module, int, Accelerator], tuple[torch.Tensor, dict[str, float]]]


class OptimConfig(BaseModel):
    """Optimizer, schedule and bookkeeping of one training stage."""

    model_config = ConfigDict(extra="forbid")
    max_steps: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    log_every: int = 10
    checkpoint_every: int = 100


def make_accelerator() -> Accelerator:
    """The accelerator of every stage.

    Each global batch is split across processes, so the schedule steps once per optimizer step
    (``split_batches``). Under DDP an expert that gets no token on one rank leaves parameters
    without gradients, so unused parameters are allowed. CPU processes launched with an FSDP
    config run FSDP, and DeepSpeed processes get what they need without a dataloader or a GPU
    (:mod:`zeda_trainer.common.sharding`).
    """
    accelerator = Accelerator(
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True), *deepspeed_process_group()],
    )
    enable_fsdp_on_cpu(accelerator)
    prepare_deepspeed(accelerator)
    return accelerator


def global_batch_of(accelerator: Accelerator) -> GlobalBatch:
    """How a stage's ``step_loss`` normalises its loss terms: over the global batch of all processes.

    The loop steps the optimizer on every batch (no gradient accumulation), and accelerate
    averages the gradients over its processes, each of which holds a share of the batch.
    """
    return GlobalBatch(accelerator.num_processes)


def process_rows(accelerator: Accelerator, step: int, batch_size: int, num_rows: int, seed: int) -> torch.Tensor:
    """This process's share of step ``step``'s global batch of ``batch_size`` row indices (of ``num_rows``).

    Every process takes every ``num_processes``-th row of the same global batch, from its own rank on,
    so together they cover it once (:func:`~zeda_trainer.data.packing.global_batch_rows`).
    """
    rows = global_batch_rows(step, batch_size, num_rows, seed)
    return rows[accelerator.process_index :: accelerator.num_processes]


def run_training(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optim: OptimConfig,
    run_dir: Path,
    step_loss: StepLoss,
    resume: bool,
    desc: str,
    after_step: Callable[[torch.nn.Module, int, dict[str, float]], None] | None = None,
) -> tuple[torch.nn.Module, MetricsLog]:
    """Train the parameters of ``model`` that require grad; returns (unwrapped model, metrics log).

    With sharded parameters the returned model is a plain module holding the gathered weights
    on the main process (every process must reach the end of training).

    ``after_step(unwrapped_model, steps_done, step_metrics)`` runs after every optimizer step; it
    must depend only on the step, the model and the step's metrics, so that a resumed run
    repeats it exactly.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": optim.weight_decay},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=optim.lr,
        betas=optim.betas,
    )
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, optim.warmup_steps, optim.max_steps, min_lr_rate=optim.min_lr_ratio
    )
    twin = plain_twin(model) if shards_parameters(accelerator) else None
    zero3_leaf_blocks(accelerator, model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # FSDP2 replaces every parameter by its shard: clip the prepared model's parameters.
    clipped = [p for p in model.parameters() if p.requires_grad]
    state = load_latest_checkpoint(accelerator, run_dir) if resume else None
    start = state["step"] if state else 0
    log = MetricsLog(
        run_dir / "metrics.jsonl", resume_step=start if resume else None, enabled=accelerator.is_main_process
    )
    model.train()
    progress = tqdm(
        range(start, optim.max_steps),
        initial=start,
        total=optim.max_steps,
        desc=desc,
        disable=not accelerator.is_main_process,
    )
    tick, tokens = time.perf_counter(), 0.0
    for step in progress:
        loss, metrics = step_loss(model, step, accelerator)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(clipped, optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(accelerator.unwrap_model(model), step + 1, metrics)
        tokens += metrics.pop("tokens", 0.0) * accelerator.num_processes
        done = step + 1
        if done % optim.log_every == 0 or done == optim.max_steps:
            # The average over processes of their shares: the global batch's loss, on every process.
            values = torch.tensor([loss.detach().float().item(), *metrics.values()], device=accelerator.device)
            values = accelerator.reduce(values, reduction="mean").tolist()
            record = {"step": done, "loss": values[0], "lr": scheduler.get_last_lr()[0]}
            record |= dict(zip(metrics, values[1:], strict=True))
            record["tokens_per_s"] = tokens / (time.perf_counter() - tick)
            record["processes"] = accelerator.num_processes
            log.log(record)
            progress.set_postfix(loss=f"{values[0]:.3f}")
            tick, tokens = time.perf_counter(), 0.0
        if done % optim.checkpoint_every == 0 or done == optim.max_steps:
            save_checkpoint(accelerator, run_dir, done, {"stage": desc})
    if twin is not None:
        return gathered_model(accelerator, model, twin), log
    return accelerator.unwrap_model(model), log
