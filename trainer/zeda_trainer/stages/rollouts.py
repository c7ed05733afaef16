"""Teacher rollouts for SFT: batched generation, cached to JSONL, resumable and deduplicated.

Each finished batch is appended to the cache and flushed, so a killed run keeps everything but
the batch in flight; a torn last line is dropped when the cache is read back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from zeda_core.atomic import atomic_write_text
from zeda_core.errors import ZedaError
from zeda_trainer.common.generation import generate
from zeda_trainer.common.prompts import Prompt, encode_prompt


class RolloutConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = 64
    batch_size: int = 64
    temperature: float = 0.0
    top_p: float = 1.0


def _read_cache(cache: Path) -> dict[str, dict[str, Any]]:
    if not cache.is_file():
        return {}
    lines = cache.read_text().splitlines()
    records = {}
    for index, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if index != len(lines) - 1:
                raise ZedaError(f"rollout cache {cache}:{index + 1} is corrupt; delete it to regenerate") from None
            atomic_write_text(cache, "".join(kept + "\n" for kept in lines[:-1]))  # a torn last write
            break
        records[json.dumps([record["prompt"], record["chat"]])] = record
    return records


def teacher_rollouts(
    teacher: torch.nn.Module | None,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    cache: Path,
    config: RolloutConfig,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The teacher's completion of every prompt, generated once and cached in ``cache``.

    Returns one record per prompt, in prompt order: ``prompt``, ``chat``, ``domain``,
    ``prompt_ids``, ``completion_ids`` (the stop token included when produced), ``finish_reason``.
    """
    done = _read_cache(cache)
    todo = [p for p in prompts if p.key not in done]
    if todo and teacher is None:
        raise ZedaError("no teacher given to generate the missing rollouts")
    cache.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed + len(done))
    with cache.open("a") as handle:
        for start in tqdm(range(0, len(todo), config.batch_size), desc="teacher rollouts", disable=not todo):
            chunk = todo[start : start + config.batch_size]
            encoded = [encode_prompt(tokenizer, p) for p in chunk]
            generations = generate(
                teacher,
                encoded,
                config.max_new_tokens,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
                temperature=config.temperature,
                top_p=config.top_p,
                batch_size=config.batch_size,
                generator=generator,
            )
            for prompt, ids, gen in zip(chunk, encoded, generations, strict=True):
                record = {
                    "prompt": prompt.text,
                    "chat": prompt.chat,
                    "domain": prompt.domain,
                    "prompt_ids": ids,
                    "completion_ids": gen.tokens,
                    "finish_reason": gen.finish_reason,
                }
                handle.write(json.dumps(record) + "\n")
                done[prompt.key] = record
            handle.flush()
            os.fsync(handle.fileno())
    return [done[p.key] for p in prompts]


def cached_rollouts(cache: Path, prompts: list[Prompt]) -> list[dict[str, Any]]:
    """The cached rollout of every prompt, in prompt order (all must be cached)."""
    done = _read_cache(cache)
    missing = [p.text for p in prompts if p.key not in done]
    if missing:
        raise ZedaError(f"rollout cache {cache} lacks {len(missing)} prompts, e.g. {missing[0][:60]!r}")
    return [done[p.key] for p in prompts]
