"""Killing a training process at a known point, and checking the run it resumes, for the resume tests."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path


def kill_9_once_written(command: list[str], marker: Path, timeout: float = 300.0) -> None:
    """Run ``command`` until ``marker`` exists (e.g. its first checkpoint), then SIGKILL it.

    Fails if the process ended, or the time ran out, before ``marker`` appeared.
    """
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert marker.exists(), f"{marker} did not appear before the process ended or {timeout} s passed"


def logged_up_to(run_dir: Path, step: int) -> list[str]:
    """The lines of ``run_dir/metrics.jsonl`` that record steps ``<= step``, as written."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [line for line in lines if json.loads(line)["step"] <= step]


def assert_resumed_exactly(logged_before: list[str], run_dir: Path, steps: list[int]) -> None:
    """The metrics log of a resumed run keeps the records written before the interruption, byte for byte,
    then logs the remaining steps: ``steps`` is the whole run's list of logged steps.

    A run that ignored its checkpoint and restarted at step 0 would reach the same weights (training
    is deterministic) but rewrite those records: their wall-clock ``tokens_per_s`` would differ.
    """
    assert logged_before, "nothing was logged before the interruption"
    records = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert records[: len(logged_before)] == logged_before, "records logged before the interruption were recomputed"
    assert [json.loads(record)["step"] for record in records] == steps
