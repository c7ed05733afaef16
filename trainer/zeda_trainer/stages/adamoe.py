"""The AdaMoE baseline (Zeng et al., 2024): null experts, a raised top-k, and load-balance fine-tuning.

From the original model: Z null (zero) experts are added to every router, top-k goes from K to
``top_k``, and the model is fine-tuned on the task data (the same packed documents the teacher
was pretrained on) with the language-modelling loss plus a load-balance loss over all N + Z
rows. There is no teacher and no group loss. The number of null experts sets the FLOP level:
balanced routing sends about ``top_k * N / (N + Z)`` slots per token to real experts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoTokenizer

from zeda_core.checkpoint import load_model, resolve_checkpoint
from zeda_core.convert import inject_zero_experts
from zeda_core.losses import causal_lm_loss, load_balance_loss
from zeda_core.recording import record_routing
from zeda_trainer.common.loop import OptimConfig, global_batch_of, make_accelerator, process_rows, run_training
from zeda_trainer.common.metrics import save_trained_model
from zeda_trainer.data.packing import pack_blocks, pretraining_documents


class AdaMoeConfig(BaseModel):
    """AdaMoE recipe (YAML keys; ``--set key=value`` overrides them)."""

    model_config = ConfigDict(extra="forbid")
    teacher: Path = Path("models/tiny-teacher")
    data_dir: Path = Path("build/data")
    num_null_experts: int = Field(default=8, ge=1)
    top_k: int = Field(default=3, ge=1)
    lb_coef: float = Field(default=0.05, ge=0.0)
    block_size: int = Field(default=256, ge=8)
    batch_size: int = Field(default=16, ge=1)
    seed: int = 0
    run_dir: Path = Path("build/runs/adamoe")
    out: Path = Path("build/models/adamoe")
    optim: OptimConfig = OptimConfig(max_steps=200, lr=3e-4, warmup_steps=10, weight_decay=0.0, checkpoint_every=50)


def build_adamoe_model(config: AdaMoeConfig) -> torch.nn.Module:
    """The original model with ``num_null_experts`` null experts and top-k raised to ``config.top_k``."""
    model = load_model(resolve_checkpoint(config.teacher), zero_aware=False)
    model.config.num_experts_per_tok = config.top_k
    inject_zero_experts(model, config.num_null_experts, init="gaussian", seed=config.seed)
    return model


def train_adamoe(config: AdaMoeConfig, resume: bool = False) -> Path:
    """Fine-tune the AdaMoE model; returns ``config.out``."""
    accelerator = make_accelerator()
    source = resolve_checkpoint(config.teacher)
    tokenizer = AutoTokenizer.from_pretrained(source)
    blocks = pack_blocks(tokenizer, pretraining_documents(config.data_dir), config.block_size, config.seed)
    global_batch = global_batch_of(accelerator)

    def step_loss(model: torch.nn.Module, step: int, acc: Accelerator) -> tuple[torch.Tensor, dict[str, float]]:
        batch = blocks[process_rows(acc, step, config.batch_size, blocks.shape[0], config.seed)].to(acc.device)
        with record_routing(keep_probs=True) as recorder:
            lm = causal_lm_loss(model(input_ids=batch).logits, batch, global_batch)
        balance = load_balance_loss(recorder, global_batch)
        counts = global_batch.total(recorder.slot_counts().sum(dim=(0, 1))).double()
        metrics = {"lm": lm.item(), "load_balance": balance.item(), "r_ze": float(counts[1] / counts.sum())}
        return lm + config.lb_coef * balance, metrics | {"tokens": float(batch.numel())}

    model, log = run_training(
        accelerator, build_adamoe_model(config), config.optim, config.run_dir, step_loss, resume, "adamoe"
    )
    if accelerator.is_main_process:
        summary = {"stage": "adamoe", "config": json.loads(config.model_dump_json())}
        curves = ["loss", "lm", "load_balance", "r_ze"]
        save_trained_model(model, config.out, source, log, curves, config.run_dir / "curves.png", "AdaMoE", summary)
    accelerator.wait_for_everyone()
    return config.out
