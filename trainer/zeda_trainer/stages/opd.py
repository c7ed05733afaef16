"""Stage 2 of ZEDA: on-policy distillation (OPD) of the zero-expert student.

Each sample batch: the student samples completions of OPD prompts (temperature 1 by default),
recording the experts it routed every token to; the frozen teacher scores every sampled token;
the per-token advantage is ``log p_T(y_t) - log p_S_old(y_t)``. The student then takes
``updates_per_batch`` optimizer steps on the PPO-clipped objective plus L_GA, its forward
replaying the recorded routes (routing replay), so the policy that is updated is the one that
sampled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from zeda_core.batching import pad_batch
from zeda_core.checkpoint import load_model, resolve_checkpoint
from zeda_core.errors import ZedaError
from zeda_core.losses import (
    ONE_PROCESS,
    GlobalBatch,
    group_aux_loss_over_layers,
    group_aux_target_ratio,
    token_logprobs,
)
from zeda_core.model_queries import model_spec, moe_blocks
from zeda_core.moe_backends import set_moe_backend
from zeda_core.recording import RoutingRecorder, record_routing
from zeda_trainer.common.generation import Generation, generate
from zeda_trainer.common.group_loss import GroupLossConfig
from zeda_trainer.common.loop import OptimConfig, global_batch_of, make_accelerator, run_training
from zeda_trainer.common.metrics import MetricsLog, save_trained_model
from zeda_trainer.common.prompts import encode_prompt, load_prompts
from zeda_trainer.common.sharding import deepspeed_zero3, full_parameters
from zeda_trainer.common.teacher import TeacherScorer, make_teacher
from zeda_trainer.data.packing import global_batch_rows


class SamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=1.0, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)


class OpdConfig(BaseModel):
    """OPD recipe (YAML keys; ``--set key=value`` overrides them).

    Each step samples ``samples_per_prompt`` completions of ``batch_size`` prompts (split across
    processes).
    """

    model_config = ConfigDict(extra="forbid")
    student: Path = Path("build/models/tiny-zeda-sft")
    teacher: str = "models/tiny-teacher"
    teacher_api_key: str | None = None
    teacher_cache: int = Field(default=4096, ge=0)
    prompts: Path = Path("build/data/prompts/opd.jsonl")
    run_dir: Path = Path("build/runs/tiny-opd")
    out: Path = Path("build/models/tiny-zeda")
    seed: int = 0
    batch_size: int = Field(default=32, ge=1)
    samples_per_prompt: int = Field(default=1, ge=1)
    updates_per_batch: int = Field(default=1, ge=1)
    sampling: SamplingConfig = SamplingConfig()
    clip_eps: float = Field(default=0.2, gt=0.0)
    advantage_tokens: Literal["completion", "all"] = "completion"
    """Targets the clipped loss covers: the sampled completion, or also every prompt token (the
    teacher scores the prompt as well, so the router keeps a dense signal on prompt tokens)."""
    routing_replay: bool = True
    group_loss: GroupLossConfig = GroupLossConfig(alpha=1.0)
    trainable: Literal["all", "router"] = "all"
    moe_backend: Literal["auto", "torch", "triton"] = "auto"
    """What computes the student's experts (forward and backward): ``auto`` (the Triton kernel on
    CUDA, torch on CPU), ``torch``, or ``triton`` (CUDA, or ``TRITON_INTERPRET=1`` on CPU)."""
    optim: OptimConfig = OptimConfig(max_steps=200, lr=1e-4, warmup_steps=10, betas=(0.9, 0.98))

    @model_validator(mode="after")
    def _exact_resume(self) -> OpdConfig:
        if self.optim.checkpoint_every % self.updates_per_batch:
            raise ValueError("optim.checkpoint_every must be a multiple of updates_per_batch (exact resume)")
        return self


@dataclass
class OnPolicyBatch:
    """Sampled sequences of one sample batch, right-padded to [B, W].

    Attributes:
        input_ids, attention_mask: [B, W] int64.
        completion_mask: [B, W - 1] bool, True where target token ``t + 1`` is a sampled token.
        loss_mask: [B, W - 1] bool, the targets of the clipped loss: the completion, or with
            ``advantage_tokens: all`` every real target.
        old_logprobs: [B, W - 1] float32 log-probs of the targets under the sampling policy.
        teacher_logprobs: [B, W - 1] float32 teacher log-probs of the targets (0 off the mask).
        replay: layer -> [B, W, K] expert ids taken while sampling (empty without replay).
        routed_mask: [B, W] bool, the tokens whose routing counts in r_ze and L_GA: real tokens,
            less the last sampled one under replay (it was never fed back, so it has no route).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    routed_mask: torch.Tensor
    completion_mask: torch.Tensor
    loss_mask: torch.Tensor
    old_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    replay: dict[int, torch.Tensor]


