"""Turn an SGLang MoE block into a zero-aware one: a gate of N + Z rows, ``zeda_core.route`` top-k
with the compute dial's zero offsets (``dial``), zero slots handed to the fused MoE as skipped (-1) slots.

Two fused-MoE forwards skip -1 slots: SGLang 0.5.23's Triton runner on GPU, and ZEDA's own CPU
forward (``cpu_moe``). Any other runner (trtllm, cutlass, deep-gemm, upstream CPU) would compute
or crash on them, and fused shared experts would be remapped. Those setups are refused at load,
by looking at the forward each layer will actually dispatch to.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from sglang.srt.layers.linear import ReplicatedLinear
from sglang.srt.layers.moe.topk import StandardTopKOutput, capture_routed_experts_if_allowed
from sglang.srt.layers.moe.utils import MoeRunnerBackend
from sglang.srt.utils import is_cpu
from torch import nn

from zeda_core.errors import ZedaError
from zeda_core.routing import add_to_zero_columns, route
from zeda_core.spec import RoutingSpec
from zeda_server.sglang_models.cpu_moe import runs_zero_skipping_cpu_moe
from zeda_server.sglang_models.dial import OFFSET_PARAMETER, RequestOffsets
from zeda_server.sglang_models.zero_slots import hand_off_zero_slots, served_routing_spec


def routing_spec_of(config: Any) -> RoutingSpec:
    """The ZEDA routing spec of an SGLang model config (ZEDA keys ``zce_nums`` etc. or reference format).

    Raises:
        ZedaError: the config has no zero experts or an unsupported family.
    """
    spec = served_routing_spec(config)
    if spec.num_zero_experts < 1:
        raise ZedaError("config has no zero experts (zce_nums); serve it with the upstream SGLang model")
    return spec


class ZeroAwareTopK(nn.Module):
    """Drop-in for SGLang's ``TopK``: routes with ``zeda_core.route`` and skips zero slots.

    Args:
        spec: the layer's routing spec (N real + Z zero rows).
        layer_id: decoder layer index (routed-experts capture).
        correction_bias: [N + Z] selection bias for sigmoid families, else None.
        scale_in_topk: whether the routed scaling factor belongs in the top-k weights (else the
            experts apply it on their output).
        request_offsets: the model's per-token request offsets (None: requests carry none).

    Attributes:
        zero_logit_bias: [Z] float32 parameter, the zero rows' logit offset, loaded from the
            checkpoint's ``mlp.gate.zero_logit_bias`` (see ``models``); None when the spec has none.
        zero_offset: [1] float32 parameter, the server-wide zero offset in logits (0 at load; set
            through SGLang's weight-update API, see ``dial``).
    """

    def __init__(
        self,
        spec: RoutingSpec,
        layer_id: int,
        correction_bias: torch.Tensor | None = None,
        scale_in_topk: bool = True,
        request_offsets: RequestOffsets | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec if scale_in_topk else dataclasses.replace(spec, routed_scaling_factor=1.0)
        self.layer_id = layer_id
        self.correction_bias = correction_bias
        self.request_offsets = request_offsets
        self.topk_config = _CaptureConfig()
        offset = nn.Parameter(torch.zeros(1, dtype=torch.float32), requires_grad=False)
        self.register_parameter(OFFSET_PARAMETER, offset)
        bias = torch.zeros(spec.num_zero_experts, dtype=torch.float32)
        self.register_parameter(
            "zero_logit_bias", nn.Parameter(bias, requires_grad=False) if spec.zero_logit_bias else None
        )

    def zero_offsets(self, num_tokens: int) -> torch.Tensor:
        """[num_tokens] float32: the server-wide offset plus each token's request offset (logits)."""
        offsets = self.zero_offset.expand(num_tokens)
        per_token = self.request_offsets.of(num_tokens) if self.request_offsets is not None else None
        return offsets if per_token is None else offsets + per_token

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, *args, **kwargs) -> StandardTopKOutput:
        """[T, N + Z] router logits -> top-k output whose zero slots are id -1 with weight 0."""
        offsets = self.zero_offsets(router_logits.shape[0])
        logits = router_logits.float()
        if self.zero_logit_bias is not None:
            logits = add_to_zero_columns(logits, self.zero_logit_bias, self.spec.num_experts)
        routing = route(logits, self.spec, selection_bias=self.correction_bias, zero_offset=offsets)
        ids = routing.topk_ids.to(torch.int32)
        capture_routed_experts_if_allowed(self.topk_config, self.layer_id, ids)  # zero slots still >= N here
        ids, weights = hand_off_zero_slots(ids, routing.topk_weights.float(), self.spec.num_experts)
        return StandardTopKOutput(weights, ids, router_logits)

    def empty_topk_output(self, device: torch.device) -> StandardTopKOutput:
        k = self.spec.top_k
        return StandardTopKOutput(
            torch.empty((0, k), dtype=torch.float32, device=device),
            torch.empty((0, k), dtype=torch.int32, device=device),
            torch.empty((0, self.spec.num_rows), dtype=torch.float32, device=device),
        )


