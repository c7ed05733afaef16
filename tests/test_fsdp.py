"""FSDP2 training under ``accelerate launch`` with 2 CPU processes (gloo), against one process.

The processes run ``zeda train sft|opd`` with ``trainer/configs/accelerate/fsdp2-cpu-2proc.yaml``
(the CPU twin of ``fsdp-8gpu.yaml``): each holds half of every weight, and half of every global
batch. The trained weights must be those of one process on the same global batches; the
checkpoints are FSDP's sharded state (torch.distributed.checkpoint), and a run resumed from one
continues exactly; the exported model is a plain ZEDA checkpoint. ``fsdp_generation_probe.py``
checks sampling from the sharded model when the processes sample different numbers of tokens.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loss_probe import tiny_models
from processes import assert_resumed_exactly, logged_up_to
from safetensors.torch import load_file

from zeda_core import load_model
from zeda_core.convert import PRESERVE_LOGIT
from zeda_core.model_queries import model_spec, moe_blocks
from zeda_trainer.common.recipes import load_recipe
from zeda_trainer.stages.opd import OpdConfig, train_opd
from zeda_trainer.stages.sft import SftConfig, train_sft

ROOT = Path(__file__).parents[1]
FSDP_CONFIG = ROOT / "trainer" / "configs" / "accelerate" / "fsdp2-cpu-2proc.yaml"
RECIPES = {stage: ROOT / "trainer" / "configs" / f"tiny-{stage}.yaml" for stage in ("sft", "opd")}
GENERATION_PROBE = Path(__file__).with_name("fsdp_generation_probe.py")
ENV = {**os.environ, "ACCELERATE_USE_CPU": "true"}
STEPS = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fsdp_launch(*args: str) -> list[str]:
    """``accelerate launch`` of 2 FSDP2 CPU processes, on a free port (other runs may hold the default)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG)]
    return [*launch, "--main_process_port", str(_free_port()), *args]


def _overrides(overrides: dict[str, object], run: str, tmp_path: Path) -> list[str]:
    """``key=value`` overrides of a run into ``tmp_path/<run>``, its model into ``tmp_path/<run>-out``."""
    overrides = overrides | {"run_dir": tmp_path / run, "out": tmp_path / f"{run}-out"}
    return [f"{key}={value}" for key, value in overrides.items()]


def _fsdp_train(stage: str, overrides: dict[str, object], run: str, tmp_path: Path, *flags: str) -> subprocess.Popen:
    """``zeda train <stage>`` of the tiny recipe on 2 FSDP2 processes; stderr goes to ``tmp_path/<run>.log``."""
    sets = [arg for override in _overrides(overrides, run, tmp_path) for arg in ("--set", override)]
    command = _fsdp_launch("-m", "zeda_cli.main", "train", stage, "--config", str(RECIPES[stage]), *sets, *flags)
    with (tmp_path / f"{run}.log").open("w") as log:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=ENV)


def _wait(process: subprocess.Popen, run: str, tmp_path: Path) -> None:
    assert process.wait(timeout=600) == 0, (tmp_path / f"{run}.log").read_text()[-3000:]


def _run_fsdp_and_one_process(stage: str, overrides: dict[str, object], tmp_path: Path) -> None:
    """The FSDP2 run ``fsdp`` and, meanwhile in this process, the one-process run ``one`` of the same recipe."""
    fsdp = _fsdp_train(stage, overrides, "fsdp", tmp_path)
    recipe, train = {"sft": (SftConfig, train_sft), "opd": (OpdConfig, train_opd)}[stage]
    train(load_recipe(recipe, RECIPES[stage], _overrides(overrides, "one", tmp_path)))
    _wait(fsdp, "fsdp", tmp_path)


def _assert_same_weights(got: Path, expected: Path, atol: float) -> None:
    got_weights, expected_weights = load_file(got / "model.safetensors"), load_file(expected / "model.safetensors")
    assert got_weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(got_weights[name], tensor, rtol=0, atol=atol, msg=name)


