"""ZEDA core: zero-expert routing, group loss, FLOP accounting, conversion and checkpoints.

Shared by the trainer, the engines, the SGLang plugin and the kernels' references; it imports
neither the server nor the trainer.
"""

from zeda_core.chat import chat_prompt_ids
from zeda_core.checkpoint import checkpoint_config, load_model, save_model
from zeda_core.convert import ZERO_INITS, inject_zero_experts
from zeda_core.errors import ZedaError
from zeda_core.experts import MoeExpertsBackend, grouped_experts_forward
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
from zeda_core.model_queries import model_spec, moe_blocks, spec_from_config
from zeda_core.moe import ZeroExpertMoeBlock, ZeroExpertRouter
from zeda_core.moe_backends import MOE_BACKENDS, moe_backend, set_moe_backend
from zeda_core.recording import LayerRouting, RoutingRecorder, active_recorder, record_routing
from zeda_core.routing import Routing, route
from zeda_core.sampling import sample_next_tokens
from zeda_core.scoring import ForwardBatch, SequenceScores, forward_batches, score_sequences
from zeda_core.spec import RoutingSpec, read_num_zero_experts, write_num_zero_experts

__all__ = [
    "FAMILIES",
    "MOE_BACKENDS",
    "ZERO_INITS",
    "FlopModel",
    "FlopReport",
    "ForwardBatch",
    "LayerRouting",
    "MoeExpertsBackend",
    "MoeFamily",
    "Routing",
    "RoutingRecorder",
    "RoutingSpec",
    "SequenceScores",
    "ZedaError",
    "ZeroExpertMoeBlock",
    "ZeroExpertRouter",
    "active_recorder",
    "chat_prompt_ids",
    "checkpoint_config",
    "expert_slot_flops",
    "family_for_config",
    "family_for_model_type",
    "flop_report",
    "forward_batches",
    "forward_kl",
    "group_aux_loss",
    "group_aux_loss_of_layers",
    "group_aux_loss_over_layers",
    "group_aux_target_ratio",
    "grouped_experts_forward",
    "inject_zero_experts",
    "load_model",
    "model_spec",
    "moe_backend",
    "moe_blocks",
    "opd_advantage",
    "read_num_zero_experts",
    "record_routing",
    "reverse_kl",
    "route",
    "sample_next_tokens",
    "save_model",
    "score_sequences",
    "set_moe_backend",
    "spec_from_config",
    "token_logprobs",
    "write_num_zero_experts",
    "zero_group_weight_for",
]
