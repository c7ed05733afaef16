"""``zeda compare``: quality against expert FLOPs saved, for ZEDA and the dynamic-MoE baselines.

Every point is measured by the same code: greedy answers to the skills eval set (mean accuracy,
and the share of expert FLOPs saved on that traffic, prompt and generated tokens, as served),
and teacher-forced validation text (perplexity, and the per-token KL(teacher || model) against
the frozen original). Methods and their knobs:

- ``teacher``: the original model (0 % saved, the quality ceiling);
- ``zeda``: each ZEDA checkpoint given (its FLOP level comes from its training target);
- ``zeda-dial``: one ZEDA checkpoint (``dial_model``, default the first given) served at each
  compute-dial offset of ``dial`` (logits on the zero-expert router logits): its whole
  quality/compute curve without retraining;
- ``dynamic-skip``: the original model, beta per layer at a quantile of the calibration ratios;
- ``top-p``: the original model, cumulative-probability threshold p;
- ``adamoe``: the original model with Z null experts and a raised top-k, fine-tuned with a
  load-balance loss on ZEDA stage 1's data (the teacher's rollouts of the SFT prompts and the
  training text, batch for batch); trained here, once per Z, and reused from ``work_dir``;
- ``adamoe-labels``: the same, fine-tuned on the labelled pretraining documents instead (the
  ground-truth answers of the skills training split): data ZEDA never sees.

Every accuracy comes with its 95 % interval, and every point keeps which items it got right, so
that the report can compare two methods item by item (a paired test, ``stats``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm
from transformers import AutoTokenizer

from zeda_core.baselines import calibrate_dynamic_skip, dynamic_skip, routing_rule, top_p_routing
from zeda_core.checkpoint import load_model, resolve_checkpoint
from zeda_core.errors import ZedaError
from zeda_core.flops import FlopModel
from zeda_core.losses import per_token_forward_kl, token_logprobs
from zeda_core.model_queries import model_spec
from zeda_trainer.common.checkpointing import complete_checkpoints
from zeda_trainer.data.packing import pack_blocks, read_jsonl
from zeda_trainer.data.tokenizer import require_same_tokenizer
from zeda_trainer.measure.evaluate import (
    EvalItem,
    RoutingTally,
    answer_items,
    by_skill,
    limit_per_skill,
    load_eval_set,
    text_windows,
    windowed_logits,
)
from zeda_trainer.measure.stats import stratified_mean
from zeda_trainer.stages.adamoe import AdaMoeConfig, train_adamoe


class CompareConfig(BaseModel):
    """What ``zeda compare`` sweeps and how much data each point is measured on."""

    model_config = ConfigDict(extra="forbid")
    teacher: Path = Path("models/tiny-teacher")
    zeda: list[Path] = [Path("models/tiny-zeda")]
    data_dir: Path = Path("build/data")
    out: Path = Path("docs/compare")
    work_dir: Path = Path("build/compare")
    eval_sets: list[Literal["test", "validation"]] = Field(default=["test"], min_length=1)
    """Skills splits the greedy answers are scored on, in this order (both are held out of every
    training set; 200 items per skill each)."""
    eval_per_skill: int = Field(default=50, ge=1)
    """Items per skill, taken from the first of ``eval_sets`` first."""
    max_new_tokens: int = Field(default=64, ge=1)
    text_windows: int = Field(default=48, ge=1)
    calibration_blocks: int = Field(default=32, ge=1)
    dynamic_skip_quantiles: list[float] = [0.25, 0.5, 0.75, 0.9]
    top_p: list[float] = [0.5, 0.6, 0.7, 0.8, 0.9]
    adamoe_null_experts: list[int] = [4, 8, 16]
    adamoe: AdaMoeConfig = AdaMoeConfig(data="rollouts")
    """Same-data AdaMoE's recipe (``data`` is set to ``rollouts``; prompts and text come from ``data_dir``)."""
    adamoe_labels_null_experts: list[int] = []
    adamoe_labels: AdaMoeConfig = AdaMoeConfig(data="labels")
    """``adamoe-labels``' recipe (``data`` is set to ``labels``)."""
    dial: list[float] = [-2.0, -1.0, -0.5, 0.5, 1.0]
    dial_model: Path | None = None
    reuse_points: list[Path] = []  # compare.json files whose points are kept unless measured again