def clipped_policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps: float,
    global_batch: GlobalBatch = ONE_PROCESS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clip surrogate, mean over masked tokens; returns (loss, fraction of tokens clipped).

    All tensors are [B, T]; ``advantages`` carry no gradient. Both means are over the masked
    tokens of ``global_batch`` (this process's shares, see :class:`GlobalBatch`).
    """
    ratio = torch.exp(new_logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps, 1.0 + eps) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    weight = mask.float()
    count = global_batch.total(weight.sum())
    loss = global_batch.share((per_token * weight).sum(), count)
    clip_fraction = global_batch.share((((ratio - 1.0).abs() > eps).float() * weight).sum(), count)
    return loss, clip_fraction


def build_batch(
    prompts: list[list[int]],
    generations: list[Generation],
    teacher_scores: list[list[float]],
    pad_id: int,
    num_rows: int,
    device: torch.device,
    scored_from: list[int] | None = None,
) -> OnPolicyBatch:
    """Right-padded batch of prompt + completion; :class:`OnPolicySampler` fills in the old log-probs.

    ``teacher_scores[i]`` are the log-probs of ``sequence[scored_from[i]:]`` (default: the
    completion); the scored targets form the loss mask.
    """
    scored_from = scored_from or [len(p) for p in prompts]
    sequences = [p + g.tokens for p, g in zip(prompts, generations, strict=True)]
    ids, attention = pad_batch(sequences, pad_id)
    batch, width = ids.shape
    completion = torch.zeros((batch, width - 1), dtype=torch.bool)
    scored = torch.zeros_like(completion)
    teacher = torch.zeros((batch, width - 1), dtype=torch.float32)
    rows = zip(prompts, sequences, teacher_scores, scored_from, strict=True)
    for row, (prompt, sequence, scores, start) in enumerate(rows):
        completion[row, len(prompt) - 1 : len(sequence) - 1] = True
        scored[row, start - 1 : len(sequence) - 1] = True
        teacher[row, start - 1 : len(sequence) - 1] = torch.tensor(scores)
    replay: dict[int, torch.Tensor] = {}
    routed = attention.bool()
    if generations and generations[0].routes is not None:
        routed = torch.zeros_like(routed)
        for row, gen in enumerate(generations):
            routed[row, : gen.processed_tokens] = True
        for layer, first in generations[0].routes.items():
            # Tokens never fed back (the last sampled one, padding) get a zero slot: it costs nothing
            # and their outputs feed no target.
            forced = torch.full((batch, width, first.shape[-1]), num_rows - 1, dtype=torch.long)
            for row, gen in enumerate(generations):
                routes = gen.routes[layer]
                forced[row, : routes.shape[0]] = routes
            replay[layer] = forced.to(device)
    return OnPolicyBatch(
        ids.to(device),
        attention.to(device),
        routed.to(device),
        completion.to(device),
        scored.to(device),
        torch.zeros(0),
        teacher.to(device),
        replay,
    )


def policy_forward(
    model: torch.nn.Module, batch: OnPolicyBatch, keep_probs: bool
) -> tuple[torch.Tensor, RoutingRecorder]:
    """[B, W - 1] log-probs of the targets under ``model`` (routes replayed when recorded)."""
    with record_routing(token_mask=batch.routed_mask, keep_probs=keep_probs, replay=batch.replay) as rec:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return token_logprobs(logits[:, :-1], batch.input_ids[:, 1:]), rec


def opd_loss(
    model: torch.nn.Module,
    batch: OnPolicyBatch,
    num_experts: int,
    config: OpdConfig,
    global_batch: GlobalBatch = ONE_PROCESS,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clipped OPD loss + L_GA of one batch, and its metrics (real tokens only).

    Under data parallelism ``batch`` is this process's share of ``global_batch``: the clipped
    loss and L_GA are normalised over the global batch's tokens, the loss and the per-token
    metrics are this process's shares (their average over processes is the global batch's value)
    and the r_ze metrics are those of the global batch.
    """
    new_logprobs, recorder = policy_forward(model, batch, keep_probs=True)
    mask = batch.completion_mask
    advantages = (batch.teacher_logprobs - batch.old_logprobs).detach()
    policy, clip_fraction = clipped_policy_loss(
        new_logprobs, batch.old_logprobs, advantages, batch.loss_mask, config.clip_eps, global_batch
    )
    group = config.group_loss
    l_ga = group_aux_loss_over_layers(
        recorder,
        num_experts,
        group.zero_group_weight,
        group.alpha,
        group.per_sequence,
        group.pool_layers,
        global_batch,
    )
    counts = global_batch.total(recorder.slot_counts().sum(dim=0)).double()  # [L, 2]
    tokens = global_batch.total(mask.float().sum())
    metrics = {
        "policy": policy.item(),
        "l_ga": l_ga.item(),
        "r_ze": float(counts[:, 1].sum() / counts.sum()),
        # Mean advantage over sampled tokens = minus a sample estimate of KL(student || teacher).
        "reverse_kl": float(global_batch.share(-(advantages * mask).sum(), tokens)),
        "clip_fraction": clip_fraction.item(),
        "completion_tokens": float(global_batch.mean(mask.float().sum(), mask.shape[0])),
    }
    metrics |= {f"r_ze_layer{i}": float(c[1] / c.sum()) for i, c in enumerate(counts)}
    return policy + l_ga, metrics


class OnPolicySampler:
    """Samples and scores one batch per ``updates_per_batch`` steps, deterministically from the step.

    Under FSDP2 each process samples as many tokens as its completions need, so sampling runs on
    the gathered parameters (:func:`~zeda_trainer.common.sharding.full_parameters`).
    """

    def __init__(
        self,
        config: OpdConfig,
        tokenizer: PreTrainedTokenizerBase,
        prompts: list[list[int]],
        teacher: TeacherScorer,
        num_rows: int,
        rank: int,
        world: int,
    ) -> None:
        self.config, self.tokenizer, self.prompts, self.teacher = config, tokenizer, prompts, teacher
        self.num_rows, self.rank, self.world = num_rows, rank, world
        self.current: tuple[int, OnPolicyBatch] | None = None

    def batch(self, model: torch.nn.Module, step: int, device: torch.device) -> OnPolicyBatch:
        index = step // self.config.updates_per_batch
        if self.current is None or self.current[0] != index:
            self.current = (index, self._sample(model, index, device))
        return self.current[1]

    @torch.no_grad()
    def _sample(self, model: torch.nn.Module, index: int, device: torch.device) -> OnPolicyBatch:
        config = self.config
        rows = global_batch_rows(index, config.batch_size, len(self.prompts), config.seed)[self.rank :: self.world]
        prompts = [self.prompts[i] for i in rows.tolist() for _ in range(config.samples_per_prompt)]
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index * 7919 + self.rank)
        model.eval()
        with full_parameters(model):
            generations = generate(
                model,
                prompts,
                config.sampling.max_new_tokens,
                self.tokenizer.eos_token_id,
                self.tokenizer.pad_token_id,
                temperature=config.sampling.temperature,
                top_p=config.sampling.top_p,
                batch_size=len(prompts),
                generator=generator,
                record_routes=config.routing_replay,
            )
            sequences = [p + g.tokens for p, g in zip(prompts, generations, strict=True)]
            scored_from = [1 if config.advantage_tokens == "all" else len(p) for p in prompts]
            scores = self.teacher.score(sequences, scored_from)
            batch = build_batch(
                prompts, generations, scores, self.tokenizer.pad_token_id, self.num_rows, device, scored_from
            )
            batch.old_logprobs = policy_forward(model, batch, keep_probs=False)[0].detach()
        model.train()
        return batch


