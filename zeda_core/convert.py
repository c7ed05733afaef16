"""``inject_zero_experts``: turn a family's static MoE layers into zero-aware ones.

Two initialisations of the Z new router rows:

- ``gaussian`` (reference rule): each new row is drawn from N(mean_d, std_d), the per-hidden-dim
  mean and std of the existing rows; a selection bias is extended with its scalar mean and std.
  Zero experts are picked from step 0; self-distillation repairs the damage.
- ``preserve`` (function-preserving): new rows are 0. Softmax families get a learnable zero-row
  logit offset of ``PRESERVE_LOGIT`` (-30): zero rows cannot win top-k unless every real logit
  is below -30, and their softmax mass (< Z * e^-30 relative) leaves the logits unchanged to
  float32 precision. Sigmoid families get a selection bias 2 below the smallest real one, which
  no sigmoid score can overcome: zero experts are never selected until the bias is moved.

A preserve-initialised model starts with r_ze = 0, and the group loss alone cannot pull the zero
rows in: their routing probability, and so its gradient, is about e^-30. Training therefore
moves the zero rows' offset after each step (:func:`nudge_zero_bias`) towards a zero share that
ramps up from 0 to the group loss's target; from there the group loss sets the zero share.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm import tqdm
from transformers import PretrainedConfig

from zeda_core.errors import ZedaError
from zeda_core.families import MoeFamily, family_for_config
from zeda_core.model_queries import moe_blocks
from zeda_core.moe import ZeroExpertMoeBlock, ZeroExpertRouter
from zeda_core.spec import ZERO_LOGIT_BIAS_KEY, RoutingSpec, write_num_zero_experts

ZeroInit = Literal["gaussian", "preserve"]
ZERO_INITS: tuple[str, ...] = ("gaussian", "preserve")
PRESERVE_LOGIT = -30.0
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def sparse_blocks(model: nn.Module, family: MoeFamily) -> list[tuple[str, int, nn.Module]]:
    """(qualified name, layer index, module) of every sparse MoE block of ``family`` in ``model``."""
    if moe_blocks(model):
        raise ZedaError("model is already zero-aware; convert the original checkpoint instead")
    found = []
    for name, module in model.named_modules():
        if type(module).__name__ == family.sparse_block:
            match = _LAYER_INDEX.search(name + ".")
            if match is None:
                raise ZedaError(f"cannot tell the decoder layer of MoE block {name}")
            found.append((name, int(match.group(1)), module))
    return found


def zero_expert_spec(
    config: PretrainedConfig, family: MoeFamily, num_zero_experts: int, init: ZeroInit | None
) -> RoutingSpec:
    """The routing spec of ``family``'s MoE layers after injecting Z zero experts with ``init``.

    Softmax ``preserve`` adds the zero-row logit offset; a config that already has one keeps it.

    Raises:
        ZedaError: Z < 0, or an unknown ``init``.
    """
    if num_zero_experts < 0:
        raise ZedaError(f"number of zero experts must be >= 0, got {num_zero_experts}")
    if init is not None and init not in ZERO_INITS:
        raise ZedaError(f"unknown init {init!r}; choose one of {', '.join(ZERO_INITS)}")
    softmax_preserve = init == "preserve" and family.score_func == "softmax"
    wants_offset = softmax_preserve or bool(getattr(config, ZERO_LOGIT_BIAS_KEY, False))
    return family.routing_spec(config, num_zero_experts, zero_logit_bias=wants_offset)


def record_zero_experts(config: PretrainedConfig, spec: RoutingSpec) -> None:
    """Write Z (and the zero-row offset flag) onto ``config`` with the published ZEDA keys; nothing for Z = 0."""
    if not spec.num_zero_experts:
        return
    zce: dict[str, object] = {ZERO_LOGIT_BIAS_KEY: spec.zero_logit_bias}
    write_num_zero_experts(zce, spec.num_zero_experts, mask=spec.mask_zero_experts)
    for key, value in zce.items():
        setattr(config, key, value)


def inject_zero_experts(
    model: nn.Module,
    num_zero_experts: int,
    init: ZeroInit | None = "gaussian",
    seed: int = 0,
    progress: bool = False,
) -> RoutingSpec:
    """Replace every sparse MoE block of a HF causal LM by a zero-aware block, in place.

    Args:
        model: a Hugging Face causal LM of a supported family.
        num_zero_experts: Z >= 0; 0 gives zero-aware blocks that route exactly like the original.
        init: ``gaussian`` or ``preserve`` for the new router rows; ``None`` leaves them
            uninitialised (the checkpoint loader fills them).
        seed: seed of the ``gaussian`` draw.
        progress: show a progress bar over the MoE layers.

    Returns:
        The routing spec now used by every MoE layer. ``model.config`` records Z with the
        published ZEDA keys.
    """
    config = model.config
    family = family_for_config(config)
    spec = zero_expert_spec(config, family, num_zero_experts, init)
    blocks = sparse_blocks(model, family)
    if not blocks:
        raise ZedaError(f"model of type {config.model_type!r} has no MoE layer to convert")
    generator = torch.Generator().manual_seed(seed)
    for name, layer_idx, block in tqdm(blocks, desc="converting MoE layers", unit="layer", disable=not progress):
        parent_name, _, attr = name.rpartition(".")
        new_block = _zero_aware_block(block, family, spec, layer_idx)
        if init is not None:
            _init_zero_rows(new_block.gate, block.gate, spec, init, generator)
        setattr(model.get_submodule(parent_name), attr, new_block)
    record_zero_experts(config, spec)
    return spec


def _zero_aware_block(block: nn.Module, family: MoeFamily, spec: RoutingSpec, layer_idx: int) -> ZeroExpertMoeBlock:
    old_gate = block.gate
    hidden = old_gate.weight.shape[1]
    with torch.device(old_gate.weight.device):
        gate = ZeroExpertRouter(spec, hidden, dtype=old_gate.weight.dtype)
    return ZeroExpertMoeBlock(
        gate=gate,
        experts=block.experts,
        layer_idx=layer_idx,
        shared_name=family.shared_name,
        shared=getattr(block, family.shared_name) if family.shared_name else None,
        shared_gate=block.shared_expert_gate if family.shared_gate else None,
    )


@dataclass(frozen=True)
class RouterRows:
    """The router tensors of one MoE layer after conversion.

    Attributes:
        weight: [N + Z, H] gate rows, real experts first, in the old gate's dtype and device.
        selection_bias: [N + Z] float32 ``e_score_correction_bias``; None without a selection bias.
        zero_logit_bias: [Z] float32 zero-row logit offset; None when the spec has none.
    """

    weight: torch.Tensor
    selection_bias: torch.Tensor | None
    zero_logit_bias: torch.Tensor | None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by their :class:`~zeda_core.moe.ZeroExpertRouter` names (the checkpoint key suffixes)."""
        named = {
            "weight": self.weight,
            "e_score_correction_bias": self.selection_bias,
            "zero_logit_bias": self.zero_logit_bias,
        }
        return {name: tensor for name, tensor in named.items() if tensor is not None}


