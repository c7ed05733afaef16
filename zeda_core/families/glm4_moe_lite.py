"""GLM-4.7-Flash (``glm4_moe_lite``): sigmoid + correction bias, one shared expert, scaling 1.8."""

from zeda_core.families.base import MoeFamily

FAMILY = MoeFamily(
    model_type="glm4_moe_lite",
    architecture="Glm4MoeLiteForCausalLM",
    sparse_block="Glm4MoeLiteMoE",
    score_func="sigmoid",
    shared_name="shared_experts",
    tiny=dict(
        intermediate_size=64,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.8,
        norm_topk_prob=True,
        num_hidden_layers=3,
        mlp_layer_types=["dense", "sparse", "sparse"],
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        num_key_value_heads=4,
    ),
)
