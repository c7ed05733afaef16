"""``zeda analyze``: where a ZEDA model spends its experts on a prompt set, and what it costs in quality.

For each prompt the ZEDA model answers greedily, as served. The FLOP figures are those of
serving: each prompt token once, each generated token fed back once. Then both models score
the whole sequence (prompt + answer) teacher-forced. At every position t that predicts token
t + 1, this gives:

- the compute at t: real experts used, averaged over the MoE layers (0..K);
- the teacher-student log-prob difference of token t + 1, ``log p_T - log p_S``;
- the teacher's entropy (nats) of its next-token distribution;
- the per-token KL(teacher || student) in nats.

Spearman correlations of the compute with |difference| and with the entropy, and per-prompt
quality loss (mean KL over the answer), follow from these.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from scipy.stats import spearmanr
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from zeda_core.checkpoint import load_model, resolve_checkpoint
from zeda_core.errors import ZedaError
from zeda_core.flops import FlopModel, flop_report
from zeda_core.losses import per_token_forward_kl, token_logprobs
from zeda_core.model_queries import model_spec
from zeda_core.scoring import forward_batches
from zeda_trainer.common.generation import generate
from zeda_trainer.common.prompts import Prompt, encode_prompt, load_prompts
from zeda_trainer.data.tokenizer import require_same_tokenizer


@dataclass
class PromptAnalysis:
    """One prompt, its answer, and per-token figures over prompt + answer.

    Attributes:
        tokens: the decoded text of each token.
        experts: [len(tokens)] real experts used at each token, mean over MoE layers.
        delta, entropy, kl: per token, for the prediction of the next token (None at the last).
        answer_start: index of the first answer token.
        zero_ratio: r_ze of the request as served; ``mean_kl``: mean KL over the answer's predictions.
    """

    prompt: str
    domain: str
    answer: str
    tokens: list[str]
    experts: list[float]
    delta: list[float | None]
    entropy: list[float | None]
    kl: list[float | None]
    answer_start: int
    zero_ratio: float
    mean_kl: float


@dataclass
class Correlation:
    """Spearman's rho between per-token compute and one per-token quantity, with its two-sided p-value."""

    name: str
    rho: float
    p_value: float
    n: int


@dataclass
class Analysis:
    model: str
    teacher: str
    top_k: int
    prompts: list[PromptAnalysis]
    zero_ratio: float
    expert_flops_per_token: float
    dense_expert_flops_per_token: float
    total_flops_saved_ratio: float
    per_layer_zero_ratio: list[float]
    per_domain_zero_ratio: dict[str, float]
    correlations: list[Correlation] = field(default_factory=list)

    def worst(self, count: int = 10) -> list[PromptAnalysis]:
        """The prompts with the largest quality loss (mean KL over the answer)."""
        return sorted(self.prompts, key=lambda p: p.mean_kl, reverse=True)[:count]


