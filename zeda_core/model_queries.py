"""Where the zero experts are: the one place that answers it for a model or a config.

* :func:`moe_blocks` lists a model's zero-aware MoE blocks in layer order;
* :func:`model_spec` is their common routing spec (None for a model without them);
* :func:`spec_from_config` reads the spec a ``config.json`` (dict or HF config) describes,
  the zero-row logit offset included;
* :func:`hf_config` turns a ``config.json`` dict into the family's HF config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers import AutoConfig, PretrainedConfig

from zeda_core.errors import ZedaError
from zeda_core.families import family_for_config
from zeda_core.moe import ZeroExpertMoeBlock
from zeda_core.spec import ZERO_LOGIT_BIAS_KEY, RoutingSpec, read_num_zero_experts


def moe_blocks(model: nn.Module) -> list[ZeroExpertMoeBlock]:
    """The zero-aware MoE blocks of ``model``, in decoder-layer order (empty for a plain model)."""
    return sorted((m for m in model.modules() if isinstance(m, ZeroExpertMoeBlock)), key=lambda b: b.layer_idx)


def model_spec(model: nn.Module) -> RoutingSpec | None:
    """The routing spec every zero-aware MoE block of ``model`` shares; None when it has none.

    Raises:
        ZedaError: the blocks' specs differ (a model ZEDA did not build).
    """
    specs = {block.spec for block in moe_blocks(model)}
    if len(specs) > 1:
        raise ZedaError(f"the model's MoE layers route with {len(specs)} different specs; expected one")
    return next(iter(specs), None)


def spec_from_config(config: Mapping[str, Any] | PretrainedConfig) -> RoutingSpec:
    """The routing spec of a ``config.json`` dict or HF config: N, Z, top-k, the family's rule, the offset flag.

    Raises:
        ZedaError: not a supported MoE family, or an unsupported zero-expert format.
    """
    values = dict(config) if isinstance(config, Mapping) else config.to_dict()
    hf = hf_config(values) if isinstance(config, Mapping) else config
    family = family_for_config(values)
    return family.routing_spec(hf, read_num_zero_experts(values), bool(values.get(ZERO_LOGIT_BIAS_KEY, False)))


def hf_config(raw: Mapping[str, Any]) -> PretrainedConfig:
    """The family's HF config for a ``config.json`` dict (ZEDA keys kept as attributes).

    Raises:
        ZedaError: unknown family, or fields the family's config rejects.
    """
    family = family_for_config(raw)
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "transformers_version")}
    try:
        return AutoConfig.for_model(family.model_type, **fields)
    except (TypeError, ValueError) as exc:
        raise ZedaError(f"invalid {family.model_type} config: {exc}") from exc
