"""A count of the expert slots SGLang's CPU MoE forward computed and skipped, shared across processes.

The counters live in a small file of int64 values, [MAX_RANKS, 2] (computed, skipped), one row per
tensor-parallel rank, memory-mapped by SGLang's scheduler processes (which add to their row) and by
the server (which reads it for ``/metrics``). The file is named by ``$ZEDA_SGLANG_SLOT_COUNTER``;
without it counting is off. This module imports SGLang only when a process first counts.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

COUNTER_ENV = "ZEDA_SGLANG_SLOT_COUNTER"
MAX_RANKS = 64
_FIELDS = 2  # computed, skipped


def create_slot_counter_file(path: Path) -> Path:
    """Create (or reset) a zeroed counter file at ``path``: [MAX_RANKS, 2] int64."""
    path.write_bytes(bytes(MAX_RANKS * _FIELDS * 8))
    return path


def read_slot_counter(path: Path) -> tuple[int, int]:
    """(computed, skipped) slots of rank 0; with tensor parallelism every rank computes every real
    slot on its shard of the intermediate size, so rank 0 stands for the whole layer."""
    values = torch.from_file(str(path), shared=False, size=MAX_RANKS * _FIELDS, dtype=torch.int64)
    rank0 = values.view(MAX_RANKS, _FIELDS)[0]
    return int(rank0[0]), int(rank0[1])


class SlotCounter:
    """This process's row of the shared counter file (``$ZEDA_SGLANG_SLOT_COUNTER``); a no-op without it."""

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

    def add(self, computed: int, skipped: int) -> None:
        if not self._opened:
            self._row = self._open()
        if self._row is not None:
            self._row[0] += computed
            self._row[1] += skipped


SLOT_COUNTER = SlotCounter()
