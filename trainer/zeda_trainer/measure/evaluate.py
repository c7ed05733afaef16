"""``zeda eval``: skill accuracy, perplexity, and served routing / expert FLOPs of a model.

Routing figures are measured as served: each prompt token once at prefill, each generated token
once at decode (generation), and each text token once (perplexity passes, like a prefill).
Padding never counts.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from zeda_core.checkpoint import load_model, resolve_checkpoint
from zeda_core.errors import ZedaError
from zeda_core.flops import FlopModel, FlopReport, flop_report
from zeda_core.scoring import forward_batches, score_sequences
from zeda_trainer.common.generation import generate
from zeda_trainer.common.prompts import prompt_ids
from zeda_trainer.data.packing import read_jsonl, read_user_jsonl

T = TypeVar("T")

SCORERS = ("exact", "regex")
PERPLEXITY_WINDOW = 256


@dataclass(frozen=True)
class EvalItem:
    """One eval prompt with its reference ``answer`` (a literal, or a regex for ``scorer=regex``)."""

    prompt: str
    answer: str
    skill: str
    scorer: str = "exact"

    def correct(self, output: str) -> bool:
        if self.scorer == "regex":
            return re.fullmatch(self.answer, output.strip()) is not None
        return output.strip() == self.answer.strip()


def load_eval_set(path: Path) -> list[EvalItem]:
    """Read a JSONL eval set: ``prompt``, ``answer``, optional ``scorer`` (exact|regex) and ``skill``.

    Raises:
        ZedaError: naming the file and line of the first bad record.
    """
    items = []
    for where, record in read_user_jsonl(path, "eval set"):
        for field in ("prompt", "answer"):
            if not isinstance(record.get(field), str):
                raise ZedaError(f"{where}: missing or non-string field {field!r}")
        scorer = record.get("scorer", "exact")
        if scorer not in SCORERS:
            raise ZedaError(f"{where}: scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
        if scorer == "regex":
            try:
                re.compile(record["answer"])
            except re.error as exc:
                raise ZedaError(f"{where}: answer is not a valid regex ({exc})") from exc
        items.append(EvalItem(record["prompt"], record["answer"], str(record.get("skill", path.stem)), scorer))
    if not items:
        raise ZedaError(f"eval set {path} has no records")
    return items


def load_any_model(path: str | Path) -> tuple[torch.nn.Module, bool]:
    """(model, zero_aware): a supported MoE through zeda_core, any other HF causal LM as it is."""
    checkpoint = resolve_checkpoint(path)
    try:
        return load_model(checkpoint), True
    except ZedaError as exc:
        if "not a supported MoE family" not in str(exc):
            raise
    try:
        return AutoModelForCausalLM.from_pretrained(checkpoint, use_safetensors=True).eval(), False
    except (OSError, ValueError) as exc:
        raise ZedaError(f"cannot load {checkpoint} as a causal LM: {exc}") from exc


class RoutingTally:
    """The FLOP report of each domain's tokens, added up as they are routed (nothing without a FLOP model)."""

    def __init__(self, flop_model: FlopModel | None) -> None:
        self.flop_model = flop_model
        self.reports: dict[str, FlopReport] = {}

    def add(self, domain: str, counts: torch.Tensor | None, tokens: int) -> None:
        """Add ``tokens`` tokens routed with ``counts`` ([L, 2] real/zero slots) to ``domain``."""
        if counts is None or self.flop_model is None:
            return
        report = flop_report(counts, tokens, self.flop_model)
        self.reports[domain] = self.reports[domain] + report if domain in self.reports else report

    def summary(self, domains: list[str] | None = None) -> dict[str, Any] | None:
        """Zero share and expert FLOPs per token over ``domains`` (default all); None if none was routed."""
        reports = [self.reports[d] for d in (domains or list(self.reports)) if d in self.reports]
        if not reports:
            return None
        report = sum(reports)
        return {
            "zero_expert_ratio": report.zero_expert_ratio,
            "expert_flops_per_token": report.expert_flops_per_token,
            "dense_expert_flops_per_token": report.dense_expert_flops / report.tokens,
            "tokens": report.tokens,
            "per_layer_zero_ratio": list(report.per_layer_zero_ratio),
        }


