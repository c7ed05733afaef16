"""Pretrain the tiny Qwen3-MoE teacher on the local data with accelerate.

One process on CPU, one GPU, or several processes under ``accelerate launch`` (each takes its
share of every global batch). Resumable at any checkpoint with exactly the same data order.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator
from pydantic import BaseModel, ConfigDict
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from zeda_core.losses import causal_lm_loss
from zeda_trainer.common.loop import OptimConfig, global_batch_of, make_accelerator, process_rows, run_training
from zeda_trainer.common.metrics import MetricsLog, save_trained_model
from zeda_trainer.data.build import build_dataset
from zeda_trainer.data.packing import pack_blocks, pretraining_documents, read_jsonl
from zeda_trainer.data.tokenizer import chat_text, train_tokenizer


class TeacherShape(BaseModel):
    """Qwen3-MoE dimensions of the tiny teacher."""

    model_config = ConfigDict(extra="forbid")
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256
    vocab_size: int = 1024
    max_position_embeddings: int = 1024
    router_aux_loss_coef: float = 0.01


class PretrainConfig(BaseModel):
    """Teacher pretraining recipe (YAML keys; CLI flags override them)."""

    model_config = ConfigDict(extra="forbid")
    data_dir: Path = Path("build/data")
    data_seed: int = 0
    run_dir: Path = Path("build/runs/tiny-teacher")
    out: Path = Path("models/tiny-teacher")
    seed: int = 0
    shape: TeacherShape = TeacherShape()
    block_size: int = 256
    batch_size: int = 32
    optim: OptimConfig = OptimConfig(max_steps=2000, lr=2e-3, warmup_steps=100, checkpoint_every=200)


def prepare_tokenizer(config: PretrainConfig):
    """The run's tokenizer, trained on the training split once and reused on resume."""
    directory = config.run_dir / "tokenizer"
    if (directory / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(directory)
    skills = read_jsonl(config.data_dir / "skills" / "train.jsonl")[::20]
    texts = [row["text"] for row in read_jsonl(config.data_dir / "text" / "train.jsonl")]
    tokenizer = train_tokenizer(
        [*texts, *(chat_text(r["prompt"], r["answer"]) for r in skills)], config.shape.vocab_size
    )
    tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def build_teacher(config: PretrainConfig, tokenizer) -> torch.nn.Module:
    shape = config.shape.model_dump()
    model_config = AutoConfig.for_model(
        "qwen3_moe",
        **shape,
        intermediate_size=4 * shape["hidden_size"],
        norm_topk_prob=True,
        output_router_logits=True,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    return AutoModelForCausalLM.from_config(model_config)


def pretrain(config: PretrainConfig, resume: bool = False) -> Path:
    """Train the teacher; returns the directory of the saved model (``config.out``)."""
    accelerator = make_accelerator()
    if accelerator.is_main_process and not (config.data_dir / "manifest.json").is_file():
        build_dataset(config.data_dir, seed=config.data_seed)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        prepare_tokenizer(config)
    accelerator.wait_for_everyone()
    tokenizer = prepare_tokenizer(config)
    blocks = pack_blocks(tokenizer, pretraining_documents(config.data_dir), config.block_size, config.seed)
    global_batch = global_batch_of(accelerator)

    def step_loss(model: torch.nn.Module, step: int, acc: Accelerator) -> tuple[torch.Tensor, dict[str, float]]:
        batch = blocks[process_rows(acc, step, config.batch_size, blocks.shape[0], config.seed)].to(acc.device)
        epoch = (step + 1) * config.batch_size / blocks.shape[0]
        output = model(input_ids=batch)
        # The next-token NLL over the global batch; HF's router aux loss is a per-process statistic.
        loss = causal_lm_loss(output.logits, batch, global_batch) + config.shape.router_aux_loss_coef * output.aux_loss
        return loss, {"epoch": epoch, "tokens": float(batch.numel())}

    model, log = run_training(
        accelerator, build_teacher(config, tokenizer), config.optim, config.run_dir, step_loss, resume, "pretrain"
    )
    if accelerator.is_main_process:
        _save_teacher(model, config, log)
    accelerator.wait_for_everyone()
    return config.out


def _save_teacher(model: torch.nn.Module, config: PretrainConfig, log: MetricsLog) -> None:
    model.config.output_router_logits = False
    params = sum(p.numel() for p in model.parameters())
    shape = config.shape
    expert = 3 * shape.hidden_size * shape.moe_intermediate_size
    active = params - shape.num_hidden_layers * (shape.num_experts - shape.num_experts_per_tok) * expert
    summary = {"config": json.loads(config.model_dump_json()), "parameters": params, "active_parameters": active}
    save_trained_model(
        model,
        config.out,
        config.run_dir / "tokenizer",
        log,
        ["loss", "lr", "tokens_per_s"],
        config.run_dir / "curves.png",
        "tiny teacher pretraining",
        summary,
    )
