"""Registry of supported MoE families: one module each, looked up by HF ``model_type``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zeda_core.errors import ZedaError
from zeda_core.families import deepseek_v3, glm4_moe_lite, mixtral, olmoe, qwen2_moe, qwen3_moe
from zeda_core.families.base import PLUS_PLUS, MoeFamily

FAMILIES: dict[str, MoeFamily] = {
    module.FAMILY.model_type: module.FAMILY
    for module in (qwen3_moe, glm4_moe_lite, mixtral, olmoe, deepseek_v3, qwen2_moe)
}


def family_for_model_type(model_type: str) -> MoeFamily:
    """The family of a base or ZEDA (``*_plus_plus``) ``model_type``."""
    base = model_type.removesuffix(PLUS_PLUS)
    if base not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise ZedaError(
            f"model type {model_type!r} is not a supported MoE family (dense models have no experts to skip); "
            f"supported: {supported}"
        )
    return FAMILIES[base]


def family_for_config(config: Any) -> MoeFamily:
    """The family of a config object or config dict."""
    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    if not model_type:
        raise ZedaError("config has no model_type")
    return family_for_model_type(str(model_type))


__all__ = ["FAMILIES", "MoeFamily", "family_for_config", "family_for_model_type"]
