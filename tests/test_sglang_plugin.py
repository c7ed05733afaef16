"""The SGLang plugin on CPU: registration, config parsing, weight names, the zero-slot hand-off.

SGLang's engine needs a GPU; its model modules import here. `.ci/run` installs the `sglang` extra,
so in CI these tests run (a missing SGLang fails them there instead of skipping).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sglang_guard import sglang_marks

from zeda_core import ZedaError, inject_zero_experts, load_model, save_model
from zeda_core.families import FAMILIES
from zeda_core.flops import FlopModel
from zeda_core.routing import route

ROOT = Path(__file__).resolve().parents[1]
TINY_ZEDA = ROOT / "models" / "tiny-zeda"

pytestmark = sglang_marks()

REGISTRY_CHECK = (
    "from sglang.srt.models.registry import ModelRegistry; "
    "print(sorted(k for k in ModelRegistry.models if 'PlusPlus' in k))"
)
EXPECTED = "['Glm4MoeLitePlusPlusForCausalLM', 'Qwen3MoePlusPlusForCausalLM']"


def test_registration_through_the_external_model_package() -> None:
    env = {**os.environ, "SGLANG_EXTERNAL_MODEL_PACKAGE": "zeda_server.sglang_models"}
    done = subprocess.run([sys.executable, "-c", REGISTRY_CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == EXPECTED


def test_registration_through_the_plugin_entry_point() -> None:
    script = "from sglang.srt.plugins import load_plugins; load_plugins(); " + REGISTRY_CHECK
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_EXTERNAL_MODEL_PACKAGE"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == EXPECTED


def test_config_parsing_of_zeda_checkpoints() -> None:
    from transformers import AutoConfig

    from zeda_server.sglang_models.zero_aware import routing_spec_of

    config = AutoConfig.from_pretrained(TINY_ZEDA)
    assert type(config).__name__ == "Qwen3MoePlusPlusConfig"
    spec = routing_spec_of(config)
    assert (spec.num_experts, spec.num_zero_experts, spec.top_k, spec.score_func) == (8, 4, 2, "softmax")
    plain = AutoConfig.from_pretrained(ROOT / "models" / "tiny-teacher")
    with pytest.raises(ZedaError, match="no zero experts"):
        routing_spec_of(plain)


def test_config_parsing_of_a_sigmoid_family(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from zeda_server.sglang_models.zero_aware import routing_spec_of

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES["glm4_moe_lite"].tiny_config())
    inject_zero_experts(model, 2, init="gaussian")
    path = save_model(model, tmp_path / "glm")
    config = AutoConfig.from_pretrained(path)
    assert json.loads((path / "config.json").read_text())["model_type"] == "glm4_moe_lite_plus_plus"
    spec = routing_spec_of(config)
    assert spec.score_func == "sigmoid" and spec.selection_bias and spec.num_zero_experts == 2


def test_weight_names_match_the_upstream_loader() -> None:
    """Fused expert tensors become the per-expert names SGLang maps; the N + Z gate rows pass through."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    from zeda_server.sglang_models.models import per_expert_weights

    state = load_file(TINY_ZEDA / "model.safetensors")
    mapped = dict(per_expert_weights(state.items()))
    assert mapped["model.layers.0.mlp.gate.weight"].shape == (12, 128)  # N + Z rows
    assert not any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in mapped)
    expert_names = [n for n in mapped if ".mlp.experts." in n]
    assert len(expert_names) == 4 * 8 * 3
    mapping = FusedMoE.make_expert_params_mapping("gate_proj", "down_proj", "up_proj", num_experts=8)
    for name in expert_names:
        assert sum(weight_name in name for _, weight_name, _, _ in mapping) == 1, name
    fused = state["model.layers.1.mlp.experts.gate_up_proj"]
    torch.testing.assert_close(mapped["model.layers.1.mlp.experts.3.up_proj.weight"], fused[3, 256:])
    torch.testing.assert_close(
        mapped["model.layers.1.mlp.experts.5.down_proj.weight"], state["model.layers.1.mlp.experts.down_proj"][5]
    )
    reference = {"model.layers.0.mlp.experts.0.gate_proj.weight": torch.zeros(2, 2)}  # per-expert layout: unchanged
    assert dict(per_expert_weights(reference.items())).keys() == reference.keys()


def test_zero_aware_topk_routes_like_zeda_core_and_skips_zero_slots() -> None:
    from transformers import AutoConfig

    from zeda_server.sglang_models.zero_aware import ZeroAwareTopK, routing_spec_of

    spec = routing_spec_of(AutoConfig.from_pretrained(TINY_ZEDA))
    logits = torch.randn(64, spec.num_rows, generator=torch.Generator().manual_seed(0))
    logits[:8, spec.num_experts :] += 10.0  # these tokens pick zero slots only
    output = ZeroAwareTopK(spec, layer_id=0)(torch.zeros(64, 128), logits)
    expected = route(logits, spec)
    zero = expected.zero_mask
    assert output.topk_ids.dtype == torch.int32
    assert (output.topk_ids[zero] == -1).all() and (output.topk_weights[zero] == 0).all()
    assert (output.topk_ids[~zero] == expected.topk_ids[~zero].int()).all()
    torch.testing.assert_close(output.topk_weights[~zero], expected.topk_weights[~zero].float())
    assert (output.topk_ids[:8] == -1).all()
    empty = ZeroAwareTopK(spec, layer_id=0).empty_topk_output(torch.device("cpu"))
    assert empty.topk_ids.shape == (0, 2)


def test_runners_that_cannot_skip_zero_slots_are_refused() -> None:
    from zeda_server.sglang_models.zero_aware import check_experts_skip_zero_slots

    class Experts(torch.nn.Module):
        def __init__(self, runner: str, shared: int = 0) -> None:
            super().__init__()
            self.runner_backend, self.num_fused_shared_experts = runner, shared

    check_experts_skip_zero_slots(Experts("MoeRunnerBackend.TRITON"), 0)
    with pytest.raises(ZedaError, match="does not skip zero slots"):
        check_experts_skip_zero_slots(Experts("flashinfer_trtllm"), 3)
    with pytest.raises(ZedaError, match="fused shared experts"):
        check_experts_skip_zero_slots(Experts("triton", shared=1), 3)


def test_zeda_loads_the_same_checkpoint_in_torch() -> None:
    assert load_model(TINY_ZEDA).config.zce_nums == [4]


def test_sglang_engine_usage_from_routed_experts() -> None:
    import base64

    import numpy as np
    from transformers import AutoConfig

    from zeda_server.sglang_engine import flop_model_of, moe_layer_count, report_of, slot_counts_from_meta

    config = AutoConfig.from_pretrained(TINY_ZEDA)
    flop_model = flop_model_of(config)
    assert moe_layer_count(config) == 4 and flop_model.top_k == 2
    assert flop_model.slot_flops == FlopModel.from_model(load_model(TINY_ZEDA)).slot_flops
    ids = np.full((5, 4, 2), 3, dtype="<i4")  # 5 tokens, 4 layers, K = 2
    ids[:, :, 1] = 9  # every second slot is a zero slot (N = 8)
    meta = {"routed_experts": base64.b64encode(ids.tobytes()).decode()}
    report = report_of(slot_counts_from_meta(meta, flop_model, num_experts=8), flop_model)
    assert report.tokens == 5 and report.zero_expert_ratio == 0.5
    assert report.expert_flops == report.expert_flops_saved == 5 * 4 * flop_model.slot_flops
