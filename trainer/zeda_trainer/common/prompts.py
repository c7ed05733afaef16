"""Prompt sets: the JSONL records a job reads its prompts from, and their token ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from zeda_core.chat import chat_prompt_ids
from zeda_core.errors import ZedaError
from zeda_trainer.data.packing import read_user_jsonl


@dataclass(frozen=True)
class Prompt:
    """A prompt of a prompt set: chat turns get the chat template, raw text is continued."""

    text: str
    chat: bool
    domain: str

    @property
    def key(self) -> str:
        return json.dumps([self.text, self.chat])


def load_prompts(path: Path) -> list[Prompt]:
    """Distinct prompts of a JSONL prompt set (``prompt``, optional ``chat`` and ``domain``), in order.

    Raises:
        ZedaError: naming the file and line of the first bad record, or an empty set.
    """
    prompts: dict[str, Prompt] = {}
    for where, record in read_user_jsonl(path, "prompt file"):
        if not isinstance(record.get("prompt"), str) or not record["prompt"]:
            raise ZedaError(f"{where}: needs a non-empty string field 'prompt'")
        prompt = Prompt(record["prompt"], bool(record.get("chat", True)), str(record.get("domain", "default")))
        prompts.setdefault(prompt.key, prompt)
    if not prompts:
        raise ZedaError(f"prompt file {path} has no prompts")
    return list(prompts.values())


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    return prompt_ids(tokenizer, prompt.text) if prompt.chat else tokenizer(prompt.text).input_ids


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a user prompt: the chat template when the tokenizer has one, else raw text."""
    if tokenizer.chat_template:
        return chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt).input_ids
