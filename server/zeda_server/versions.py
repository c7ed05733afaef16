"""Model versions of a running server: what a hot-swap installs and ``system_fingerprint`` names."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class ModelVersion:
    """One servable set of weights.

    Attributes:
        model: the HF causal LM, in eval mode on the engine's device.
        fingerprint: ``system_fingerprint`` of responses it produces.
        source: where its weights came from (a checkpoint path), and ``scope`` (``all`` or
            ``router``: only the router rows were taken from ``source``).
        loaded_at: unix seconds when it was swapped in.
    """

    model: torch.nn.Module
    fingerprint: str
    source: str
    scope: str = "all"
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, object]:
        return {key: getattr(self, key) for key in ("fingerprint", "source", "scope", "loaded_at")}


def checkpoint_fingerprint(checkpoint: Path) -> str:
    """``fp_`` + a short hash of the checkpoint's weights files (names, sizes, times)."""
    digest = hashlib.sha256()
    for path in sorted(checkpoint.glob("*.safetensors")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return "fp_" + digest.hexdigest()[:12]


def router_fingerprint(base: str, candidate: str) -> str:
    """Fingerprint of ``base``'s weights with the router rows of the checkpoint fingerprinted ``candidate``."""
    return "fp_" + hashlib.sha256(f"{base}+router:{candidate}".encode()).hexdigest()[:12]
