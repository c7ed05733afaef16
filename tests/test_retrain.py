"""``zeda retrain``: snapshot of captured traffic, resume after kill -9, the gate, promotion by hot-swap."""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from processes import kill_9_once_written
from sglang_guard import sglang_marks

from zeda_cli.main import main
from zeda_core.traffic import CapturedRequest, TrafficStore, open_existing_store
from zeda_server.launch import running_server
from zeda_trainer.common.prompts import Prompt, load_prompts
from zeda_trainer.common.recipes import load_recipe
from zeda_trainer.retrain.job import RetrainConfig, is_held_out, run_lock, snapshot_traffic

ADMIN_KEY = "admin-secret"
REPO = Path(__file__).parents[1]
RECIPE = REPO / "trainer" / "configs" / "tiny-retrain.yaml"


@pytest.fixture(scope="module")
def capture_db(small_data: Path, tmp_path_factory) -> Path:
    """A store holding the SFT prompts of the small data set as if they had been served."""
    db = tmp_path_factory.mktemp("capture") / "capture.db"
    store = TrafficStore(db)
    for prompt in load_prompts(small_data / "prompts" / "sft.jsonl"):
        store.add(CapturedRequest("chat", "fp_served", prompt.text, prompt.chat))
    return db


def _settings(teacher: Path, data: Path, **overrides) -> list[str]:
    """``key=value`` recipe overrides: a few-step OPD on the small models, a small gate."""
    settings = {
        "opd.teacher": teacher,
        "opd.batch_size": 8,
        "opd.sampling.max_new_tokens": 12,
        "opd.optim.max_steps": 6,
        "opd.optim.log_every": 1,
        "opd.optim.checkpoint_every": 2,
        "opd.optim.warmup_steps": 1,
        "opd.optim.lr": 1e-3,
        "replay_prompts": data / "prompts" / "opd.jsonl",
        "min_captured": 8,
        "gate.eval_set": data / "skills" / "validation.jsonl",
        "gate.eval_per_skill": 6,
        "gate.held_out_max": 16,
        "gate.max_new_tokens": 16,
    } | overrides
    return [f"{key}={value}" for key, value in settings.items()]


def _command(db: Path, base: Path, out: Path, teacher: Path, data: Path, **overrides) -> list[str]:
    sets = [arg for setting in _settings(teacher, data, **overrides) for arg in ("--set", setting)]
    return ["retrain", "--capture", str(db), "--base", str(base), "--out", str(out), "--config", str(RECIPE), *sets]


def test_held_out_split_is_stable_and_disjoint(capture_db: Path, small_data: Path, tmp_path: Path) -> None:
    prompts = [Prompt(f"What is {i} + 1?", True, "captured") for i in range(400)]
    held = [p for p in prompts if is_held_out(p, 0.2)]
    assert 0.12 < len(held) / len(prompts) < 0.28
    assert held == [p for p in prompts if is_held_out(p, 0.2)]
    config = load_recipe(RetrainConfig, RECIPE, _settings(tmp_path / "teacher", small_data))
    summary = snapshot_traffic(open_existing_store(capture_db), config, tmp_path / "data")
    train = load_prompts(tmp_path / "data" / "train.jsonl")
    held_out = load_prompts(tmp_path / "data" / "held_out.jsonl")
    assert not {p.text for p in held_out} & {p.text for p in train}
    assert not any(is_held_out(p, config.gate.held_out_share) for p in train)  # replay included
    assert summary["replay"] == sum(p.domain != "captured" for p in train) > 0
    assert summary["captured_train"] == sum(p.domain == "captured" for p in train)


def test_too_little_traffic_is_skipped_with_the_reason(
    capture_db: Path, small_student: Path, small_teacher: Path, small_data: Path, tmp_path: Path, capsys
) -> None:
    args = _command(capture_db, small_student, tmp_path / "run", small_teacher, small_data, min_captured=10_000)
    assert main(args) == 0
    verdict = json.loads((tmp_path / "run" / "verdict.json").read_text())
    assert verdict["decision"] == "skipped" and "not enough traffic" in verdict["reasons"][0]
    assert "SKIPPED" in capsys.readouterr().out
    assert main([*args[:2], str(tmp_path / "missing.db"), *args[3:]]) == 2
    assert "missing.db does not exist" in capsys.readouterr().err
    with run_lock(tmp_path / "busy"):
        assert main([*args[:5], "--out", str(tmp_path / "busy"), *args[7:]]) == 2
    assert "another zeda retrain is running" in capsys.readouterr().err


