"""Killing a training process at a known point, for the resume tests."""

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
