"""ZEDA's SGLang model classes: the upstream Qwen3-MoE and GLM4-MoE-Lite models, made to load
transformers-5 checkpoints, tie embeddings, and (ZEDA variants) route over N + Z rows.

- ``Qwen3MoePlusPlusForCausalLM`` / ``Glm4MoeLitePlusPlusForCausalLM``: every sparse MoE block
  made zero-aware (see ``zero_aware``), routed with the compute dial's offsets (see ``dial``).
- ``Qwen3MoeCheckpointForCausalLM`` / ``Glm4MoeLiteCheckpointForCausalLM``: the plain models (a
  teacher, a static baseline) with the same loading fixes. ``zeda serve`` registers them under
  the upstream architecture names in the processes it starts (see ``plugin``).

Loading fixes over upstream 0.5.23: experts stored fused by transformers 5
(``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]) are split into the
per-expert names the upstream loader maps, and ``tie_word_embeddings`` makes ``lm_head`` the
input embedding (upstream leaves it uninitialised, which gives uniform log-probs). On CPU, every
MoE layer runs the zero-skipping forward of ``cpu_moe``, and the time spent in the model forward
and in its MoE blocks goes to the shared ``forward_counter`` (the MoE share ``bench/serve.py``
reports for this backend).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import torch
from sglang.srt.layers.utils import get_layer_id
from sglang.srt.models.glm4_moe_lite import Glm4MoeLiteForCausalLM, Glm4MoeLiteSparseMoeBlock
from sglang.srt.models.qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeSparseMoeBlock
from sglang.srt.utils import is_cpu
from torch import nn

from zeda_core.checkpoint import ROUTER_KEY
from zeda_core.errors import ZedaError
from zeda_server.sglang_models.cpu_moe import use_zero_skipping_cpu_moe
from zeda_server.sglang_models.dial import RequestOffsets
from zeda_server.sglang_models.forward_counter import FORWARD_COUNTER
from zeda_server.sglang_models.plugin import allow_host_caches_on_cpu
from zeda_server.sglang_models.zero_aware import make_zero_aware, routing_spec_of

allow_host_caches_on_cpu()  # both registration routes import this module in every SGLang process

TIED_HEAD = "lm_head.weight"
# The zero rows' logit offset lives on the zero-aware top-k, which applies it.
ZERO_LOGIT_BIAS_WEIGHT, SERVED_ZERO_LOGIT_BIAS = ".mlp.gate.zero_logit_bias", ".mlp.topk.zero_logit_bias"


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


def checkpoint_weights(
    weights: Iterable[tuple[str, torch.Tensor]], tied: bool, model: nn.Module
) -> Iterator[tuple[str, torch.Tensor]]:
    """What the upstream loader should see: per-expert names, the zero rows' ``gate.zero_logit_bias``
    under its served name ``topk.zero_logit_bias``, and no ``lm_head`` when it is tied.

    Raises:
        ZedaError: a router weight (``model.layers.{i}.mlp.gate.*``) of a layer ``model`` holds
            has no parameter there. The upstream loader skips unknown names without a word,
            which would serve the model without it (e.g. the zero rows' ``zero_logit_bias``).
    """
    params = {name for name, _ in model.named_parameters()}
    held = range(getattr(model.model, "start_layer", 0), getattr(model.model, "end_layer", len(model.model.layers)))
    for stored, tensor in per_expert_weights(weights):
        name = stored.replace(ZERO_LOGIT_BIAS_WEIGHT, SERVED_ZERO_LOGIT_BIAS)
        if ROUTER_KEY.search(stored) and get_layer_id(stored) in held and name not in params:
            raise ZedaError(
                f"checkpoint weight {stored} has no parameter in the SGLang model: "
                "the checkpoint's weights do not match its config"
            )
        if not (tied and name == TIED_HEAD):
            yield name, tensor


def _time_moe_block(block: nn.Module) -> None:
    """Add every forward of ``block`` to the MoE time of the shared counter."""
    starts: list[int] = []

    def start(_module, _args) -> None:
        starts.append(time.perf_counter_ns())

    def stop(_module, _args, _output) -> None:
        FORWARD_COUNTER.add_ns("moe", time.perf_counter_ns() - starts.pop())

    block.register_forward_pre_hook(start)
    block.register_forward_hook(stop)


class TimedForward:
    """On CPU, adds each model forward to the model time of the shared counter (SGLang calls ``forward``)."""

    def forward(self, *args, **kwargs):
        if not is_cpu():
            return super().forward(*args, **kwargs)
        with FORWARD_COUNTER.timing("model"):
            return super().forward(*args, **kwargs)


class DialledForward:
    """ZEDA models: before each forward, hand the batch's per-request zero offsets to the MoE layers."""

    request_offsets: RequestOffsets

    def forward(self, input_ids, positions, forward_batch, *args, **kwargs):
        self.request_offsets.update(forward_batch, positions.shape[0], positions.device)
        return super().forward(input_ids, positions, forward_batch, *args, **kwargs)


def _adapt(model: nn.Module, block_type: type, zero_aware: bool) -> None:
    """Tie ``lm_head``, run (and time) the zero-skipping CPU MoE, and (ZEDA models) make the MoE blocks
    zero-aware, sharing the model's ``request_offsets``."""
    config = model.config
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head = model.model.embed_tokens
    spec = routing_spec_of(config) if zero_aware else None
    if spec is not None:
        model.request_offsets = RequestOffsets()
    for layer_id, layer in enumerate(model.model.layers):
        if not isinstance(layer.mlp, block_type):
            continue
        if is_cpu():
            use_zero_skipping_cpu_moe(layer.mlp.experts, layer_id)
            _time_moe_block(layer.mlp)
        if spec is not None:
            prefix = f"model.layers.{layer_id}.mlp"
            make_zero_aware(layer.mlp, spec, config.hidden_size, layer_id, prefix, model.request_offsets)


class Qwen3MoeCheckpointForCausalLM(TimedForward, Qwen3MoeForCausalLM):
    """Upstream Qwen3-MoE that loads transformers-5 checkpoints (fused experts, tied embeddings)."""

    zero_aware = False

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        _adapt(self, Qwen3MoeSparseMoeBlock, self.zero_aware)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], is_mtp: bool = False):
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        return super().load_weights(checkpoint_weights(weights, tied, self), is_mtp=is_mtp)


