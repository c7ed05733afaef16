"""``zeda retrain``: OPD on captured traffic, a quality gate, and promotion by hot-swap.

One run, in ``out``:

1. ``data/``: a frozen snapshot of the newest captured prompts. Each distinct prompt is held
   out or trained on by a hash of its text, so a held-out prompt is never trained on, in this
   run or a later one. The training set is topped up with a replay share of the original
   prompt set.
2. ``run/`` and ``candidate/``: OPD from the serving checkpoint on that set, its L_GA aimed at
   the r_ze the server measured on the captured requests (``target_zero_ratio: served``). A killed run
   continues from its last checkpoint when the same command runs again.
3. The gate scores the current and the candidate model on the same held-out set: mean skill
   accuracy on a fixed eval set, the teacher's NLL of each model's greedy completions of the
   held-out captured prompts (nats/token), and r_ze on those prompts. The candidate passes
   only if accuracy drops by at most ``max_accuracy_drop``, the NLL rises by at most
   ``max_teacher_nll_increase``, and r_ze does not fall by more than ``max_zero_ratio_drop``.
4. ``verdict.json``: the checks, the decision and the promotion result. A passed candidate
   is promoted through the server's ``/admin/swap`` when a server is given.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoTokenizer

from zeda_core.atomic import atomic_write_text
from zeda_core.checkpoint import load_model, read_config, resolve_checkpoint
from zeda_core.errors import ZedaError
from zeda_core.flops import FlopModel
from zeda_core.losses import zero_group_weight_for
from zeda_core.model_queries import spec_from_config
from zeda_core.traffic import TrafficStore
from zeda_trainer.common.checkpointing import complete_checkpoints
from zeda_trainer.common.generation import generate
from zeda_trainer.common.group_loss import GroupLossConfig
from zeda_trainer.common.prompts import Prompt, encode_prompt, load_prompts
from zeda_trainer.common.teacher import TeacherScorer, make_teacher
from zeda_trainer.measure.evaluate import RoutingTally, limit_per_skill, load_eval_set, skill_accuracy
from zeda_trainer.stages.opd import OpdConfig, train_opd

VERDICT_FILE = "verdict.json"
SNAPSHOT_FILE = "snapshot.json"


class GateConfig(BaseModel):
    """The held-out set and the tolerances a candidate must meet."""

    model_config = ConfigDict(extra="forbid")
    eval_set: Path = Path("build/data/skills/validation.jsonl")
    eval_per_skill: int = Field(default=16, ge=1)
    held_out_share: float = Field(default=0.2, gt=0.0, lt=1.0)
    held_out_max: int = Field(default=64, ge=1)
    max_new_tokens: int = Field(default=48, ge=1)
    max_accuracy_drop: float = Field(default=0.02, ge=0.0)
    max_teacher_nll_increase: float = Field(default=0.05, ge=0.0)
    max_zero_ratio_drop: float = Field(default=0.0, ge=0.0)


class RetrainConfig(BaseModel):
    """Retraining recipe; ``opd.student``, ``opd.prompts``, ``opd.run_dir`` and ``opd.out`` are set per run."""

    model_config = ConfigDict(extra="forbid")
    opd: OpdConfig = OpdConfig()
    recent: int = Field(default=2000, ge=1)
    min_captured: int = Field(default=16, ge=1)
    replay_prompts: Path = Path("build/data/prompts/opd.jsonl")
    replay_share: float = Field(default=0.25, ge=0.0, lt=1.0)
    target_zero_ratio: Literal["served"] | Annotated[float, Field(gt=0.0, lt=1.0)] | None = "served"
    """The r_ze L_GA steers toward: ``served`` = the mean r_ze the server measured on the captured
    requests (retraining then keeps the savings and moves where they are spent); a number; or
    ``None`` to keep ``opd.group_loss.zero_group_weight`` as it is."""
    gate: GateConfig = GateConfig()
    promote_scope: Literal["router", "all"] = "all"


@dataclass(frozen=True)
class Check:
    name: str
    current: float
    candidate: float
    rule: str
    passed: bool


def is_held_out(prompt: Prompt, share: float) -> bool:
    """Whether a prompt belongs to the held-out set: a stable hash of its text, below ``share``."""
    digest = hashlib.sha256(prompt.key.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < share


def snapshot_traffic(store: TrafficStore, config: RetrainConfig, data_dir: Path) -> dict[str, Any]:
    """Freeze the training and held-out prompt sets in ``data_dir`` (kept as is when already there)."""
    manifest = data_dir / SNAPSHOT_FILE
    if manifest.is_file():
        return json.loads(manifest.read_text())
    distinct: dict[str, Prompt] = {}
    served_ratios = []
    rows = list(store.rows(limit=config.recent))
    for row in rows:
        prompt = Prompt(row.prompt, row.chat, "captured")
        distinct.setdefault(prompt.key, prompt)
        if row.zero_expert_ratio is not None:
            served_ratios.append(row.zero_expert_ratio)
    captured = list(distinct.values())
    share = config.gate.held_out_share
    held_out = [p for p in captured if is_held_out(p, share)][: config.gate.held_out_max]
    train = [p for p in captured if not is_held_out(p, share)]
    # The same rule on the replay set: a prompt that is held out when captured is never trained on.
    replay_pool = [p for p in load_prompts(config.replay_prompts) if not is_held_out(p, share)]
    replay_count = min(len(replay_pool), round(len(train) * config.replay_share / (1.0 - config.replay_share)))
    replay = random.Random(config.opd.seed).sample(replay_pool, replay_count)
    _write_prompts(data_dir / "train.jsonl", train + replay)
    _write_prompts(data_dir / "held_out.jsonl", held_out)
    summary = {
        "captured_rows": len(rows),
        "captured_distinct": len(captured),
        "captured_train": len(train),
        "replay": len(replay),
        "held_out": len(held_out),
        "served_zero_ratio": sum(served_ratios) / len(served_ratios) if served_ratios else None,
        "created": time.time(),
    }
    atomic_write_text(manifest, json.dumps(summary, indent=2) + "\n")
    return summary


def _write_prompts(path: Path, prompts: list[Prompt]) -> None:
    lines = [json.dumps({"prompt": p.text, "chat": p.chat, "domain": p.domain}) + "\n" for p in prompts]
    atomic_write_text(path, "".join(lines))


@torch.no_grad()
def gate_metrics(model_path: Path, teacher: TeacherScorer, gate: GateConfig, held_out: list[Prompt]) -> dict[str, Any]:
    """Accuracy on the fixed eval set, teacher NLL and r_ze on the held-out captured prompts."""
    model = load_model(model_path, device=gate_device())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tally = RoutingTally(FlopModel.from_model(model))
    items = limit_per_skill(load_eval_set(gate.eval_set), gate.eval_per_skill)
    skills = skill_accuracy(model, tokenizer, items, tally, max_new_tokens=gate.max_new_tokens)
    prompts = [encode_prompt(tokenizer, p) for p in held_out]
    generations = generate(
        model, prompts, gate.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, batch_size=64
    )
    for generation in generations:
        tally.add("traffic", generation.slot_counts, generation.processed_tokens)
    scored = [p + g.tokens for p, g in zip(prompts, generations, strict=True)]
    logprobs = [v for values in teacher.score(scored, [len(p) for p in prompts]) for v in values]
    return {
        "accuracy": sum(s["accuracy"] for s in skills.values()) / len(skills),
        "skills": skills,
        "teacher_nll": -sum(logprobs) / max(len(logprobs), 1),
        "traffic_zero_ratio": tally.summary(["traffic"])["zero_expert_ratio"],
        "eval_zero_ratio": tally.summary(list(skills))["zero_expert_ratio"],
    }


def gate_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def judge(current: dict[str, Any], candidate: dict[str, Any], gate: GateConfig) -> list[Check]:
    """The gate's checks of ``candidate`` against ``current`` (both from :func:`gate_metrics`)."""
    acc, nll, rze = "accuracy", "teacher_nll", "traffic_zero_ratio"
    return [
        Check(
            "skill accuracy",
            current[acc],
            candidate[acc],
            f">= current - {gate.max_accuracy_drop}",
            candidate[acc] >= current[acc] - gate.max_accuracy_drop,
        ),
        Check(
            "teacher NLL of completions (nats/token)",
            current[nll],
            candidate[nll],
            f"<= current + {gate.max_teacher_nll_increase}",
            candidate[nll] <= current[nll] + gate.max_teacher_nll_increase,
        ),
        Check(
            "r_ze on held-out traffic",
            current[rze],
            candidate[rze],
            f">= current - {gate.max_zero_ratio_drop}",
            candidate[rze] >= current[rze] - gate.max_zero_ratio_drop,
        ),
    ]