def build_opd_student(config: OpdConfig) -> tuple[torch.nn.Module, int, int]:
    """(student, N, N + Z) from the SFT checkpoint; all or only router parameters trainable."""
    student = load_model(resolve_checkpoint(config.student))
    spec = model_spec(student)
    if spec is None or spec.num_zero_experts == 0:
        raise ZedaError(f"student {config.student} has no zero experts: run `zeda train sft` (or convert) first")
    if config.trainable == "router":
        student.requires_grad_(False)
        for block in moe_blocks(student):
            block.gate.requires_grad_(True)
    return student, spec.num_experts, spec.num_rows


def train_opd(config: OpdConfig, resume: bool = False) -> Path:
    """On-policy distillation from ``config.student``; returns ``config.out``."""
    accelerator = make_accelerator()
    if deepspeed_zero3(accelerator):
        raise ZedaError("OPD samples from the student, which DeepSpeed ZeRO-3 keeps partitioned: use FSDP2")
    student_path = resolve_checkpoint(config.student)
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    prompts = [encode_prompt(tokenizer, p) for p in load_prompts(config.prompts)]
    student, num_experts, num_rows = build_opd_student(config)
    set_moe_backend(student, config.moe_backend, device=accelerator.device)
    teacher = make_teacher(config.teacher, accelerator.device, config.teacher_cache, config.teacher_api_key)
    sampler = OnPolicySampler(
        config, tokenizer, prompts, teacher, num_rows, accelerator.process_index, accelerator.num_processes
    )
    global_batch = global_batch_of(accelerator)

    def step_loss(model: torch.nn.Module, step: int, acc: Accelerator) -> tuple[torch.Tensor, dict[str, float]]:
        batch = sampler.batch(acc.unwrap_model(model), step, acc.device)
        loss, metrics = opd_loss(model, batch, num_experts, config, global_batch)
        return loss, metrics | {"tokens": float(batch.attention_mask.sum())}

    model, log = run_training(accelerator, student, config.optim, config.run_dir, step_loss, resume, "opd")
    if accelerator.is_main_process:
        _save_student(model, config, log, num_experts, num_rows - num_experts, student_path)
    accelerator.wait_for_everyone()
    return config.out


def _save_student(
    model: torch.nn.Module, config: OpdConfig, log: MetricsLog, num_experts: int, num_zero: int, source: Path
) -> None:
    target = group_aux_target_ratio(num_experts, num_zero, config.group_loss.zero_group_weight)
    summary = {"stage": "opd", "config": json.loads(config.model_dump_json()), "target_zero_ratio": target}
    curves = ["loss", "policy", "l_ga", "r_ze", "reverse_kl"]
    save_trained_model(model, config.out, source, log, curves, config.run_dir / "curves.png", "ZEDA OPD", summary)