def analyze(
    model_path: str | Path,
    teacher_path: str | Path,
    prompts_path: Path,
    limit: int | None = 200,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> Analysis:
    """Run the analysis of ``model_path`` against ``teacher_path`` on the first ``limit`` prompts."""
    prompts = load_prompts(prompts_path)[:limit]
    model_dir, teacher_dir = resolve_checkpoint(model_path), resolve_checkpoint(teacher_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    require_same_tokenizer(tokenizer, teacher_dir, "teacher", "ZEDA model")
    student, teacher = load_model(model_dir), load_model(teacher_dir)
    spec = model_spec(student)
    if spec is None or spec.num_zero_experts == 0:
        raise ZedaError(f"{model_dir} has no zero experts: analyze a ZEDA model")
    flop_model = FlopModel.from_model(student)
    analyses: list[PromptAnalysis] = []
    served_counts: dict[str, torch.Tensor] = {}
    served_tokens: dict[str, int] = defaultdict(int)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        for item, generation in _analyze_batch(student, teacher, tokenizer, chunk, max_new_tokens):
            analyses.append(item)
            counts = generation.slot_counts
            served_counts[item.domain] = served_counts.get(item.domain, torch.zeros_like(counts)) + counts
            served_tokens[item.domain] += generation.processed_tokens
    total = flop_report(sum(served_counts.values()), sum(served_tokens.values()), flop_model)
    return Analysis(
        model=str(model_path),
        teacher=str(teacher_path),
        top_k=spec.top_k,
        prompts=analyses,
        zero_ratio=total.zero_expert_ratio,
        expert_flops_per_token=total.expert_flops_per_token,
        dense_expert_flops_per_token=total.dense_expert_flops / max(total.tokens, 1),
        total_flops_saved_ratio=total.total_flops_saved_ratio,
        per_layer_zero_ratio=list(total.per_layer_zero_ratio),
        per_domain_zero_ratio={
            domain: flop_report(counts, served_tokens[domain], flop_model).zero_expert_ratio
            for domain, counts in sorted(served_counts.items())
        },
        correlations=_correlations(analyses),
    )


@torch.no_grad()
def _analyze_batch(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    max_new_tokens: int,
):
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    generations = generate(
        student, prompt_ids, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, batch_size=len(prompts)
    )
    sequences = [p + g.tokens for p, g in zip(prompt_ids, generations, strict=True)]
    (scored,) = forward_batches(student, sequences, tokenizer.pad_token_id)
    (teacher_scored,) = forward_batches(teacher, sequences, tokenizer.pad_token_id)
    real = torch.stack([(~layer.zero_mask).sum(-1).float() for layer in scored.recorder.layers]).mean(0)  # [B, S]
    student_logits, teacher_logits, targets = scored.logits[:, :-1], teacher_scored.logits[:, :-1], scored.ids[:, 1:]
    student_lp = torch.log_softmax(student_logits.float(), dim=-1)
    teacher_lp = torch.log_softmax(teacher_logits.float(), dim=-1)
    delta = token_logprobs(teacher_logits, targets) - token_logprobs(student_logits, targets)
    entropy = -(teacher_lp.exp() * teacher_lp).sum(-1)
    kl = per_token_forward_kl(teacher_lp, student_lp)
    for row, (prompt, prompt_len, generation) in enumerate(
        zip(prompts, map(len, prompt_ids), generations, strict=True)
    ):
        length = len(sequences[row])
        answer_kl = kl[row, prompt_len - 1 : length - 1]
        yield (
            PromptAnalysis(
                prompt=prompt.text,
                domain=prompt.domain,
                answer=tokenizer.decode(generation.tokens, skip_special_tokens=True),
                tokens=[tokenizer.decode([t]) for t in sequences[row]],
                experts=real[row, :length].tolist(),
                delta=[*delta[row, : length - 1].tolist(), None],
                entropy=[*entropy[row, : length - 1].tolist(), None],
                kl=[*kl[row, : length - 1].tolist(), None],
                answer_start=prompt_len,
                zero_ratio=float(generation.slot_counts[:, 1].sum() / generation.slot_counts.sum()),
                mean_kl=float(answer_kl.mean()) if answer_kl.numel() else 0.0,
            ),
            generation,
        )


def _correlations(analyses: list[PromptAnalysis]) -> list[Correlation]:
    """Spearman rho of per-token compute with |log-prob difference|, teacher entropy and KL."""
    compute, difference, entropy, kl = [], [], [], []
    for item in analyses:
        for t in range(len(item.tokens) - 1):
            compute.append(item.experts[t])
            difference.append(abs(item.delta[t]))
            entropy.append(item.entropy[t])
            kl.append(item.kl[t])
    result = []
    for name, values in (
        ("|log p_T - log p_S| of the next token", difference),
        ("teacher entropy", entropy),
        ("KL(teacher || student)", kl),
    ):
        test = spearmanr(compute, values)
        result.append(Correlation(name, float(test.statistic), float(test.pvalue), len(compute)))
    return result
