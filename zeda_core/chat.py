"""Chat templating: the one place token ids of chat messages are built."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from zeda_core.errors import ZedaError


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of chat ``messages`` (``role``, ``content``) under the tokenizer's chat template, with
    the assistant turn opened (the generation prompt).

    Raises:
        ZedaError: the tokenizer has no chat template.
    """
    if not tokenizer.chat_template:
        raise ZedaError(f"tokenizer {tokenizer.name_or_path!r} has no chat template: chat messages cannot be encoded")
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
