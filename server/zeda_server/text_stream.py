"""Incremental detokenisation with stop strings: what a request may show so far, and where it stops."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


class TextStream:
    """Text of a growing list of generated token ids, cut at the first stop string.

    ``delta()`` returns only text that can no longer change: a trailing partial UTF-8 character
    and any tail that could still become a stop string are held back until resolved.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def update(self, token_ids: list[int]) -> None:
        """Re-decode all generated ids; sets ``stopped`` and cuts the text at a stop string."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            text, self.stopped = text[: min(hits)], True
        self.text = text

    def delta(self, final: bool) -> str:
        """New text since the last call; everything left when ``final``."""
        end = len(self.text)
        if not final:
            end = len(self.text.rstrip(REPLACEMENT))
            if not self.stopped:
                for stop in self.stop:
                    for length in range(min(len(stop) - 1, end), 0, -1):
                        if self.text[:end].endswith(stop[:length]):
                            end -= length
                            break
        end = max(end, self.emitted)
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece
