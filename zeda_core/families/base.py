"""What ZEDA needs to know about one Hugging Face MoE family."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from zeda_core.spec import RoutingSpec, ScoreFunc

PLUS_PLUS = "_plus_plus"


TINY_MLA_WITH_SHARED_EXPERT: dict[str, Any] = dict(
    intermediate_size=64,
    moe_intermediate_size=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    num_hidden_layers=3,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    num_key_value_heads=4,
)
"""Tiny-model overrides shared by the families with multi-head latent attention and one shared expert
(DeepSeek-V3, GLM-4.7-Flash): 8 routed experts, top-2, 3 layers, the first one dense."""


@dataclass(frozen=True)
class MoeFamily:
    """Adapter for one MoE family in transformers 5.

    Attributes:
        model_type: the family's HF ``model_type``.
        architecture: its causal-LM class name.
        sparse_block: class name of the sparse MoE block that ZEDA replaces.
        score_func: router scoring (``softmax`` or ``sigmoid`` with a selection bias).
        always_norm_topk: the family normalises top-k weights regardless of the config (Mixtral).
        shared_name: attribute holding the shared expert(s), if any.
        shared_gate: the shared expert output is gated by ``shared_expert_gate`` (Qwen2-MoE).
        legacy_renames: (old, new) substrings of legacy checkpoint keys (transformers 4.x layout).
        legacy_expert_names: per-expert projection names in legacy checkpoints (gate, up, down).
        num_experts_attr: config attribute holding N.
        tiny: config overrides for a tiny random model of this family (tests, dry runs).
    """

    model_type: str
    architecture: str
    sparse_block: str
    score_func: ScoreFunc
    always_norm_topk: bool = False
    shared_name: str | None = None
    shared_gate: bool = False
    legacy_renames: tuple[tuple[str, str], ...] = ()
    legacy_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    num_experts_attr: str = "num_local_experts"
    tiny: dict[str, Any] = field(default_factory=dict)

    @property
    def plus_plus_model_type(self) -> str:
        """``model_type`` of a ZEDA checkpoint (``qwen3_moe_plus_plus`` as in the published models)."""
        return self.model_type + PLUS_PLUS

    @property
    def plus_plus_architecture(self) -> str:
        """``architectures[0]`` of a ZEDA checkpoint, e.g. ``Qwen3MoePlusPlusForCausalLM``."""
        return self.architecture.replace("ForCausalLM", "PlusPlusForCausalLM")

    def routing_spec(
        self, config: PretrainedConfig, num_zero_experts: int, zero_logit_bias: bool = False
    ) -> RoutingSpec:
        """The routing spec of this family's MoE layers with Z zero experts."""
        sigmoid = self.score_func == "sigmoid"
        return RoutingSpec(
            num_experts=int(getattr(config, self.num_experts_attr)),
            num_zero_experts=int(num_zero_experts),
            top_k=int(config.num_experts_per_tok),
            score_func=self.score_func,
            norm_topk_prob=self.always_norm_topk or bool(getattr(config, "norm_topk_prob", False)),
            routed_scaling_factor=float(getattr(config, "routed_scaling_factor", 1.0)) if sigmoid else 1.0,
            selection_bias=sigmoid,
            zero_logit_bias=zero_logit_bias and num_zero_experts > 0,
            n_group=int(getattr(config, "n_group", 1) or 1) if sigmoid else 1,
            topk_group=int(getattr(config, "topk_group", 1) or 1) if sigmoid else 1,
            topk_sorted=not sigmoid,
            mask_zero_experts=bool(getattr(config, "use_zce_mask", False)),
        )

    def tiny_config(self, **overrides: Any) -> PretrainedConfig:
        """A tiny random-init config of this family (float32)."""
        common = dict(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        return AutoConfig.for_model(self.model_type, **{**common, **self.tiny, **overrides})
