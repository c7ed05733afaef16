"""Launch configurations of the grouped GEMM: tuned entries per shape, and a fallback rule.

Tuned entries come from ``kernels/bench/tune.py`` run on a GPU and are stored in
``tuned.json`` beside this file, keyed by ``"<device name>|N=..,H=..,I=..|<dtype>"``; each holds
a list of ``[max_tokens, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages]`` rows in increasing
``max_tokens``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

TUNED_FILE = Path(__file__).with_name("tuned.json")


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def shape_key(device: torch.device, num_experts: int, hidden: int, inter: int, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name}|N={num_experts},H={hidden},I={inter}|{str(dtype).removeprefix('torch.')}"


@cache
def _tuned() -> dict[str, list[list[int]]]:
    return json.loads(TUNED_FILE.read_text()) if TUNED_FILE.is_file() else {}


def fallback_config(slots_per_expert: float) -> GemmConfig:
    """Small blocks for decode-sized groups, larger ones once experts get many rows."""
    if slots_per_expert <= 16:
        return GemmConfig(16, 64, 64, num_warps=4, num_stages=3)
    if slots_per_expert <= 64:
        return GemmConfig(32, 64, 64, num_warps=4, num_stages=3)
    return GemmConfig(64, 128, 64, num_warps=8, num_stages=3)


def pick_config(
    device: torch.device, num_experts: int, hidden: int, inter: int, dtype: torch.dtype, tokens: int, real_slots: int
) -> GemmConfig:
    """The tuned config for the smallest ``max_tokens >= tokens`` of this shape, else the fallback."""
    rows = _tuned().get(shape_key(device, num_experts, hidden, inter, dtype))
    for max_tokens, *params in rows or []:
        if tokens <= max_tokens:
            return GemmConfig(*params)
    return fallback_config(real_slots / num_experts)