def test_killed_retrain_resumes_without_lost_progress_and_a_worse_candidate_is_refused(
    capture_db: Path, small_data: Path, tmp_path: Path
) -> None:
    """On the committed tiny models: the small test models are too weak for a quality loss to show."""
    out = tmp_path / "run"
    # Target zero share 0.9 (w = 18 with N = 8, Z = 4) and a strong L_GA: a deliberately worse candidate.
    worse = {"target_zero_ratio": 0.9, "opd.group_loss.alpha": 5.0, "opd.optim.lr": 3e-3}
    teacher, base = REPO / "models" / "tiny-teacher", REPO / "models" / "tiny-zeda"
    args = _command(capture_db, base, out, teacher, small_data, **worse)
    command = [sys.executable, "-m", "zeda_cli.main", *args]
    kill_9_once_written(command, out / "run" / "checkpoints" / "step-00000002")
    assert not (out / "verdict.json").exists()
    snapshot = {name: (out / "data" / name).read_bytes() for name in ("train.jsonl", "held_out.jsonl", "snapshot.json")}
    logged_before_kill = (out / "run" / "metrics.jsonl").read_text().splitlines()[:2]

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {name: (out / "data" / name).read_bytes() for name in snapshot} == snapshot
    records = (out / "run" / "metrics.jsonl").read_text().splitlines()
    # Steps 1-2 were not recomputed (their wall-clock throughput would differ); 3-6 followed them.
    assert records[:2] == logged_before_kill and [json.loads(r)["step"] for r in records] == list(range(1, 7))

    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["zero_group_weight"] == pytest.approx(18.0)
    assert verdict["decision"] == "refuse" and not verdict["promoted"], verdict
    assert verdict["candidate_metrics"]["traffic_zero_ratio"] > verdict["current_metrics"]["traffic_zero_ratio"]
    failed = {c["name"] for c in verdict["checks"] if not c["passed"]}
    assert failed & {"skill accuracy", "teacher NLL of completions (nats/token)"}
    assert "REFUSE" in resumed.stdout and "reason:" in resumed.stdout


@pytest.mark.parametrize("backend", ["torch", pytest.param("sglang", marks=[*sglang_marks(), pytest.mark.slow])])
def test_a_passing_candidate_is_promoted_into_the_running_server(
    capture_db: Path, small_student: Path, small_teacher: Path, small_data: Path, tmp_path: Path, backend: str
) -> None:
    # A gentle run (tiny learning rate): the candidate keeps the current model's quality and r_ze.
    gentle = {"opd.optim.lr": 1e-7, "gate.max_zero_ratio_drop": 0.01, "opd.optim.max_steps": 2}
    args = _command(capture_db, small_student, tmp_path / "cycles", small_teacher, small_data, **gentle)
    flags = ("--admin-key", ADMIN_KEY, "--backend", backend)
    with running_server(small_student, *flags, startup_timeout=600) as url:
        before = httpx.get(f"{url}/health", timeout=30).json()["system_fingerprint"]
        loop = [*args, "--server", url, "--admin-key", ADMIN_KEY, "--every", "1s", "--cycles", "1"]
        assert main(loop) == 0
        (cycle,) = sorted((tmp_path / "cycles").glob("cycle-*"))
        verdict = json.loads((cycle / "verdict.json").read_text())
        assert verdict["decision"] == "promote" and verdict["promoted"], verdict
        status = httpx.get(f"{url}/admin/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).json()
        assert status["current"]["source"] == str((cycle / "candidate").resolve())
        assert status["previous"]["fingerprint"] == before
        assert verdict["promotion"] == f"swapped in as {status['current']['fingerprint']}"
