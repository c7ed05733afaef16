"""The AdaMoE baseline (Zeng et al., 2024): null experts, a raised top-k, and load-balance fine-tuning.

From the original model: Z null (zero) experts are added to every router, top-k goes from K to
``top_k``, and the model is fine-tuned with the language-modelling loss plus a load-balance loss
over all N + Z rows. There is no teacher logit, no KL and no group loss. The number of null
experts sets the FLOP level: balanced routing sends about ``top_k * N / (N + Z)`` slots per token
to real experts. What it is fine-tuned on (``data``):

- ``rollouts``: ZEDA stage 1's data, batch for batch: the frozen teacher's greedy rollouts of the
  SFT prompts (NLL on the completions) and blocks of training text (NLL on every token). This is
  what a user converting a post-trained model has: prompts and the teacher, no labels.
- ``labels``: the packed pretraining documents, which hold the ground-truth answers of the skills
  training split (the AdaMoE paper's task fine-tuning; on the tiny models the skills test split
  is drawn from the same generators).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from zeda_core.checkpoint import load_model, resolve_checkpoint
from zeda_core.convert import inject_zero_experts
from zeda_core.losses import GlobalBatch, causal_lm_loss, load_balance_loss, token_nll
from zeda_core.recording import RoutingRecorder, record_routing
from zeda_trainer.common.loop import OptimConfig, global_batch_of, make_accelerator, process_rows, run_training
from zeda_trainer.common.metrics import save_trained_model
from zeda_trainer.common.prompts import load_prompts
from zeda_trainer.data.packing import pack_blocks, pretraining_documents
from zeda_trainer.stages.rollouts import RolloutConfig, cached_rollouts, teacher_rollouts
from zeda_trainer.stages.sft import TextMixConfig, rollout_text_batch, text_mix_blocks

LmTerms = tuple[torch.Tensor, RoutingRecorder, float]
"""(LM loss, the routing record of its forward, tokens in the batch) of one step."""


class AdaMoeConfig(BaseModel):
    """AdaMoE recipe (YAML keys; ``--set key=value`` overrides them)."""

    model_config = ConfigDict(extra="forbid")
    teacher: Path = Path("models/tiny-teacher")
    data: Literal["labels", "rollouts"] = "labels"
    data_dir: Path = Path("build/data")
    num_null_experts: int = Field(default=8, ge=1)
    top_k: int = Field(default=3, ge=1)
    lb_coef: float = Field(default=0.05, ge=0.0)
    block_size: int = Field(default=256, ge=8)
    """``labels``: tokens per packed pretraining block."""
    batch_size: int = Field(default=16, ge=1)
    """``labels``: blocks per batch; ``rollouts``: teacher rollouts per batch (plus ``text.rows`` text blocks)."""
    prompts: Path = Path("build/data/prompts/sft.jsonl")
    """``rollouts``: the prompts the teacher completes (ZEDA stage 1's)."""
    rollout: RolloutConfig = RolloutConfig()
    rollout_cache: Path | None = None
    """``rollouts``: where the rollouts are cached (default ``run_dir/rollouts.jsonl``); a ZEDA
    stage-1 run's ``rollouts.jsonl`` with the same prompts and rollout settings holds the same ones."""
    text: TextMixConfig = TextMixConfig(rows=16, in_group_loss=False)
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
    global_batch = global_batch_of(accelerator)
    if config.data == "labels":
        blocks = pack_blocks(tokenizer, pretraining_documents(config.data_dir), config.block_size, config.seed)

        def lm_loss(model: torch.nn.Module, step: int, acc: Accelerator) -> LmTerms:
            batch = blocks[process_rows(acc, step, config.batch_size, blocks.shape[0], config.seed)].to(acc.device)
            with record_routing(keep_probs=True) as recorder:
                lm = causal_lm_loss(model(input_ids=batch).logits, batch, global_batch)
            return lm, recorder, float(batch.numel())

    else:
        lm_loss = _rollout_lm_loss(config, tokenizer, accelerator, global_batch)

    def step_loss(model: torch.nn.Module, step: int, acc: Accelerator) -> tuple[torch.Tensor, dict[str, float]]:
        lm, recorder, tokens = lm_loss(model, step, acc)
        balance = load_balance_loss(recorder, global_batch)
        counts = global_batch.total(recorder.slot_counts().sum(dim=(0, 1))).double()
        metrics = {"lm": lm.item(), "load_balance": balance.item(), "r_ze": float(counts[1] / counts.sum())}
        return lm + config.lb_coef * balance, metrics | {"tokens": tokens}

    model, log = run_training(
        accelerator, build_adamoe_model(config), config.optim, config.run_dir, step_loss, resume, "adamoe"
    )
    if accelerator.is_main_process:
        summary = {"stage": "adamoe", "config": json.loads(config.model_dump_json())}
        curves = ["loss", "lm", "load_balance", "r_ze"]
        save_trained_model(model, config.out, source, log, curves, config.run_dir / "curves.png", "AdaMoE", summary)
    accelerator.wait_for_everyone()
    return config.out


def _rollout_lm_loss(
    config: AdaMoeConfig, tokenizer: PreTrainedTokenizerBase, accelerator: Accelerator, global_batch: GlobalBatch
) -> Callable[[torch.nn.Module, int, Accelerator], LmTerms]:
    """The ``rollouts`` data's LM loss of a step: NLL of the teacher's completions and of the text blocks
    (padding enters neither it nor the routing record).

    The rollouts are generated once into the cache (greedy, like ZEDA stage 1's), on the main process.
    """
    prompts = load_prompts(config.prompts)
    cache = config.rollout_cache or config.run_dir / "rollouts.jsonl"
    if accelerator.is_main_process:
        teacher = load_model(resolve_checkpoint(config.teacher))
        teacher_rollouts(teacher, tokenizer, prompts, cache, config.rollout, config.seed)
        del teacher
    accelerator.wait_for_everyone()
    records = cached_rollouts(cache, prompts)
    text_blocks = text_mix_blocks(tokenizer, config.text, config.seed)

    def lm_loss(model: torch.nn.Module, step: int, acc: Accelerator) -> LmTerms:
        batch = rollout_text_batch(
            acc, step, records, text_blocks, config.batch_size, config.text, config.seed, tokenizer.pad_token_id
        )
        with record_routing(token_mask=batch["attention_mask"].bool(), keep_probs=True) as recorder:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = token_nll(logits[:, :-1], batch["labels"][:, 1:], global_batch)
        return nll, recorder, float(batch["attention_mask"].sum())

    return lm_loss
