"""ZEDA core: zero-expert routing, group loss, FLOP accounting, conversion and checkpoints.

Shared by the trainer, the engines, the SGLang plugin and the kernels' references; it imports
neither the server nor the trainer.
"""

from zeda_core.checkpoint import checkpoint_config, load_model, save_model
from zeda_core.convert import ZERO_INITS, inject_zero_experts
from zeda_core.errors import ZedaError
from zeda_core.experts import experts_forward, grouped_experts_forward, set_experts_backend
from zeda_core.families import FAMILIES, MoeFamily, family_for_config, family_for_model_type
from zeda_core.flops import FlopModel, FlopReport, expert_slot_flops, flop_report
from zeda_core.losses import (
    forward_kl,
    group_aux_loss,
    group_aux_loss_of_layers,
    group_aux_loss_over_layers,
    group_aux_target_ratio,
    opd_advantage,
    reverse_kl,
    token_logprobs,
    zero_group_weight_for,
)
from zeda_core.moe import ZeroExpertMoeBlock, ZeroExpertRouter
from zeda_core.recording import LayerRouting, RoutingRecorder, active_recorder, record_routing
from zeda_core.routing import Routing, route
from zeda_core.spec import RoutingSpec, read_num_zero_experts, write_num_zero_experts

__all__ = [
    "FAMILIES",
    "ZERO_INITS",
    "FlopModel",
    "FlopReport",
    "LayerRouting",
    "MoeFamily",
    "Routing",
    "RoutingRecorder",
    "RoutingSpec",
    "ZedaError",
    "ZeroExpertMoeBlock",
    "ZeroExpertRouter",
    "active_recorder",
    "checkpoint_config",
    "expert_slot_flops",
    "experts_forward",
    "family_for_config",
    "family_for_model_type",
    "flop_report",
    "forward_kl",
    "group_aux_loss",
    "group_aux_loss_of_layers",
    "group_aux_loss_over_layers",
    "group_aux_target_ratio",
    "grouped_experts_forward",
    "inject_zero_experts",
    "load_model",
    "opd_advantage",
    "read_num_zero_experts",
    "record_routing",
    "reverse_kl",
    "route",
    "save_model",
    "set_experts_backend",
    "token_logprobs",
    "write_num_zero_experts",
    "zero_group_weight_for",
]