@dataclass
class Point:
    """One measured (method, knob) point.

    Attributes:
        flops_saved: share of the original model's routed-expert FLOPs saved on the skills eval
            traffic (prompt and generated tokens), 0..1; ``flops_saved_text`` the same on the
            validation text. Relative to the original top-k, so a method that raises k (AdaMoE)
            pays for its extra slots.
        real_experts: real experts computed per token and MoE layer on the skills traffic.
        accuracy: mean skill accuracy over skills, on ``items`` eval items; ``accuracy_low`` and
            ``accuracy_high`` its 95 % interval (stratified by skill, :mod:`stats`).
        correct: skill -> one character per eval item, in eval-set order: ``1`` answered right, ``0`` not
            (what the paired margins are computed from).
        kl: mean per-token KL(teacher || model) in nats on the validation text; ``perplexity`` on
            that text.
    """

    method: str
    knob: str
    flops_saved: float
    flops_saved_text: float
    real_experts: float
    accuracy: float
    kl: float
    perplexity: float
    model: str
    items: int = 0
    accuracy_low: float | None = None
    accuracy_high: float | None = None
    correct: dict[str, str] = field(default_factory=dict)

    def scores(self) -> dict[str, list[float]]:
        """skill -> 0/1 per eval item (empty for points measured before items were kept)."""
        return {skill: [float(c == "1") for c in bits] for skill, bits in self.correct.items()}


class Bench:
    """The shared eval data and the teacher's text log-probs, prepared once."""

    def __init__(self, config: CompareConfig) -> None:
        self.config = config
        self.teacher_path = resolve_checkpoint(config.teacher)
        self.tokenizer = AutoTokenizer.from_pretrained(self.teacher_path)
        items = [
            item for name in config.eval_sets for item in load_eval_set(config.data_dir / "skills" / f"{name}.jsonl")
        ]
        self.items: list[EvalItem] = limit_per_skill(items, config.eval_per_skill)
        texts = [row["text"] for row in read_jsonl(config.data_dir / "text" / "validation.jsonl")]
        self.windows = text_windows(self.tokenizer, texts)[: config.text_windows]
        teacher = load_model(self.teacher_path)
        self.original = FlopModel.from_model(teacher)
        self.teacher_logprobs = [
            torch.log_softmax(logits, dim=-1)
            for logits, _, _ in windowed_logits(teacher, self.windows, self.pad_id, RoutingTally(None), "text")
        ]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def measure(
        self, model: torch.nn.Module, method: str, knob: str, name: str, zero_expert_bias: float = 0.0
    ) -> Point:
        """One point: ``model`` (at compute dial ``zero_expert_bias``, logits) on the skills and the text windows."""
        tally = RoutingTally(FlopModel.from_model(model))
        answers = answer_items(
            model,
            self.tokenizer,
            self.items,
            tally,
            max_new_tokens=self.config.max_new_tokens,
            zero_expert_bias=zero_expert_bias,
        )
        skills = by_skill(self.items, answers)
        accuracy = stratified_mean({skill: [float(a) for a in right] for skill, right in skills.items()})
        nll, kl, tokens = 0.0, 0.0, 0
        scored = windowed_logits(model, self.windows, self.pad_id, tally, "text", zero_expert_bias=zero_expert_bias)
        for (logits, ids, mask), teacher in zip(scored, self.teacher_logprobs, strict=True):
            target = mask[:, 1:].bool()
            nll -= float(token_logprobs(logits[:, :-1], ids[:, 1:])[target].sum())
            per_token_kl = per_token_forward_kl(teacher, torch.log_softmax(logits, dim=-1))[:, :-1]
            kl += float(per_token_kl[target].sum())
            tokens += int(target.sum())
        skills_experts, text_experts = self.real_experts(tally, list(skills)), self.real_experts(tally, ["text"])
        top_k = self.original.top_k
        return Point(
            method=method,
            knob=knob,
            flops_saved=1.0 - skills_experts / top_k,
            flops_saved_text=1.0 - text_experts / top_k,
            real_experts=skills_experts,
            accuracy=accuracy.mean,
            kl=kl / tokens,
            perplexity=float(torch.tensor(nll / tokens).exp()),
            model=name,
            items=len(self.items),
            accuracy_low=accuracy.low,
            accuracy_high=accuracy.high,
            correct={skill: "".join("1" if a else "0" for a in right) for skill, right in skills.items()},
        )

    def real_experts(self, tally: RoutingTally, domains: list[str]) -> float:
        """Real experts computed per token and MoE layer on ``domains``: expert FLOPs per token over the
        FLOPs of one expert in every layer (the original model spends its top-k of them)."""
        one_expert_per_layer = self.original.slot_flops * self.original.moe_layers
        return tally.summary(domains)["expert_flops_per_token"] / one_expert_per_layer

    def calibration_batches(self) -> list[torch.Tensor]:
        """Packed training text (no padding) for the Dynamic Skipping calibration."""
        texts = [row["text"] for row in read_jsonl(self.config.data_dir / "text" / "train.jsonl")]
        blocks = pack_blocks(self.tokenizer, texts, 256, seed=0)[: self.config.calibration_blocks]
        return list(blocks.split(8))


