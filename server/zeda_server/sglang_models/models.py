"""ZEDA variants of SGLang's Qwen3-MoE and GLM4-MoE-Lite models (``*PlusPlusForCausalLM``).

Each is the upstream model with every sparse MoE block made zero-aware (see ``zero_aware``).
Weights load through the upstream ``load_weights``: the gate rows (N + Z) keep their names, and
experts stored fused by transformers 5 (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj``
[E, H, I]) are split into the per-expert names the upstream loader maps.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from sglang.srt.models.glm4_moe_lite import Glm4MoeLiteForCausalLM, Glm4MoeLiteSparseMoeBlock
from sglang.srt.models.qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeSparseMoeBlock
from torch import nn

from zeda_server.sglang_models.zero_aware import make_zero_aware, routing_spec_of


def per_expert_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Split fused expert tensors into ``experts.{e}.{gate,up,down}_proj.weight``; pass the rest through."""
    for name, tensor in weights:
        if name.endswith(".experts.gate_up_proj"):
            base = name.removesuffix("gate_up_proj")
            gate, up = tensor.chunk(2, dim=1)
            for expert in range(tensor.shape[0]):
                yield f"{base}{expert}.gate_proj.weight", gate[expert]
                yield f"{base}{expert}.up_proj.weight", up[expert]
        elif name.endswith(".experts.down_proj"):
            base = name.removesuffix("down_proj")
            for expert in range(tensor.shape[0]):
                yield f"{base}{expert}.down_proj.weight", tensor[expert]
        else:
            yield name, tensor


def _make_blocks_zero_aware(model: nn.Module, block_type: type, config) -> None:
    spec = routing_spec_of(config)
    for layer_id, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, block_type):
            make_zero_aware(layer.mlp, spec, config.hidden_size, layer_id, f"model.layers.{layer_id}.mlp")


class Qwen3MoePlusPlusForCausalLM(Qwen3MoeForCausalLM):
    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        _make_blocks_zero_aware(self, Qwen3MoeSparseMoeBlock, config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], is_mtp: bool = False):
        return super().load_weights(per_expert_weights(weights), is_mtp=is_mtp)


class Glm4MoeLitePlusPlusForCausalLM(Glm4MoeLiteForCausalLM):
    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        _make_blocks_zero_aware(self, Glm4MoeLiteSparseMoeBlock, config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], is_nextn: bool = False):
        return super().load_weights(per_expert_weights(weights), is_nextn=is_nextn)


EntryClass = [Qwen3MoePlusPlusForCausalLM, Glm4MoeLitePlusPlusForCausalLM]
