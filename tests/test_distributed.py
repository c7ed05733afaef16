"""SFT under ``accelerate launch`` with 2 CPU processes (gloo): each rank takes half of every batch.

On a machine without GPUs, ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2``
starts CPU processes that join one gloo group (``--cpu`` alone runs a single process).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zeda_core import load_model

LAUNCH = [
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def test_two_process_sft(small_teacher: Path, small_data: Path, tmp_path: Path) -> None:
    overrides = {
        "teacher": small_teacher,
        "prompts": small_data / "prompts" / "sft.jsonl",
        "text.path": small_data / "text" / "train.jsonl",
        "run_dir": tmp_path / "run",
        "out": tmp_path / "out",
        "batch_size": 8,
        "rollout.max_new_tokens": 8,
        "optim.max_steps": 4,
        "optim.log_every": 2,
        "optim.checkpoint_every": 2,
        "optim.warmup_steps": 4,
        "optim.lr": 1e-3,
    }
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    command = [sys.executable, *LAUNCH, "-m", "zeda_cli.main", "train", "sft", *sets]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(r["processes"] == 2 for r in records)
    assert records[0]["lr"] == pytest.approx(0.5e-3)  # linear warm-up 2/4: the schedule steps once per step
    assert load_model(tmp_path / "out").config.zce_nums == [4]
    assert (tmp_path / "run" / "checkpoints" / "step-00000004").is_dir()