def promote(server: str, admin_key: str | None, candidate: Path, scope: str) -> str:
    """Ask the server to hot-swap ``candidate`` in; returns what happened, in words."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    body = {"checkpoint": str(candidate.resolve()), "scope": scope}
    try:
        response = httpx.post(f"{server.rstrip('/')}/admin/swap", json=body, headers=headers, timeout=600)
    except httpx.HTTPError as exc:
        return f"failed: server {server} unreachable ({exc})"
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        return f"failed: HTTP {response.status_code}: {message}"
    return f"swapped in as {response.json()['current']['fingerprint']}"


def retrain_once(
    config: RetrainConfig,
    store: TrafficStore,
    base: Path,
    out: Path,
    server: str | None = None,
    admin_key: str | None = None,
) -> dict[str, Any]:
    """One retraining run in ``out`` (resumed if it was interrupted); returns the verdict.

    Raises:
        ZedaError: another job holds ``out`` (two jobs on one run would corrupt it).
    """
    with run_lock(out):
        return _retrain(config, store, base, out, server, admin_key)


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on the run directory, released when the holder exits (even by kill -9)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ZedaError(f"another zeda retrain is running in {out}") from exc
        yield


def _retrain(
    config: RetrainConfig, store: TrafficStore, base: Path, out: Path, server: str | None, admin_key: str | None
) -> dict[str, Any]:
    verdict_path = out / VERDICT_FILE
    if verdict_path.is_file():
        return json.loads(verdict_path.read_text())
    base = resolve_checkpoint(base)
    snapshot = snapshot_traffic(store, config, out / "data")
    verdict: dict[str, Any] = {"base": str(base), "snapshot": snapshot, "checks": [], "promoted": False}
    if snapshot["captured_train"] < config.min_captured or snapshot["held_out"] == 0:
        verdict["decision"] = "skipped"
        verdict["reasons"] = [
            f"not enough traffic: {snapshot['captured_train']} training and {snapshot['held_out']} held-out prompts"
            f" (need {config.min_captured} and 1)"
        ]
        return _finish(verdict, verdict_path)
    candidate = out / "candidate"
    run_paths = {"student": base, "prompts": out / "data" / "train.jsonl", "run_dir": out / "run", "out": candidate}
    opd = config.opd.model_copy(update=run_paths | {"group_loss": _group_loss(config, snapshot, base)})
    verdict["zero_group_weight"] = opd.group_loss.zero_group_weight
    if not candidate.is_dir():
        train_opd(opd, resume=bool(complete_checkpoints(opd.run_dir)))
    teacher = make_teacher(opd.teacher, gate_device(), opd.teacher_cache, opd.teacher_api_key)
    held_out = load_prompts(out / "data" / "held_out.jsonl")
    current_metrics = gate_metrics(base, teacher, config.gate, held_out)
    candidate_metrics = gate_metrics(candidate, teacher, config.gate, held_out)
    checks = judge(current_metrics, candidate_metrics, config.gate)
    passed = all(c.passed for c in checks)
    verdict |= {
        "candidate": str(candidate),
        "current_metrics": current_metrics,
        "candidate_metrics": candidate_metrics,
        "checks": [asdict(c) for c in checks],
        "decision": "promote" if passed else "refuse",
        "reasons": [
            f"{c.name}: {c.candidate:.4f} vs current {c.current:.4f}, needs {c.rule}" for c in checks if not c.passed
        ],
    }
    if passed and server:
        verdict["promotion"] = promote(server, admin_key, candidate, config.promote_scope)
        verdict["promoted"] = verdict["promotion"].startswith("swapped")
    elif passed:
        verdict["promotion"] = "not requested (no --server)"
    return _finish(verdict, verdict_path)


def _group_loss(config: RetrainConfig, snapshot: dict[str, Any], base: Path) -> GroupLossConfig:
    """The recipe's L_GA with ``w`` set so that its target share is ``config.target_zero_ratio``."""
    target = config.target_zero_ratio
    if target == "served":
        target = snapshot["served_zero_ratio"]
    if target is None:
        return config.opd.group_loss
    spec = spec_from_config(read_config(base))
    weight = zero_group_weight_for(target, spec.num_experts, spec.num_zero_experts)
    return config.opd.group_loss.model_copy(update={"zero_group_weight": weight})


