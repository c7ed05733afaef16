"""Routing spec: everything a router needs to turn logits into expert slots.

A spec is derived from a Hugging Face ``config.json`` by the model's family adapter
(``zeda_core.families``). The number of zero experts is stored in the config with the keys
of the published ZEDA checkpoints: ``"zce_nums": [Z]``, ``"zce_types": ["zero"]``,
``"use_zce_mask": false``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from zeda_core.errors import ZedaError

ScoreFunc = Literal["softmax", "sigmoid"]

ZCE_NUMS = "zce_nums"
ZCE_TYPES = "zce_types"
ZCE_MASK = "use_zce_mask"
ZERO_TYPE = "zero"
ZERO_LOGIT_BIAS_KEY = "zeda_zero_logit_bias"  # the softmax zero rows carry a learnable logit offset


@dataclass(frozen=True)
class RoutingSpec:
    """How one MoE layer routes a token over N real and Z zero experts.

    Router rows are ordered real experts first (ids ``0..N-1``), then zero experts
    (ids ``N..N+Z-1``). Top-k is taken over all ``N + Z`` rows together.

    Attributes:
        num_experts: N, real experts with parameters.
        num_zero_experts: Z, parameter-free experts whose output is exactly zero.
        top_k: K, slots per token (unchanged by conversion).
        score_func: ``softmax`` (Qwen, Mixtral, OLMoE) or ``sigmoid`` (DeepSeek-V3, GLM).
        norm_topk_prob: normalise the K selected weights to sum to one (zero slots included).
        routed_scaling_factor: multiplies the selected weights after normalisation.
        selection_bias: the router has an ``e_score_correction_bias`` added for selection only.
        zero_logit_bias: the router adds a learnable logit offset to the zero rows
            (set by the function-preserving ``preserve`` init of softmax families).
        n_group, topk_group: group-limited selection over real experts (DeepSeek-V3).
            Zero experts belong to no group and are always eligible.
        topk_sorted: whether the family's own router asks ``torch.topk`` for sorted output.
        mask_zero_experts: ``use_zce_mask``; zero rows get -inf (the static model).
    """

    num_experts: int
    num_zero_experts: int
    top_k: int
    score_func: ScoreFunc
    norm_topk_prob: bool
    routed_scaling_factor: float = 1.0
    selection_bias: bool = False
    zero_logit_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    topk_sorted: bool = True
    mask_zero_experts: bool = False

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ZedaError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.num_zero_experts < 0:
            raise ZedaError(f"num_zero_experts must be >= 0, got {self.num_zero_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ZedaError(f"top_k must be in [1, {self.num_experts}], got {self.top_k}")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ZedaError(f"score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ZedaError(
                f"group routing needs n_group | N and 1 <= topk_group <= n_group; got N={self.num_experts}, "
                f"n_group={self.n_group}, topk_group={self.topk_group}"
            )

    @property
    def num_rows(self) -> int:
        """Router rows: ``N + Z``."""
        return self.num_experts + self.num_zero_experts


def read_num_zero_experts(config: Mapping[str, Any]) -> int:
    """Z from a config dict in the published ZEDA format; 0 for a plain MoE config.

    Raises:
        ZedaError: for zero-compute expert types other than ``zero`` (MoE++ copy/constant).
    """
    nums = config.get(ZCE_NUMS)
    if nums is None:
        return 0
    types = config.get(ZCE_TYPES, [ZERO_TYPE] * len(nums))
    if len(types) != len(nums):
        raise ZedaError(f"config has {ZCE_NUMS}={nums} but {ZCE_TYPES}={types}: lengths differ")
    unsupported = sorted({t for t in types if t != ZERO_TYPE})
    if unsupported:
        raise ZedaError(f"zero-compute expert types {unsupported} are not supported; only 'zero' is")
    total = sum(int(n) for n in nums)
    if total < 0:
        raise ZedaError(f"{ZCE_NUMS} must be non-negative, got {nums}")
    return total


def write_num_zero_experts(config: dict[str, Any], num_zero_experts: int, mask: bool = False) -> None:
    """Store Z in a config dict with the published ZEDA keys (in place)."""
    config[ZCE_NUMS] = [int(num_zero_experts)]
    config[ZCE_TYPES] = [ZERO_TYPE]
    config[ZCE_MASK] = bool(mask)
