"""MoE expert backends picked by name: the MoE layers hold the weights, a backend computes the experts.

* ``torch``: :func:`~zeda_core.experts.grouped_experts_forward`; any device, any activation.
* ``triton``: the zero-aware Triton kernel of ``zeda_kernels`` (forward and backward), SwiGLU
  experts only, on CUDA tensors (or on CPU under ``TRITON_INTERPRET=1``). It is imported on first
  use, so ``zeda_core`` runs without Triton.
* ``auto``: per call, ``triton`` for CUDA tensors of SwiGLU experts, else ``torch``.

Each :class:`~zeda_core.moe.ZeroExpertMoeBlock` holds its backend (``experts_backend``, ``torch``
until told otherwise); :func:`set_moe_backend` sets it for a whole model, and
``load_model(..., moe_backend=...)`` applies it to every model it loads.
"""

from __future__ import annotations

import importlib
from functools import cache

import torch
from torch import nn

from zeda_core.errors import ZedaError
from zeda_core.experts import ActFn, MoeExpertsBackend, is_silu, torch_experts
from zeda_core.model_queries import moe_blocks
from zeda_core.routing import Routing


class AutoExperts:
    """The ``auto`` backend: ``triton`` for CUDA tensors of SwiGLU experts, ``torch`` otherwise."""

    name = "auto"

    def check(self, device: torch.device, act_fn: ActFn) -> None:
        """Runs everywhere (it falls back to ``torch``)."""

    def __call__(self, *, hidden_states: torch.Tensor, routing: Routing, experts: nn.Module) -> torch.Tensor:
        """[T, H] -> [T, H], see :class:`~zeda_core.experts.MoeExpertsBackend`."""
        triton = hidden_states.is_cuda and is_silu(experts.act_fn)
        return (moe_backend("triton") if triton else torch_experts)(
            hidden_states=hidden_states, routing=routing, experts=experts
        )


MOE_BACKENDS: dict[str, MoeExpertsBackend | str] = {
    "auto": AutoExperts(),
    "torch": torch_experts,
    "triton": "zeda_kernels.backend:triton_experts",
}
"""Backends by name; a ``"module:attribute"`` string is imported when the name is first used."""


def moe_backend(name: str) -> MoeExpertsBackend:
    """The backend registered as ``name``.

    Raises:
        ZedaError: an unknown name, or a backend whose module does not import (``triton`` without Triton).
    """
    entry = MOE_BACKENDS.get(name)
    if entry is None:
        raise ZedaError(f"unknown MoE backend {name!r}; choose one of: {', '.join(MOE_BACKENDS)}")
    return _imported(name, entry) if isinstance(entry, str) else entry


@cache
def _imported(name: str, target: str) -> MoeExpertsBackend:
    module, _, attribute = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError as exc:
        raise ZedaError(f"MoE backend {name!r} needs {module}, which does not import ({exc}); use 'torch'") from exc


def set_moe_backend(model: nn.Module, name: str, device: torch.device | str | None = None) -> None:
    """Make every zero-aware MoE block of ``model`` compute its experts with backend ``name``.

    Args:
        model: a model with zero-aware MoE blocks (one without any only has ``name`` checked).
        name: a key of :data:`MOE_BACKENDS`.
        device: where the model will run (default: where each block's expert weights are now);
            the backend is checked against it.

    Raises:
        ZedaError: an unknown name, or a backend that cannot run a block there (``triton`` on CPU
            without ``TRITON_INTERPRET=1``, or for experts whose activation is not SiLU).
    """
    backend = moe_backend(name)
    for block in moe_blocks(model):
        experts = block.experts
        backend.check(torch.device(device) if device is not None else experts.gate_up_proj.device, experts.act_fn)
        block.experts_backend = backend