def _finish(verdict: dict[str, Any], path: Path) -> dict[str, Any]:
    verdict["finished"] = time.time()
    atomic_write_text(path, json.dumps(verdict, indent=2) + "\n")
    return verdict


def next_cycle_dir(root: Path) -> Path:
    """The unfinished cycle to resume, else a new one named by the UTC time."""
    for cycle in sorted(root.glob("cycle-*")):
        if not (cycle / VERDICT_FILE).is_file():
            return cycle
    return root / time.strftime("cycle-%Y%m%dT%H%M%SZ", time.gmtime())


def serving_base(root: Path, base: Path) -> Path:
    """The newest promoted candidate under ``root`` (what the server serves now), else ``base``."""
    for cycle in sorted(root.glob("cycle-*"), reverse=True):
        verdict = cycle / VERDICT_FILE
        if verdict.is_file() and json.loads(verdict.read_text()).get("promoted"):
            return cycle / "candidate"
    return base


def render_verdict(verdict: dict[str, Any]) -> str:
    """The one-screen summary printed at the end of a run."""
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=110, file=io.StringIO())
    table = Table(title=f"zeda retrain: {verdict['decision'].upper()}")
    for column in ("check", "current", "candidate", "rule", "result"):
        table.add_column(column)
    for check in verdict["checks"]:
        result = "pass" if check["passed"] else "FAIL"
        table.add_row(check["name"], f"{check['current']:.4f}", f"{check['candidate']:.4f}", check["rule"], result)
    console.print(table)
    snap = verdict["snapshot"]
    console.print(
        f"data: {snap['captured_train']} captured + {snap['replay']} replay prompts trained, "
        f"{snap['held_out']} captured prompts held out"
    )
    for reason in verdict["reasons"]:
        console.print(f"reason: {reason}")
    console.print(f"promotion: {verdict.get('promotion', 'none')}")
    return console.export_text()