class Qwen3MoePlusPlusForCausalLM(DialledForward, Qwen3MoeCheckpointForCausalLM):
    """A ZEDA Qwen3-MoE: gate of N + Z rows, zero slots never computed."""

    zero_aware = True


def leading_dense_layers(config) -> int:
    """``first_k_dense_replace`` of a GLM4-MoE-Lite config; transformers 5 writes ``mlp_layer_types`` instead.

    Raises:
        ZedaError: dense layers that do not all come first, which upstream SGLang cannot express.
    """
    if getattr(config, "first_k_dense_replace", None) is not None:
        return int(config.first_k_dense_replace)
    kinds = list(getattr(config, "mlp_layer_types", None) or ["dense"] + ["sparse"] * (config.num_hidden_layers - 1))
    dense = next((i for i, kind in enumerate(kinds) if kind != "dense"), len(kinds))
    if "dense" in kinds[dense:]:
        raise ZedaError(f"mlp_layer_types {kinds}: SGLang serves dense layers only before the first MoE layer")
    return dense


class Glm4MoeLiteCheckpointForCausalLM(TimedForward, Glm4MoeLiteForCausalLM):
    """Upstream GLM4-MoE-Lite that loads transformers-5 checkpoints (fused experts, tied embeddings)."""

    zero_aware = False

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        config.first_k_dense_replace = leading_dense_layers(config)
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        _adapt(self, Glm4MoeLiteSparseMoeBlock, self.zero_aware)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], is_nextn: bool = False):
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        return super().load_weights(checkpoint_weights(weights, tied, self), is_nextn=is_nextn)


class Glm4MoeLitePlusPlusForCausalLM(DialledForward, Glm4MoeLiteCheckpointForCausalLM):
    """A ZEDA GLM4-MoE-Lite: gate and correction bias of N + Z rows, zero slots never computed."""

    zero_aware = True


EntryClass = [Qwen3MoePlusPlusForCausalLM, Glm4MoeLitePlusPlusForCausalLM]

# The upstream architecture each plain class stands in for, in processes ``zeda serve`` starts.
PLAIN_CLASSES: dict[str, type[nn.Module]] = {
    "Qwen3MoeForCausalLM": Qwen3MoeCheckpointForCausalLM,
    "Glm4MoeLiteForCausalLM": Glm4MoeLiteCheckpointForCausalLM,
}
