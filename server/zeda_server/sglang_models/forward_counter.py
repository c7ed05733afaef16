"""What SGLang's CPU forward did, counted across processes: expert slots computed and skipped, and
the time spent in the MoE blocks and in the whole model forward.

The counters live in a small file of int64 values, [MAX_RANKS, 4] (computed slots, skipped slots,
MoE-block ns, model-forward ns), one row per tensor-parallel rank, memory-mapped by SGLang's
scheduler processes (which add to their row) and by the server (which reads it for ``/metrics``).
The file is named by ``$ZEDA_SGLANG_FORWARD_COUNTER``; without it counting is off. Times are only
taken on CPU, where every op has finished when it returns. This module imports SGLang only when a
process first counts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

COUNTER_ENV = "ZEDA_SGLANG_FORWARD_COUNTER"
MAX_RANKS = 64
_FIELDS = 4
_COMPUTED, _SKIPPED, _MOE_NS, _MODEL_NS = range(_FIELDS)


@dataclass(frozen=True)
class ForwardCounts:
    """Rank 0's totals since the server started.

    With tensor parallelism every rank computes every real slot on its shard of the intermediate
    size, so rank 0 stands for the whole layer.
    """

    computed_slots: int
    skipped_slots: int
    moe_seconds: float
    model_seconds: float


def create_counter_file(path: Path) -> Path:
    """Create (or reset) a zeroed counter file at ``path``: [MAX_RANKS, 4] int64."""
    path.write_bytes(bytes(MAX_RANKS * _FIELDS * 8))
    return path


def read_forward_counts(path: Path) -> ForwardCounts:
    values = torch.from_file(str(path), shared=False, size=MAX_RANKS * _FIELDS, dtype=torch.int64)
    rank0 = values.view(MAX_RANKS, _FIELDS)[0].tolist()
    return ForwardCounts(rank0[_COMPUTED], rank0[_SKIPPED], rank0[_MOE_NS] / 1e9, rank0[_MODEL_NS] / 1e9)


class ForwardCounter:
    """This process's row of the shared counter file (``$ZEDA_SGLANG_FORWARD_COUNTER``); a no-op without it."""

    def __init__(self) -> None:
        self._row: torch.Tensor | None = None
        self._opened = False

    def _open(self) -> torch.Tensor | None:
        self._opened = True
        path = os.environ.get(COUNTER_ENV)
        if not path:
            return None
        from sglang.srt.distributed.parallel_state import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank()
        if rank >= MAX_RANKS:
            return None
        values = torch.from_file(path, shared=True, size=MAX_RANKS * _FIELDS, dtype=torch.int64)
        return values.view(MAX_RANKS, _FIELDS)[rank]

    def _add(self, field: int, amount: int) -> None:
        if not self._opened:
            self._row = self._open()
        if self._row is not None:
            self._row[field] += amount

    def add_slots(self, computed: int, skipped: int) -> None:
        self._add(_COMPUTED, computed)
        self._add(_SKIPPED, skipped)

    def add_ns(self, part: str, nanoseconds: int) -> None:
        """Add wall time to ``part``: ``moe`` or ``model``."""
        self._add({"moe": _MOE_NS, "model": _MODEL_NS}[part], nanoseconds)

    @contextmanager
    def timing(self, part: str) -> Iterator[None]:
        """Add the wall time of the block to ``part``."""
        started = time.perf_counter_ns()
        try:
            yield
        finally:
            self.add_ns(part, time.perf_counter_ns() - started)


FORWARD_COUNTER = ForwardCounter()