def text_windows(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """``texts`` cut into windows of at most PERPLEXITY_WINDOW token ids, each starting with BOS."""
    windows = []
    for ids in tokenizer(texts, add_special_tokens=False).input_ids:
        for start in range(0, len(ids), PERPLEXITY_WINDOW - 1):
            piece = ids[start : start + PERPLEXITY_WINDOW - 1]
            if piece:
                windows.append([tokenizer.bos_token_id, *piece] if tokenizer.bos_token_id is not None else piece)
    return windows


def windowed_logits(
    model: torch.nn.Module,
    windows: list[list[int]],
    pad_id: int,
    tally: RoutingTally,
    domain: str,
    batch_size: int = 16,
    zero_expert_bias: float = 0.0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(float32 CPU logits [B, W, V], ids [B, W], mask [B, W]) per batch of windows.

    The routing of every window token is added to ``tally`` under ``domain``; ``zero_expert_bias``
    is the compute dial of every window, in logits.
    """
    offsets = [zero_expert_bias] * len(windows)
    for batch in forward_batches(model, windows, pad_id, batch_size, offsets):
        tally.add(domain, batch.slot_counts, batch.tokens)
        yield batch.logits.float().cpu(), batch.ids.cpu(), batch.mask.cpu()


def negative_log_likelihood(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    tally: RoutingTally,
    domain: str,
    batch_size: int = 16,
    zero_expert_bias: float = 0.0,
) -> tuple[float, int]:
    """(summed NLL in nats, predicted tokens) over ``texts``, in windows of PERPLEXITY_WINDOW tokens
    that start with BOS, at compute dial ``zero_expert_bias`` (logits); routing of every text token
    is added to ``tally`` under ``domain``."""
    windows = text_windows(tokenizer, texts)
    offsets = [zero_expert_bias] * len(windows)
    scores = score_sequences(model, windows, tokenizer.pad_token_id or 0, batch_size, offsets)
    tally.add(domain, scores.slot_counts, scores.tokens)
    return -math.fsum(value for values in scores.logprobs for value in values), sum(map(len, scores.logprobs))


def perplexity_of(nll: float, tokens: int) -> float:
    """exp(mean NLL per token); NaN when there was no token."""
    return math.exp(nll / tokens) if tokens else float("nan")


def unigram_perplexity(tokenizer: PreTrainedTokenizerBase, train: list[str], texts: list[str]) -> float:
    """Perplexity of an add-one unigram model fit on ``train`` tokens: the no-context baseline."""
    counts = Counter(token for ids in tokenizer(train, add_special_tokens=False).input_ids for token in ids)
    total, vocab = sum(counts.values()), len(tokenizer)
    eval_ids = [token for ids in tokenizer(texts, add_special_tokens=False).input_ids for token in ids]
    nll = -sum(math.log((counts[t] + 1) / (total + vocab)) for t in eval_ids)
    return math.exp(nll / max(len(eval_ids), 1))


def limit_per_skill(items: list[EvalItem], limit: int | None) -> list[EvalItem]:
    """The first ``limit`` items of each skill, in order (all of them for ``None``)."""
    if limit is None:
        return items
    kept: Counter[str] = Counter()
    limited = []
    for item in items:
        kept[item.skill] += 1
        if kept[item.skill] <= limit:
            limited.append(item)
    return limited


def answer_items(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: list[EvalItem],
    tally: RoutingTally,
    batch_size: int = 64,
    max_new_tokens: int = 64,
    zero_expert_bias: float = 0.0,
) -> list[bool]:
    """Whether each of ``items`` is answered right, greedily, at compute dial ``zero_expert_bias``
    (logits); routing goes into ``tally`` per skill."""
    budgets = [
        min(max_new_tokens, len(tokenizer(i.answer, add_special_tokens=False).input_ids) + 8)
        if i.scorer == "exact"
        else max_new_tokens
        for i in items
    ]
    generations = generate(
        model,
        [prompt_ids(tokenizer, i.prompt) for i in items],
        budgets,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        batch_size=batch_size,
        zero_expert_bias=zero_expert_bias,
    )
    correct = []
    for item, gen in zip(items, generations, strict=True):
        correct.append(item.correct(tokenizer.decode(gen.tokens, skip_special_tokens=True)))
        tally.add(item.skill, gen.slot_counts, gen.processed_tokens)
    return correct


def by_skill(items: list[EvalItem], values: list[T]) -> dict[str, list[T]]:
    """skill -> the values of its items, in item order, skills sorted."""
    grouped: dict[str, list[T]] = defaultdict(list)
    for item, value in zip(items, values, strict=True):
        grouped[item.skill].append(value)
    return dict(sorted(grouped.items()))


def skill_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: list[EvalItem],
    tally: RoutingTally,
    batch_size: int = 64,
    max_new_tokens: int = 64,
    zero_expert_bias: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Greedy answers to ``items`` at compute dial ``zero_expert_bias`` (logits): skill -> {accuracy, n};
    routing goes into ``tally`` per skill."""
    correct = answer_items(model, tokenizer, items, tally, batch_size, max_new_tokens, zero_expert_bias)
    return {name: {"accuracy": sum(v) / len(v), "n": len(v)} for name, v in by_skill(items, correct).items()}


def evaluate(
    model_path: str | Path,
    data_dir: Path,
    eval_set: Path | None = None,
    text: Path | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 64,
    zero_expert_bias: float = 0.0,
) -> dict[str, Any]:
    """Evaluate a model at compute dial ``zero_expert_bias`` (logits, every token of every item and
    text window); the result follows the ``zeda eval --json`` schema."""
    if text is not None and not text.is_file():
        raise ZedaError(f"--text {text} is not a file")
    items = limit_per_skill(load_eval_set(eval_set or data_dir / "skills" / "test.jsonl"), limit)
    model, zero_aware = load_any_model(model_path)
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(model_path))
    tally = RoutingTally(FlopModel.from_model(model) if zero_aware else None)
    skills = skill_accuracy(model, tokenizer, items, tally, batch_size, max_new_tokens, zero_expert_bias)

    validation = read_jsonl(data_dir / "text" / "validation.jsonl")
    train = read_jsonl(data_dir / "text" / "train.jsonl")
    by_domain, unigram, nll_total, token_total = {}, {}, 0.0, 0
    for domain in sorted({row["domain"] for row in validation}):
        texts = [row["text"] for row in validation if row["domain"] == domain]
        nll, tokens = negative_log_likelihood(model, tokenizer, texts, tally, domain, zero_expert_bias=zero_expert_bias)
        by_domain[domain] = perplexity_of(nll, tokens)
        nll_total, token_total = nll_total + nll, token_total + tokens
        unigram[domain] = unigram_perplexity(tokenizer, [r["text"] for r in train if r["domain"] == domain], texts)
    text_ppl = None
    if text is not None:
        scored = negative_log_likelihood(
            model, tokenizer, [text.read_text()], tally, "text", zero_expert_bias=zero_expert_bias
        )
        text_ppl = perplexity_of(*scored)

    skill_names = list(skills)
    overall = tally.summary()
    return {
        "model": str(model_path),
        "zero_expert_bias": zero_expert_bias,
        "skills": skills,
        "mean_accuracy": sum(s["accuracy"] for s in skills.values()) / len(skills),
        "perplexity": {
            "validation": perplexity_of(nll_total, token_total),
            "text": text_ppl,
            "validation_by_domain": by_domain,
            "unigram_validation_by_domain": unigram,
        },
        "zero_expert_ratio": overall["zero_expert_ratio"] if overall else None,
        "expert_flops_per_token": overall["expert_flops_per_token"] if overall else None,
        "dense_expert_flops_per_token": overall["dense_expert_flops_per_token"] if overall else None,
        "routing": {
            "overall": overall,
            "skills": tally.summary(skill_names),
            "domains": {d: tally.summary([d]) for d in [*skill_names, *by_domain, *(["text"] if text else [])]},
        }
        if overall
        else None,
    }