@dataclasses.dataclass
class _CaptureConfig:
    allow_routed_experts_capture: bool = True


def check_experts_skip_zero_slots(experts: nn.Module, layer_id: int, on_cpu: bool | None = None) -> None:
    """Refuse a fused-MoE layer whose forward would compute or crash on skipped (-1) slots.

    On CPU the layer must dispatch to the zero-skipping forward of ``cpu_moe``; on GPU its runner
    must be SGLang's Triton runner (no aiter runner beside it).
    """
    if getattr(experts, "num_fused_shared_experts", 0):
        hint = "pass --disable-shared-experts-fusion"
        raise ZedaError(f"fused shared experts are not supported with zero experts; {hint}")
    method = experts.quant_method
    if is_cpu() if on_cpu is None else on_cpu:
        if not runs_zero_skipping_cpu_moe(experts):
            raise ZedaError(f"layer {layer_id}: the CPU MoE forward of {type(method).__name__} computes zero slots")
        return
    runner = getattr(method, "runner", None)
    backend = getattr(runner, "runner_backend", None)
    if backend != MoeRunnerBackend.TRITON or getattr(method, "_aiter_runner", None) is not None:
        hint = "start SGLang with --moe-runner-backend triton"
        raise ZedaError(f"layer {layer_id}: MoE runner {backend} does not skip zero slots; {hint}")


def make_zero_aware(
    block: nn.Module,
    spec: RoutingSpec,
    hidden_size: int,
    layer_id: int,
    prefix: str,
    request_offsets: RequestOffsets,
) -> None:
    """Give ``block`` (an SGLang sparse MoE block with ``gate``, ``topk``, ``experts``) N + Z router rows.

    Softmax families get a ``ReplicatedLinear`` gate of N + Z rows (weight name ``gate.weight``);
    sigmoid families keep their gate module, with ``weight`` and ``e_score_correction_bias``
    resized to N + Z rows. The top-k routes with the dial's offsets: its own server-wide
    ``topk.zero_offset`` and the model's ``request_offsets``.
    """
    check_experts_skip_zero_slots(block.experts, layer_id)
    if spec.score_func == "softmax":
        block.gate = ReplicatedLinear(hidden_size, spec.num_rows, bias=False, prefix=f"{prefix}.gate")
        bias = None
    else:
        gate = block.gate
        gate.weight = nn.Parameter(torch.empty((spec.num_rows, hidden_size), dtype=torch.float32))
        gate.e_score_correction_bias = nn.Parameter(torch.empty((spec.num_rows,), dtype=torch.float32))
        bias = gate.e_score_correction_bias
    scale_in_topk = bool(getattr(block.experts, "should_fuse_routed_scaling_factor_in_topk", True))
    block.topk = ZeroAwareTopK(spec, layer_id, bias, scale_in_topk, request_offsets)
