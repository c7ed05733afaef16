"""SGLang's fused MoE on CPU, made to skip zero slots, with a cross-process count of what it computed.

On CPU, SGLang 0.5.23 runs unquantised MoE through ``UnquantizedFusedMoEMethod.forward_cpu`` ->
``fused_moe_native.moe_forward_native``, which scatters on ``topk_ids``: an id of -1 (a zero slot)
crashes it, and a weight-0 slot would still be computed. :class:`ZeroSkippingCpuMoeMethod` replaces
that forward with ``zeda_core.grouped_experts_forward``: slots whose id is -1 or ``>= N`` are dropped before
any GEMM, and each real slot costs exactly one GEMM pair row.

Every forward adds the slots it computed and skipped to the shared forward counter
(``forward_counter``), which the server shows on ``/metrics``; tests compare it with the
routed-experts return to prove that no zero slot is ever computed.
"""

from __future__ import annotations

from sglang.srt.layers.moe.token_dispatcher import StandardCombineInput, StandardDispatchOutput
from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod
from torch import nn

from zeda_core.errors import ZedaError
from zeda_core.experts import grouped_experts_forward
from zeda_server.sglang_models.forward_counter import FORWARD_COUNTER


class ZeroSkippingCpuMoeMethod(UnquantizedFusedMoEMethod):
    """``UnquantizedFusedMoEMethod`` whose CPU (and native) forward never computes a zero slot."""

    def forward_cpu(self, layer: nn.Module, dispatch_output: StandardDispatchOutput) -> StandardCombineInput:
        """[T, H] hidden states + top-k (ids -1 or >= N for zero slots) -> [T, H] weighted expert sum."""
        hidden_states = dispatch_output.hidden_states
        topk_weights, topk_ids, _ = dispatch_output.topk_output
        zero_mask = (topk_ids < 0) | (topk_ids >= layer.num_local_experts)
        output = grouped_experts_forward(
            hidden_states, topk_ids, topk_weights, zero_mask, layer.w13_weight, layer.w2_weight
        )
        skipped = int(zero_mask.sum())
        FORWARD_COUNTER.add_slots(zero_mask.numel() - skipped, skipped)
        return StandardCombineInput(hidden_states=output)

    forward_native = forward_cpu


def use_zero_skipping_cpu_moe(experts: nn.Module, layer_id: int) -> None:
    """Make ``experts`` (an SGLang ``FusedMoE`` on CPU) run :class:`ZeroSkippingCpuMoeMethod`.

    Raises:
        ZedaError: a quantised method, expert parallelism, biases or an activation other than SiLU,
            none of which the zero-skipping forward computes.
    """
    method = experts.quant_method
    if type(method) not in (UnquantizedFusedMoEMethod, ZeroSkippingCpuMoeMethod):
        raise ZedaError(f"layer {layer_id}: {type(method).__name__} MoE is not supported on CPU; serve unquantised")
    if experts.num_local_experts != experts.num_experts:
        raise ZedaError(f"layer {layer_id}: expert parallelism is not supported on CPU; drop --ep-size")
    config = experts.moe_runner_config
    if config.activation != "silu" or config.gemm1_alpha is not None or getattr(method, "with_bias", False):
        raise ZedaError(f"layer {layer_id}: only bias-free SwiGLU experts are served on CPU")
    method.__class__ = ZeroSkippingCpuMoeMethod
    method._forward_method = None  # re-resolve the dispatch on the next call


def runs_zero_skipping_cpu_moe(experts: nn.Module) -> bool:
    """Whether the forward ``experts`` dispatches to on CPU is the zero-skipping one."""
    method = experts.quant_method
    resolved = method._forward_method or method._resolve_forward_method()
    return getattr(resolved, "__func__", None) is ZeroSkippingCpuMoeMethod.forward_cpu
