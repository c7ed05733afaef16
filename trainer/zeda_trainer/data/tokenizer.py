"""A byte-level BPE tokenizer trained locally, with single-digit tokens and a chat template."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from zeda_core.errors import ZedaError

PAD, BOS, END = "<|pad|>", "<|bos|>", "<|end|>"
ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, BOS, END, *ROLES.values()]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{% elif message['role'] == 'user' %}<|user|>"
    "{% else %}<|assistant|>{% endif %}{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train BPE on ``texts``; digits always split into single tokens (arithmetic stays learnable).

    Special tokens get ids 0..5 in the order of SPECIAL_TOKENS (pad, bos, end, system, user, assistant).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Every sequence starts with BOS: plain tokenization adds it, the chat template writes it.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=END,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )


def chat_text(prompt: str, answer: str | None = None) -> str:
    """One user turn and optionally the assistant's answer, as the chat template renders them
    (without the leading BOS, which tokenization adds)."""
    text = f"{ROLES['user']}{prompt}{END}{ROLES['assistant']}"
    return text if answer is None else f"{text}{answer}{END}"


def require_same_tokenizer(reference: PreTrainedTokenizerBase, path: Path, what: str, reference_name: str) -> None:
    """Refuse the model at ``path`` when its tokenizer differs from ``reference`` (scores would not line up)."""
    if AutoTokenizer.from_pretrained(path).get_vocab() != reference.get_vocab():
        raise ZedaError(f"{what} {path} has a different tokenizer from the {reference_name}'s; both must share one")
