"""Model versions of a running server: what a hot-swap installs and ``system_fingerprint`` names.

:class:`VersionInfo` (and its :meth:`~VersionInfo.describe`) is what both engines report about a
version; each engine's version type extends it with what it holds (a model, or SGLang's weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class VersionInfo:
    """One servable set of weights, as the admin API describes it.

    Attributes:
        fingerprint: ``system_fingerprint`` of responses it produces.
        source: where its weights came from (a checkpoint path), and ``scope`` (``all`` or
            ``router``: only the router rows were taken from ``source``).
        loaded_at: unix seconds when it was made.
    """

    fingerprint: str
    source: str
    scope: str = "all"
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, object]:
        """The admin API's description: fingerprint, source, scope, loaded_at."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(VersionInfo)}


@dataclass(kw_only=True)
class ModelVersion(VersionInfo):
    """A version of the torch engine; ``model`` is the HF causal LM, in eval mode on the engine's device."""

    model: torch.nn.Module


def describe_versions(current: VersionInfo, previous: VersionInfo | None) -> dict[str, object]:
    """The version new requests start on, and the one a rollback returns to (None before any swap)."""
    return {"current": current.describe(), "previous": previous.describe() if previous else None}


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
