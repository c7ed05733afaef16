"""The frozen teacher as a scorer of sampled tokens: in-process, or a remote ZEDA server over HTTP.

Both return, for each sequence, the teacher's log-probability of every token from ``start`` on
(the sampled completion), conditioned on everything before it. The remote teacher uses the
OpenAI completions API as log-prob servers implement it: the token ids as ``prompt``,
``echo: true``, ``logprobs: 0``, ``max_tokens: 0``; ``zeda serve`` answers it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

import httpx
import torch

from zeda_core.checkpoint import load_model
from zeda_core.errors import ZedaError
from zeda_core.scoring import score_sequences


class TeacherScorer(Protocol):
    def score(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        """Per sequence, the log-probs (nats) of ``sequence[start:]``; ``start >= 1``."""
        ...


class LocalTeacher:
    """A teacher checkpoint loaded in this process, with an optional LRU cache of scored sequences.

    Args:
        path: local checkpoint directory.
        device: where the teacher runs.
        cache_size: scored sequences kept (0 turns the cache off).
        batch_size: sequences per teacher forward.
    """

    def __init__(self, path: str, device: torch.device, cache_size: int = 4096, batch_size: int = 32) -> None:
        self.model = load_model(path).to(device).eval()
        self.model.requires_grad_(False)
        self.device = device
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.cache: OrderedDict[tuple[int, ...], list[float]] = OrderedDict()
        self.hits = 0

    def score(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        scores: dict[int, list[float]] = {}
        todo = []
        for index, sequence in enumerate(sequences):
            cached = self.cache.get(tuple(sequence))
            if cached is None:
                todo.append(index)
            else:
                self.cache.move_to_end(tuple(sequence))
                self.hits += 1
                scores[index] = cached
        scored = score_sequences(self.model, [sequences[i] for i in todo], pad_token_id=0, batch_size=self.batch_size)
        for index, full in zip(todo, scored.logprobs, strict=True):
            scores[index] = full
            self._remember(tuple(sequences[index]), full)
        return [scores[i][start - 1 :] for i, start in enumerate(starts)]

    def _remember(self, key: tuple[int, ...], value: list[float]) -> None:
        if self.cache_size == 0:
            return
        self.cache[key] = value
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)


class RemoteTeacher:
    """A teacher served over HTTP by ``zeda serve`` (or any server with prompt log-probs).

    Args:
        url: server base URL, e.g. ``http://127.0.0.1:8000``.
        model: model name sent with each request.
        api_key: bearer token, if the server needs one.
        timeout: seconds per request.
    """

    def __init__(self, url: str, model: str = "teacher", api_key: str | None = None, timeout: float = 120.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.model = model

    def score(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        body = {"model": self.model, "prompt": sequences, "echo": True, "logprobs": 0, "max_tokens": 0}
        try:
            response = self.client.post("/v1/completions", json=body)
        except httpx.HTTPError as exc:
            raise ZedaError(f"remote teacher {self.client.base_url} is unreachable: {exc}") from exc
        if response.status_code != 200:
            raise ZedaError(f"remote teacher answered HTTP {response.status_code}: {response.text[:300]}")
        choices = sorted(response.json()["choices"], key=lambda choice: choice["index"])
        if len(choices) != len(sequences):
            raise ZedaError(f"remote teacher returned {len(choices)} choices for {len(sequences)} sequences")
        scores = []
        for choice, sequence, start in zip(choices, sequences, starts, strict=True):
            values = choice["logprobs"]["token_logprobs"]
            if len(values) != len(sequence):
                raise ZedaError(f"remote teacher scored {len(values)} tokens of a {len(sequence)}-token sequence")
            scores.append([float(v) for v in values[start:]])
        return scores


def make_teacher(source: str, device: torch.device, cache_size: int = 4096, api_key: str | None = None):
    """A :class:`RemoteTeacher` for an ``http(s)://`` URL, else a :class:`LocalTeacher` of that checkpoint."""
    if source.startswith(("http://", "https://")):
        return RemoteTeacher(source, api_key=api_key)
    return LocalTeacher(source, device, cache_size=cache_size)