def _assert_sharded_checkpoints(run_dir: Path) -> None:
    """Each checkpoint holds the model and optimizer as one DCP shard file per process, no full weights."""
    for step in (2, STEPS):
        checkpoint = run_dir / "checkpoints" / f"step-{step:08d}"
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):
            assert sorted(p.name for p in (checkpoint / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert not (checkpoint / "model.safetensors").exists() and not (checkpoint / "optimizer.bin").exists()


def _assert_sft_resumes_exactly(overrides: dict[str, object], tmp_path: Path) -> None:
    """The FSDP2 run ``fsdp`` resumed from its step-2 checkpoint ends on its very weights, logging on from step 2.

    The resumed run directory holds what ``fsdp`` had after step 2: its step-2 checkpoint, its
    metrics up to step 2 and its rollout cache.
    """
    source, resumed = tmp_path / "fsdp", tmp_path / "resumed"
    shutil.copytree(source / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    logged = logged_up_to(source, 2)
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in logged))
    shutil.copy(source / "rollouts.jsonl", resumed)
    _wait(_fsdp_train("sft", overrides, "resumed", tmp_path, "--resume"), "resumed", tmp_path)
    _assert_same_weights(tmp_path / "resumed-out", tmp_path / "fsdp-out", atol=0.0)
    assert_resumed_exactly(logged, resumed, list(range(1, STEPS + 1)))


def _optim(warmup: int) -> dict[str, object]:
    return {
        "optim.max_steps": STEPS,
        "optim.log_every": 1,
        "optim.checkpoint_every": 2,
        "optim.warmup_steps": warmup,
        "optim.lr": 1e-3,
    }


@pytest.mark.slow
def test_fsdp2_sft_matches_one_process_and_resumes(small_teacher: Path, small_data: Path, tmp_path: Path) -> None:
    # The tiny recipe (teacher KL, text mix) with a function-preserving init whose zero-row offset
    # is nudged after every step: the nudge moves sharded parameters.
    overrides = {
        "teacher": small_teacher,
        "prompts": small_data / "prompts" / "sft.jsonl",
        "text.path": small_data / "text" / "train.jsonl",
        "batch_size": 8,
        "text.rows": 4,
        "rollout.max_new_tokens": 8,
        "init": "preserve",
        "zero_ramp_steps": STEPS,
        "zero_ramp_step_size": 0.5,
        **_optim(warmup=2),
    }
    _run_fsdp_and_one_process("sft", overrides, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["processes"] for r in records] == [2] * STEPS
    _assert_same_weights(tmp_path / "fsdp-out", tmp_path / "one-out", atol=1e-4)
    student = load_model(tmp_path / "fsdp-out")
    assert model_spec(student).num_zero_experts == 4
    # The zero share starts near 0, under its target: every nudge raised the offsets.
    for block in moe_blocks(student):
        assert (block.gate.zero_logit_bias > PRESERVE_LOGIT + 1.0).all()
    _assert_sharded_checkpoints(tmp_path / "fsdp")
    _assert_sft_resumes_exactly(overrides, tmp_path)


@pytest.mark.slow
def test_fsdp2_opd_matches_one_process(
    small_teacher: Path, small_student: Path, small_data: Path, tmp_path: Path
) -> None:
    # Near-greedy sampling (top_p keeps the top token), so that two processes sample what one does.
    # Resuming takes the same path as in SFT (checked there); sampling different lengths on each
    # process, the probe below.
    overrides = {
        "student": small_student,
        "teacher": small_teacher,
        "prompts": small_data / "prompts" / "opd.jsonl",
        "batch_size": 4,
        "sampling.max_new_tokens": 8,
        "sampling.top_p": 1e-4,
        **_optim(warmup=1),
    }
    _run_fsdp_and_one_process("opd", overrides, tmp_path)
    _assert_same_weights(tmp_path / "fsdp-out", tmp_path / "one-out", atol=1e-4)
    trained = load_file(tmp_path / "fsdp-out" / "model.safetensors")
    start = load_file(small_student / "model.safetensors")
    assert trained.keys() == start.keys() and any(not torch.equal(trained[k], start[k]) for k in start)
    assert model_spec(load_model(tmp_path / "fsdp-out")).num_zero_experts == 4
    _assert_sharded_checkpoints(tmp_path / "fsdp")


def test_sampling_from_the_sharded_model_when_processes_sample_different_lengths(tmp_path: Path) -> None:
    done = subprocess.run(
        _fsdp_launch(str(GENERATION_PROBE), str(tmp_path / "probe")),
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"probe.{rank}") for rank in (0, 1)]
    assert {len(r["tokens"][0]) for r in ranks} == {2, 7}  # the processes ran different numbers of forwards
    initial = tiny_models()[0].state_dict()
    for rank, result in enumerate(ranks):
        assert result["tokens"] == result["reference"]["tokens"], rank
        assert result["unsharded_inside"] and result["sharded_after_sampling"] and result["sharded_after_forward"]
    weights, expected = ranks[0]["weights"], ranks[0]["reference"]["weights"]
    assert weights.keys() == expected.keys()
    assert any(not torch.equal(expected[name], initial[name]) for name in expected)  # the step moved them
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6, msg=name)
