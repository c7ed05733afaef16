"""Input checks run before any launch: a bad call is a ValueError, never a device fault."""

from __future__ import annotations

import torch

from zeda_core.errors import ZedaError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    name: str, tensor: torch.Tensor, shape: tuple[int | None, ...], dtypes: tuple[torch.dtype, ...]
) -> None:
    """``tensor`` is contiguous, of one of ``dtypes``, and matches ``shape`` (None = any size)."""
    if not isinstance(tensor, torch.Tensor):
        raise ZedaError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, tensor.shape, strict=True)):
        expected = ", ".join("*" if s is None else str(s) for s in shape)
        raise ZedaError(f"{name} must have shape [{expected}], got {list(tensor.shape)}")
    if tensor.dtype not in dtypes:
        raise ZedaError(f"{name} must be one of {[str(d) for d in dtypes]}, got {tensor.dtype}")
    if not tensor.is_contiguous():
        raise ZedaError(f"{name} must be contiguous")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ZedaError(f"tensors must be on one device, got {', '.join(f'{n}: {d}' for n, d in devices.items())}")


def check_moe_inputs(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    zero_mask: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> None:
    """Shapes, dtypes, devices, contiguity, and real-slot ids within ``[0, N)``."""
    check_tensor("gate_up_proj", gate_up_proj, (None, None, None), FLOAT_DTYPES)
    num_experts, double_inter, hidden_size = gate_up_proj.shape
    if double_inter % 2:
        raise ZedaError(f"gate_up_proj must be [N, 2I, H], got an odd middle size {double_inter}")
    check_tensor("hidden", hidden, (None, hidden_size), (gate_up_proj.dtype,))
    check_tensor("down_proj", down_proj, (num_experts, hidden_size, double_inter // 2), (gate_up_proj.dtype,))
    tokens, top_k = hidden.shape[0], topk_ids.shape[-1] if topk_ids.dim() == 2 else -1
    check_tensor("topk_ids", topk_ids, (tokens, None), (torch.int32, torch.int64))
    check_tensor("topk_weights", topk_weights, (tokens, top_k), FLOAT_DTYPES)
    check_tensor("zero_mask", zero_mask, (tokens, top_k), (torch.bool,))
    check_same_device(
        hidden=hidden,
        topk_ids=topk_ids,
        topk_weights=topk_weights,
        zero_mask=zero_mask,
        gate_up_proj=gate_up_proj,
        down_proj=down_proj,
    )
    real_ids = topk_ids[~zero_mask]
    if real_ids.numel() and bool(((real_ids < 0) | (real_ids >= num_experts)).any()):
        raise ZedaError(f"ids of real slots must lie in [0, {num_experts}); zero slots must be marked in zero_mask")
