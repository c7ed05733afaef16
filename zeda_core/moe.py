"""Zero-aware MoE block that replaces a family's sparse MoE block in a Hugging Face model.

Parameter names stay those of the family (``mlp.gate.weight``, ``mlp.experts.gate_up_proj``,
``mlp.experts.down_proj``, ``mlp.shared_expert(s)...``), so checkpoints keep the family's layout;
only the gate gains Z rows. The block owns its expert computation (it never relies on the
transformers experts dispatch, which computes sentinel ids) and reports its routing to the
active :class:`~zeda_core.recording.RoutingRecorder`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zeda_core.experts import MoeExpertsBackend, torch_experts
from zeda_core.recording import active_recorder
from zeda_core.routing import Routing, add_to_zero_columns, route
from zeda_core.spec import RoutingSpec


class ZeroExpertRouter(nn.Module):
    """Router over N real + Z zero experts.

    Holds ``weight`` [N + Z, H], plus ``e_score_correction_bias`` [N + Z] (float32 buffer) for
    families with a selection bias, and ``zero_logit_bias`` [Z] (float32) when the softmax
    ``preserve`` init needs it. Router logits are computed in float32 for every family.
    """

    def __init__(self, spec: RoutingSpec, hidden_size: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(spec.num_rows, hidden_size, dtype=dtype))
        if spec.selection_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(spec.num_rows, dtype=torch.float32))
        if spec.zero_logit_bias:
            self.zero_logit_bias = nn.Parameter(torch.zeros(spec.num_zero_experts, dtype=torch.float32))

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, N + Z] float32 router logits."""
        logits = F.linear(hidden_states.float(), self.weight.float())
        if self.spec.zero_logit_bias:
            logits = add_to_zero_columns(logits, self.zero_logit_bias, self.spec.num_experts)
        return logits

    def forward(
        self,
        hidden_states: torch.Tensor,
        forced_ids: torch.Tensor | None = None,
        zero_offset: torch.Tensor | None = None,
    ) -> Routing:
        """[T, H] -> :class:`Routing` of the T tokens; ``zero_offset`` [T] is the compute dial (see :func:`route`)."""
        bias = self.e_score_correction_bias if self.spec.selection_bias else None
        return route(
            self.logits(hidden_states), self.spec, selection_bias=bias, forced_ids=forced_ids, zero_offset=zero_offset
        )


class ZeroExpertMoeBlock(nn.Module):
    """Routed experts that skip zero slots, plus the family's shared expert(s) if any.

    Args:
        gate: the zero-aware router.
        experts: the family's experts module; its ``gate_up_proj`` [N, 2I, H], ``down_proj``
            [N, H, I] and ``act_fn`` are used, its forward never is.
        layer_idx: decoder layer index (routing replay and per-layer statistics).
        shared_name: attribute name of the shared expert module (``shared_expert`` or
            ``shared_experts``), kept so that weight names match the family's.
        shared: the shared expert module, run on every token.
        shared_gate: Qwen2-MoE's ``shared_expert_gate`` (sigmoid gate on the shared output).

    ``experts_backend`` computes the routed experts (``torch`` by default; see
    :func:`zeda_core.moe_backends.set_moe_backend`).
    """

    def __init__(
        self,
        gate: ZeroExpertRouter,
        experts: nn.Module,
        layer_idx: int,
        shared_name: str | None = None,
        shared: nn.Module | None = None,
        shared_gate: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.layer_idx = layer_idx
        self.experts_backend: MoeExpertsBackend = torch_experts
        self.shared_name = shared_name
        if shared is not None:
            self.add_module(shared_name, shared)
        if shared_gate is not None:
            self.shared_expert_gate = shared_gate

    @property
    def spec(self) -> RoutingSpec:
        return self.gate.spec

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, S, H] -> [B, S, H]."""
        batch, seq, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)
        recorder = active_recorder()
        forced = recorder.forced_ids(self.layer_idx, batch, seq) if recorder is not None else None
        offset = recorder.token_zero_offsets(batch, seq) if recorder is not None else None
        routing = self.gate(flat, forced_ids=forced, zero_offset=offset)
        if recorder is not None:
            recorder.add(self.layer_idx, routing, batch, seq)
        out = self.experts_backend(hidden_states=flat, routing=routing, experts=self.experts)
        if self.shared_name is not None:
            shared_out = getattr(self, self.shared_name)(flat)
            if hasattr(self, "shared_expert_gate"):
                shared_out = torch.sigmoid(self.shared_expert_gate(flat)) * shared_out
            out = out + shared_out
        return out.view(batch, seq, hidden)
