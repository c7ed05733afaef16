"""Registration of the ZEDA models with SGLang, in every SGLang process.

Two routes, both supported: the ``sglang.srt.plugins`` entry point ``zeda`` (SGLang calls
:func:`register` early in its main, scheduler and detokenizer processes), and
``SGLANG_EXTERNAL_MODEL_PACKAGE=zeda_server.sglang_models`` (its registry scans the package's
``EntryClass``; the package import registers the configs).

In processes started by ``zeda serve`` (``ZEDA_SGLANG_SERVE=1``, inherited by SGLang's
subprocesses) the plain Qwen3-MoE and GLM4-MoE-Lite architectures are served by ZEDA's loading
variants too (fused experts, tied embeddings, the zero-skipping CPU MoE), so a teacher and its
ZEDA student run the same code. Elsewhere upstream's classes are left alone.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.models.glm4_moe_lite import Glm4MoeLiteConfig
from transformers.models.qwen3_moe import Qwen3MoeConfig


class Qwen3MoePlusPlusConfig(Qwen3MoeConfig):
    model_type = "qwen3_moe_plus_plus"


class Glm4MoeLitePlusPlusConfig(Glm4MoeLiteConfig):
    """A ZEDA GLM4-MoE-Lite config. In memory its ``architectures`` also name the upstream class after
    the ZEDA one: SGLang picks the model class by the first name it knows (the ZEDA one), but sizes an
    MLA KV cache only for architectures on its own list, which the upstream name is on."""

    model_type = "glm4_moe_lite_plus_plus"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        names = list(self.architectures or [])
        if names and names[0] == "Glm4MoeLitePlusPlusForCausalLM" and UPSTREAM_GLM not in names:
            self.architectures = [*names, UPSTREAM_GLM]

    def to_dict(self) -> dict:
        values = super().to_dict()
        if values.get("architectures"):
            values["architectures"] = [name for name in values["architectures"] if name != UPSTREAM_GLM]
        return values


SERVE_ENV = "ZEDA_SGLANG_SERVE"
UPSTREAM_GLM = "Glm4MoeLiteForCausalLM"

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


def _plain_host_memory(dims: tuple, dtype: torch.dtype, device: str, pin_memory: bool = False, allocator=None):
    """Host memory for a CPU engine: there is no device to pin it for."""
    if allocator is not None:
        return allocator.allocate(dims, dtype, "cpu")
    return torch.empty(dims, dtype=dtype)


def allow_host_caches_on_cpu() -> None:
    """Let SGLang's host caches (the routed-experts capture among them) allocate on a CPU engine.

    ``ALLOC_MEMORY_FUNCS`` has no ``"cpu"`` entry in 0.5.23, so its default pins memory through
    CUDA and fails. Only the ``"cpu"`` key is added; GPU devices keep their allocators.
    """
    try:
        from sglang.srt.mem_cache.pool_host.common import ALLOC_MEMORY_FUNCS
    except ImportError:
        return
    ALLOC_MEMORY_FUNCS.setdefault("cpu", _plain_host_memory)


def _absorbed_mla(attn, forward_batch):
    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import AttnForwardMethod

    return AttnForwardMethod.MLA


def allow_mla_on_torch_native_attention() -> None:
    """Run MLA attention (GLM4-MoE-Lite, DeepSeek) on SGLang's ``torch_native`` backend, absorbed.

    With no handler for ``torch_native``, SGLang 0.5.23 falls back to the Triton backend's choice,
    which prefills with the MHA path; ``torch_native`` then reads K and V from the latent MLA cache
    and fails on the shapes. Its absorbed-MLA path (one latent K of ``kv_lora_rank + rope`` dims,
    V its first ``kv_lora_rank`` dims) is what the MLA cache holds, so it serves every step.
    A handler SGLang already has for ``torch_native`` is kept.
    """
    from sglang.srt.models.deepseek_common.attention_backend_handler import AttentionBackendRegistry

    AttentionBackendRegistry._handlers.setdefault("torch_native", _absorbed_mla)


def leave_shutdown_to_the_server() -> None:
    """In an SGLang subprocess of ``zeda serve``: ignore SIGINT and SIGTERM.

    A terminal's Ctrl-C, ``timeout``, ``kill -- -PGID`` and systemd's default ``KillMode`` signal
    every process of the group or cgroup, not just ``zeda serve``. Without this the scheduler
    dies in the middle of a forward and every request in flight fails, while ``zeda serve``
    drains. The subprocesses still stop: ``zeda serve`` ends them (SIGKILL) after its drain, and
    each dies with its parent (SGLang sets ``PR_SET_PDEATHSIG``).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def register() -> None:
    """SGLang plugin hook: the ZEDA configs and model classes, keyed by architecture name."""
    if os.environ.get(SERVE_ENV) == "1" and multiprocessing.parent_process() is not None:
        leave_shutdown_to_the_server()
    register_configs()
    allow_host_caches_on_cpu()
    from sglang.srt.models.registry import ModelRegistry

    from zeda_server.sglang_models.models import PLAIN_CLASSES, EntryClass

    for model_class in EntryClass:
        ModelRegistry.models[model_class.__name__] = model_class
    if os.environ.get(SERVE_ENV) == "1":
        ModelRegistry.models.update(PLAIN_CLASSES)
        allow_mla_on_torch_native_attention()
