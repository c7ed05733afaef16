"""Mixtral: softmax routing with top-k weights always renormalised; legacy ``block_sparse_moe`` keys."""

from zeda_core.families.base import MoeFamily

FAMILY = MoeFamily(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    sparse_block="MixtralSparseMoeBlock",
    score_func="softmax",
    always_norm_topk=True,
    legacy_renames=((".block_sparse_moe.", ".mlp."),),
    legacy_expert_names=("w1", "w3", "w2"),
    tiny=dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8),
)