@torch.no_grad()
def widen_router(
    weight: torch.Tensor,
    selection_bias: torch.Tensor | None,
    spec: RoutingSpec,
    init: ZeroInit,
    generator: torch.Generator,
) -> RouterRows:
    """Append Z zero-expert rows to one layer's router with ``init`` (the rule in the module docstring).

    Args:
        weight: [N, H] gate rows of the original router.
        selection_bias: [N] ``e_score_correction_bias`` where ``spec.selection_bias``, else None.
        spec: the layer's routing spec after conversion (N, Z, offset and bias flags).
        init: ``gaussian`` or ``preserve``.
        generator: CPU generator of the gaussian draws; it advances by Z * H (+ Z with a bias).
    """
    z = spec.num_zero_experts
    real_rows = weight.detach()
    if init == "gaussian":
        std, mean = torch.std_mean(real_rows.float().cpu(), dim=0)
        new_rows = mean + std * torch.randn(z, real_rows.shape[1], generator=generator)
    else:
        new_rows = torch.zeros(z, real_rows.shape[1])
    bias = None
    if spec.selection_bias:
        real_bias = selection_bias.detach().float()
        bias = torch.cat([real_bias, _new_bias(real_bias, z, init, generator).to(real_bias)])
    offset = torch.full((z,), PRESERVE_LOGIT if init == "preserve" else 0.0) if spec.zero_logit_bias else None
    return RouterRows(
        weight=torch.cat([real_rows, new_rows.to(real_rows)]), selection_bias=bias, zero_logit_bias=offset
    )


def _new_bias(real_bias: torch.Tensor, z: int, init: ZeroInit, generator: torch.Generator) -> torch.Tensor:
    """[Z] selection bias of the zero rows: drawn from the real biases' mean and std, or 2 below their minimum."""
    if init == "gaussian":
        bias_std, bias_mean = torch.std_mean(real_bias.cpu())
        return bias_mean + bias_std * torch.randn(z, generator=generator)
    return (real_bias.min() - 2.0).expand(z)


@torch.no_grad()
def _init_zero_rows(
    gate: ZeroExpertRouter, old_gate: nn.Module, spec: RoutingSpec, init: ZeroInit, generator: torch.Generator
) -> None:
    rows = widen_router(
        old_gate.weight, old_gate.e_score_correction_bias if spec.selection_bias else None, spec, init, generator
    )
    for name, tensor in rows.tensors().items():
        getattr(gate, name).copy_(tensor)


@torch.no_grad()
def nudge_zero_bias(model: nn.Module, zero_ratios: list[float], targets: list[float], step_size: float) -> None:
    """Move each MoE layer's zero-row offset one step towards its target zero share.

    The offset rises by ``step_size`` where the layer's measured r_ze is below its target and
    falls where it is above (a sign rule, as in auxiliary-loss-free load balancing). Softmax
    families move the zero-row logit offset; sigmoid families the zero rows' selection bias.

    Args:
        model: a model with zero-aware blocks.
        zero_ratios: measured r_ze of each MoE layer, in layer order.
        targets: target r_ze of each MoE layer.
        step_size: logit units per call.
    """
    blocks = moe_blocks(model)
    for block, ratio, target in zip(blocks, zero_ratios, targets, strict=True):
        step = step_size if ratio < target else -step_size if ratio > target else 0.0
        gate, spec = block.gate, block.spec
        if spec.zero_logit_bias:
            gate.zero_logit_bias.add_(step)
        elif spec.selection_bias and spec.num_zero_experts:
            gate.e_score_correction_bias[spec.num_experts :] += step
