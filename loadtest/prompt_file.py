"""The load tests' prompt files: JSONL, one ``{"prompt": ...}`` per line (no locust import, so
benchmarks and the A/B runner read them without gevent's monkey-patching)."""

from __future__ import annotations

import json
from pathlib import Path


def load_prompt_file(path: str) -> list[str]:
    """Prompts of a JSONL file; raises ValueError naming the file and line of a bad record."""
    prompts = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"prompt file {path}: {exc.strerror}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"]:
            raise ValueError(f"{path}:{number}: needs a non-empty string field 'prompt'")
        prompts.append(record["prompt"])
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts")
    return prompts
