"""Registration of the ZEDA models with SGLang, in every SGLang process.

Two routes, both supported: the ``sglang.srt.plugins`` entry point ``zeda`` (SGLang calls
:func:`register` early in its main, scheduler and detokenizer processes), and
``SGLANG_EXTERNAL_MODEL_PACKAGE=zeda_server.sglang_models`` (its registry scans the package's
``EntryClass``; the package import registers the configs).
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig
from transformers.models.glm4_moe_lite import Glm4MoeLiteConfig
from transformers.models.qwen3_moe import Qwen3MoeConfig


class Qwen3MoePlusPlusConfig(Qwen3MoeConfig):
    model_type = "qwen3_moe_plus_plus"


class Glm4MoeLitePlusPlusConfig(Glm4MoeLiteConfig):
    model_type = "glm4_moe_lite_plus_plus"


CONFIGS: tuple[type[PretrainedConfig], ...] = (Qwen3MoePlusPlusConfig, Glm4MoeLitePlusPlusConfig)


def register_configs() -> None:
    """Make ``AutoConfig`` (and SGLang's config registry, when loaded) know the ZEDA model types."""
    for config in CONFIGS:
        try:
            AutoConfig.register(config.model_type, config)
        except ValueError as exc:
            if "already" not in str(exc):
                raise
    try:
        from sglang.srt.utils.hf_transformers.common import _CONFIG_REGISTRY
    except ImportError:
        return
    for config in CONFIGS:
        _CONFIG_REGISTRY.setdefault(config.model_type, config)


def register() -> None:
    """SGLang plugin hook: the ZEDA configs and model classes, keyed by architecture name."""
    register_configs()
    from sglang.srt.models.registry import ModelRegistry

    from zeda_server.sglang_models.models import EntryClass

    for model_class in EntryClass:
        ModelRegistry.models[model_class.__name__] = model_class