def run_compare(config: CompareConfig) -> list[Point]:
    """Measure every point (the teacher, each ZEDA model, every baseline knob), in that order.

    Points of ``reuse_points`` (earlier runs on the same items) come first, except those this run
    measures again (same method and knob), which take their place.
    """
    reused = reused_points(config.reuse_points)
    for path in config.zeda:
        resolve_checkpoint(path)
    bench = Bench(config)
    for path in config.zeda:
        require_same_tokenizer(bench.tokenizer, resolve_checkpoint(path), "ZEDA model", "teacher")
    jobs = _jobs(config)
    points = []
    for method, knob, build in tqdm(jobs, desc="compare"):
        model, name, rule, bias = build(bench)
        if rule is None:
            points.append(bench.measure(model, method, knob, name, bias))
        else:
            with routing_rule(model, rule):
                points.append(bench.measure(model, method, knob, name, bias))
    measured = {(p.method, p.knob) for p in points}
    return [p for p in reused if (p.method, p.knob) not in measured] + points


def reused_points(paths: list[Path]) -> list[Point]:
    """The points of earlier ``compare.json`` files, later files replacing earlier ones' (method, knob).

    Raises:
        ZedaError: a file is missing or does not hold compare points.
    """
    kept: dict[tuple[str, str], Point] = {}
    for path in paths:
        try:
            rows = json.loads(Path(path).read_text())["points"]
            points = [Point(**row) for row in rows]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ZedaError(f"reuse_points: {path} does not hold compare points ({exc})") from exc
        kept.update({(p.method, p.knob): p for p in points})
    return list(kept.values())


def _jobs(config: CompareConfig) -> list[tuple]:
    """(method, knob label, builder) for every point.

    A builder returns (model, name, routing rule or None, compute-dial offset in logits).
    """
    teacher = str(config.teacher)

    def original(bench: Bench):
        return load_model(bench.teacher_path), teacher, None, 0.0

    def zeda(path: Path, bias: float = 0.0):
        return lambda bench: (load_model(resolve_checkpoint(path)), str(path), None, bias)

    def skipping(quantile: float):
        def build(bench: Bench):
            model = load_model(bench.teacher_path)
            betas = calibrate_dynamic_skip(model, bench.calibration_batches(), quantile)
            return model, teacher, lambda layer: lambda _, routing: dynamic_skip(routing, betas[layer]), 0.0

        return build

    def top_p(p: float):
        def build(bench: Bench):
            model = load_model(bench.teacher_path)
            spec = model_spec(model)
            return model, teacher, lambda layer: lambda logits, _: top_p_routing(logits, spec, p), 0.0

        return build

    def adamoe(null_experts: int, data: str):
        def build(bench: Bench):
            path = adamoe_model(config, null_experts, data)
            require_same_tokenizer(bench.tokenizer, path, "AdaMoE model", "teacher")
            return load_model(path), str(path), None, 0.0

        return build

    dial_model = config.dial_model or (config.zeda[0] if config.zeda else None)
    dial = [("zeda-dial", f"bias {bias:+g}", zeda(dial_model, bias)) for bias in config.dial] if dial_model else []
    return [
        ("teacher", "-", original),
        *[("zeda", path.name, zeda(path)) for path in config.zeda],
        *dial,
        *[("dynamic-skip", f"quantile {q}", skipping(q)) for q in config.dynamic_skip_quantiles],
        *[("top-p", f"p {p}", top_p(p)) for p in config.top_p],
        *[("adamoe", f"Z {z}, k {config.adamoe.top_k}", adamoe(z, "rollouts")) for z in config.adamoe_null_experts],
        *[
            ("adamoe-labels", f"Z {z}, k {config.adamoe_labels.top_k}", adamoe(z, "labels"))
            for z in config.adamoe_labels_null_experts
        ],
    ]


def adamoe_model(config: CompareConfig, null_experts: int, data: str) -> Path:
    """The AdaMoE checkpoint with ``null_experts`` null experts fine-tuned on ``data`` (``rollouts``:
    the same-data recipe ``adamoe``; ``labels``: ``adamoe_labels``), trained into ``work_dir`` if missing.

    The same-data runs share one rollout cache, ``work_dir/rollouts.jsonl``.
    """
    recipe = config.adamoe if data == "rollouts" else config.adamoe_labels
    prefix = "adamoe" if data == "rollouts" else "adamoe-labels"
    name = f"{prefix}-z{null_experts}-k{recipe.top_k}"
    out = config.work_dir / name
    if (out / "config.json").is_file():
        return out
    run_dir = config.work_dir / f"{name}-run"
    update = {
        "teacher": config.teacher,
        "data": data,
        "data_dir": config.data_dir,
        "num_null_experts": null_experts,
        "run_dir": run_dir,
        "out": out,
    }
    if data == "rollouts":
        update |= {
            "prompts": config.data_dir / "prompts" / "sft.jsonl",
            "rollout_cache": config.work_dir / "rollouts.jsonl",
            "text": recipe.text.model_copy(update={"path": config.data_dir / "text" / "train.jsonl"}),
        }
    return train_adamoe(recipe.model_copy(update=update), resume=bool(complete_checkpoints(run_dir)))
