"""Training under ``accelerate launch`` with 2 CPU processes (gloo): each rank takes half of every batch.

The processes run ``sft_batch_probe.py``, which logs the rows each one trains on, or
``loss_probe.py``, which writes the losses and gradients of fixed global batches.

On a machine without GPUs, ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2``
starts CPU processes that join one gloo group (``--cpu`` alone runs a single process).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from zeda_core import load_model
from zeda_trainer.common.prompts import load_prompts
from zeda_trainer.common.recipes import load_recipe
from zeda_trainer.data.packing import global_batch_rows
from zeda_trainer.stages.rollouts import cached_rollouts
from zeda_trainer.stages.sft import SftConfig, text_mix_blocks

PROBE = Path(__file__).with_name("sft_batch_probe.py")
LOSS_PROBE = Path(__file__).with_name("loss_probe.py")
RECIPE = Path(__file__).parents[1] / "trainer" / "configs" / "tiny-sft.yaml"  # what `zeda train sft` reads

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
    command = [sys.executable, *LAUNCH, str(PROBE), "train", "sft", *sets]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "ZEDA_BATCH_LOG": str(tmp_path / "batches")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(r["processes"] == 2 for r in records)
    assert records[0]["lr"] == pytest.approx(0.5e-3)  # linear warm-up 2/4: the schedule steps once per step
    assert load_model(tmp_path / "out").config.zce_nums == [4]
    assert (tmp_path / "run" / "checkpoints" / "step-00000004").is_dir()

    # Each process took its half of every global batch: rank r the rows r, r + 2, ... of its rollouts
    # and of its text-mix blocks.
    config = load_recipe(SftConfig, RECIPE, [f"{key}={value}" for key, value in overrides.items()])
    rollouts = cached_rollouts(config.run_dir / "rollouts.jsonl", load_prompts(config.prompts))
    blocks = text_mix_blocks(AutoTokenizer.from_pretrained(small_teacher), config.text, config.seed)
    assert config.text.rows > 0 and blocks is not None
    taken = {
        rank: [json.loads(line) for line in (tmp_path / f"batches.{rank}").read_text().splitlines()] for rank in (0, 1)
    }
    assert len(taken[0]) == len(taken[1]) == 4
    for step in range(4):
        rows = global_batch_rows(step, config.batch_size, len(rollouts), config.seed).tolist()
        text_rows = global_batch_rows(step, config.text.rows, len(blocks), config.seed + 1).tolist()
        for rank in (0, 1):
            mine = [[rollouts[i]["prompt_ids"], rollouts[i]["completion_ids"]] for i in rows[rank::2]]
            mine += [[[], blocks[i].tolist()] for i in text_rows[rank::2]]
            assert taken[rank][step] == mine, (rank, step)


def test_two_process_losses_and_gradients_are_the_global_batch_ones(tmp_path: Path) -> None:
    # The same global batches in 1 process and split over 2 whose valid tokens differ: the loss
    # (the logged value, averaged over processes), the metrics and DDP's averaged gradients of
    # every SFT and OPD loss equal the 1-process ones. A mean of per-process means would not.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    single = subprocess.Popen([sys.executable, str(LOSS_PROBE), str(tmp_path / "one")], env=env, stderr=subprocess.PIPE)
    done = subprocess.run(
        [sys.executable, *LAUNCH, str(LOSS_PROBE), str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert single.wait(timeout=600) == 0, single.stderr.read()[-3000:]
    reference = torch.load(tmp_path / "one.0")
    ranks = [torch.load(tmp_path / f"two.{rank}") for rank in (0, 1)]
    assert ranks[0]["valid_tokens"] != ranks[1]["valid_tokens"]
    assert ranks[0]["valid_tokens"] + ranks[1]["valid_tokens"] == reference["valid_tokens"]
    cases = ["sft", "sft-per-sequence", "opd", "opd-per-sequence"]
    for case in cases:
        expected = reference[case]
        assert expected["metrics"].get("clip_fraction", 0.5) > 0  # OPD: the clip is active
        for rank, results in enumerate(ranks):
            got = results[case]
            where = f"{case}, rank {rank}"
            torch.testing.assert_close(got["loss"], expected["loss"], rtol=1e-5, atol=1e-5, msg=f"{where}: loss")
            assert got["metrics"] == pytest.approx(expected["metrics"], rel=1e-5, abs=1e-5), where
            assert got["grads"].keys() == expected["grads"].keys()
            assert any(grad.abs().sum() > 0 for grad in expected["grads"].values())
            for name, grad in expected["grads"].items():
                torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-5, msg=f"{where}: {name}")
