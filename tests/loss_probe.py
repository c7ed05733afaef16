"""Losses and gradients of fixed global batches, for the distributed test: ``loss_probe.py OUT``.

Under ``accelerate launch`` each process takes its share of every global batch (rows
``rank::world``, as the stages split them), so the processes hold unequal numbers of valid
tokens. Per case (SFT and OPD losses of a tiny random zero-expert model), each process writes to
``OUT.<rank>`` (``torch.save``): the loss and metrics averaged over processes, as the training
loop logs them, the gradients after DDP's average, and its own count of valid tokens. Run
without ``accelerate launch``, it is the one-process reference on the same global batches.
"""

import copy
import sys
from collections.abc import Callable

import torch
from accelerate import Accelerator
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoConfig, AutoModelForCausalLM

from zeda_core import inject_zero_experts
from zeda_core.losses import GlobalBatch
from zeda_trainer.common.generation import Generation
from zeda_trainer.common.group_loss import GroupLossConfig
from zeda_trainer.common.loop import global_batch_of, make_accelerator
from zeda_trainer.stages.opd import OpdConfig, build_batch, opd_loss, policy_forward
from zeda_trainer.stages.sft import SftConfig, collate, sft_loss

NUM_EXPERTS, NUM_ZERO, VOCAB = 4, 2, 64
# (prompt, completion) lengths of the global batch: with 2 processes, rank 0 takes rows 0, 2, 4
# (6 completion tokens), rank 1 rows 1, 3 (26).
LENGTHS = [(3, 2), (4, 12), (2, 3), (5, 14), (3, 1)]


def tiny_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(student with zero experts, teacher): random 2-layer Qwen3-MoEs, the same in every process.

    The teacher is initialised apart from the student, so the KL, and the allocation loss's
    difficulty, are far from 0 (a tiny KL would be float noise).
    """
    config = AutoConfig.for_model(
        "qwen3_moe",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(config)
    inject_zero_experts(student, NUM_ZERO, init="gaussian", seed=0)
    torch.manual_seed(1)
    return student, AutoModelForCausalLM.from_config(config).eval()


def global_records() -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(1)
    return [
        {
            "prompt_ids": torch.randint(1, VOCAB, (prompt,), generator=generator).tolist(),
            "completion_ids": torch.randint(1, VOCAB, (completion,), generator=generator).tolist(),
        }
        for prompt, completion in LENGTHS
    ]


def opd_batch(model: torch.nn.Module, records: list[dict[str, list[int]]], rows: list[int], device: torch.device):
    """The on-policy batch of ``rows``, with per-row random teacher scores and off-policy old log-probs."""
    generator = torch.Generator().manual_seed(2)
    scores = [torch.randn(len(r["completion_ids"]), generator=generator).tolist() for r in records]
    shifts = [0.3 * torch.randn(len(r["prompt_ids"] + r["completion_ids"]) - 1, generator=generator) for r in records]
    chosen = [records[i] for i in rows]
    generations = [Generation(r["completion_ids"], "length", 0, None) for r in chosen]
    prompts = [r["prompt_ids"] for r in chosen]
    batch = build_batch(prompts, generations, [scores[i] for i in rows], 0, NUM_EXPERTS + NUM_ZERO, device)
    with torch.no_grad():
        logprobs = policy_forward(model, batch, keep_probs=False)[0]
    # Old log-probs off the current policy, so that the clip is active on some tokens.
    batch.old_logprobs = logprobs + pad_sequence([shifts[i] for i in rows], batch_first=True).to(device)
    return batch


def run_case(
    accelerator: Accelerator,
    student: torch.nn.Module,
    loss_of: Callable[[torch.nn.Module], tuple[torch.Tensor, dict[str, float]]],
) -> dict[str, object]:
    """One forward and backward of a fresh copy of ``student`` under DDP."""
    model = accelerator.prepare(copy.deepcopy(student))
    loss, metrics = loss_of(model)
    accelerator.backward(loss)
    logged = accelerator.reduce(torch.tensor([loss.item(), *metrics.values()]), reduction="mean")
    grads = {
        name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for name, p in accelerator.unwrap_model(model).named_parameters()
    }
    return {"loss": logged[0], "metrics": dict(zip(metrics, logged[1:].tolist(), strict=True)), "grads": grads}


def main(out: str) -> None:
    accelerator = make_accelerator()
    global_batch: GlobalBatch = global_batch_of(accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    student, teacher = tiny_models()
    records = global_records()
    rows = list(range(len(records)))[rank::world]
    sft_batch = collate([records[i] for i in rows], 0, accelerator.device)
    sft_configs = {
        "sft": SftConfig(kl_weight=1.0, hidden_weight=0.5, allocation_weight=0.5),
        "sft-per-sequence": SftConfig(
            kl_weight=1.0,
            kl_tokens="all",
            allocation_weight=0.5,
            group_loss=GroupLossConfig(per_sequence=True, pool_layers=True),
        ),
    }
    opd_configs = {
        "opd": OpdConfig(),
        "opd-per-sequence": OpdConfig(group_loss=GroupLossConfig(alpha=1.0, per_sequence=True)),
    }
    on_policy = opd_batch(student, records, rows, accelerator.device)
    results: dict[str, object] = {"valid_tokens": int((sft_batch["labels"] != -100).sum())}
    for name, config in sft_configs.items():
        results[name] = run_case(
            accelerator,
            student,
            lambda model, c=config: sft_loss(model, sft_batch, NUM_EXPERTS, c, teacher, global_batch=global_batch),
        )
    for name, config in opd_configs.items():
        results[name] = run_case(
            accelerator, student, lambda model, c=config: opd_loss(model, on_policy, NUM_EXPERTS, c, global_batch)
        )
    torch.save(results, f"{out}.{rank}")


if __name__ == "__main__":
    main(sys.argv[1])
