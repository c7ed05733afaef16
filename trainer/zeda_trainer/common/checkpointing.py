"""Resumable training checkpoints: accelerate state (model, optimizer, scheduler, RNG) + trainer state.

A checkpoint directory becomes visible only once complete (written under a temporary name, then
renamed), so a run killed at any moment resumes from the last complete checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Save everything needed to continue after ``step`` optimizer steps; keep the newest ``keep``."""
    root = checkpoints_dir(run_dir)
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def load_latest_checkpoint(accelerator: Accelerator, run_dir: Path) -> dict[str, Any] | None:
    """Restore the newest complete checkpoint into the prepared objects; its trainer state, or None."""
    found = complete_checkpoints(run_dir)
    if not found:
        return None
    accelerator.load_state(str(found[-1]))
    return json.loads((found[-1] / STATE_FILE).read_text())
