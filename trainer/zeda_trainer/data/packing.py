"""Pretraining token blocks: every training document, BOS ... EOS, shuffled and packed."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from zeda_core.errors import ZedaError
from zeda_trainer.data.tokenizer import chat_text


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file that the project wrote itself (trusted)."""
    with path.open() as handle:
        return [json.loads(line) for line in handle]


def read_user_jsonl(path: Path, kind: str) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` for each non-blank line of a user-supplied JSONL file; ``where`` is ``path:line``.

    Raises:
        ZedaError: a missing file (named as ``kind``), invalid JSON or a non-object line, with its line.
    """
    if not path.is_file():
        raise ZedaError(f"{kind} {path} does not exist")
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ZedaError(f"{where}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise ZedaError(f"{where}: each line must be a JSON object")
        yield where, record


def pretraining_documents(data_dir: Path) -> list[str]:
    """Skills train examples in chat form, then code and prose train documents as raw text."""
    skills = [chat_text(row["prompt"], row["answer"]) for row in read_jsonl(data_dir / "skills" / "train.jsonl")]
    return skills + [row["text"] for row in read_jsonl(data_dir / "text" / "train.jsonl")]


def pack_blocks(tokenizer: PreTrainedTokenizerBase, documents: list[str], block_size: int, seed: int) -> torch.Tensor:
    """[num_blocks, block_size] int64: shuffled documents, each BOS ... EOS, concatenated and cut."""
    order = list(documents)
    random.Random(seed).shuffle(order)
    ids = tokenizer(order, add_special_tokens=True).input_ids
    eos = tokenizer.eos_token_id
    stream = torch.tensor([token for doc in ids for token in (*doc, eos)], dtype=torch.long)
    usable = stream.numel() // block_size * block_size
    return stream[:usable].view(-1, block_size)


def global_batch_rows(step: int, batch_size: int, num_blocks: int, seed: int) -> torch.Tensor:
    """Block indices of the global batch of ``step``: a fresh permutation each epoch.

    The data position is a function of the step alone, so a resumed run sees exactly the
    batches an uninterrupted run would have seen.
    """
    samples = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, positions = samples // num_blocks, samples % num_blocks
    rows = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        permutation = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        selected = epochs == epoch
        rows[selected] = permutation[positions[selected]]
    return rows
