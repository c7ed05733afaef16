"""The SGLang plugin's parts: registration, config parsing, weight names, the zero-slot hand-off and
capture, the CPU MoE forward, the launcher's settings. ``test_sglang_serve.py`` runs them together in
SGLang's real engine. `.ci/run` installs the `sglang` extra, so in CI these tests run (a missing
SGLang fails them there instead of skipping).
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
from zeda_core.moe import ZeroExpertRouter
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
    assert spec.zero_logit_bias  # the committed model's zero rows carry a logit offset: it must be applied
    gate = next(m for m in load_model(TINY_ZEDA, dtype=torch.float32).modules() if isinstance(m, ZeroExpertRouter))
    hidden = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    hidden[:8] = 0.0  # these tokens' logits are the zero rows' offset only: they pick zero slots
    topk = ZeroAwareTopK(spec, layer_id=0)
    topk.zero_logit_bias.data.copy_(gate.zero_logit_bias.detach())
    output = topk(hidden, hidden @ gate.weight.detach().T)  # SGLang's gate has no offset: the top-k adds it
    expected = gate(hidden)
    zero = expected.zero_mask
    assert output.topk_ids.dtype == torch.int32
    assert (output.topk_ids[zero] == -1).all() and (output.topk_weights[zero] == 0).all()
    assert (output.topk_ids[~zero] == expected.topk_ids[~zero].int()).all()
    torch.testing.assert_close(output.topk_weights[~zero], expected.topk_weights[~zero].float())
    assert (output.topk_ids[:8] == -1).all()
    empty = ZeroAwareTopK(spec, layer_id=0).empty_topk_output(torch.device("cpu"))
    assert empty.topk_ids.shape == (0, 2)


def test_only_forwards_that_skip_zero_slots_are_accepted_and_the_cpu_one_computes_real_slots_only() -> None:
    """In a process on SGLang's CPU platform: refusals, and the zero-skipping forward against references."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sglang_cpu_process.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_routed_experts_are_captured_before_zero_slots_become_skipped() -> None:
    """The capture must see ids >= N for zero slots: after the -1 hand-off they would count as real."""
    from sglang.srt.state_capturer import routed_experts
    from transformers import AutoConfig

    from zeda_server.sglang_models.zero_aware import ZeroAwareTopK, routing_spec_of

    class Capture:
        def __init__(self) -> None:
            self.ids: dict[int, torch.Tensor] = {}

        def capture(self, layer_id: int, topk_indices: torch.Tensor) -> None:
            self.ids[layer_id] = topk_indices.clone()

    spec = routing_spec_of(AutoConfig.from_pretrained(TINY_ZEDA))
    logits = torch.randn(32, spec.num_rows, generator=torch.Generator().manual_seed(2))
    capture = Capture()
    routed_experts.set_global_experts_capturer(capture)
    try:
        output = ZeroAwareTopK(spec, layer_id=3)(torch.zeros(32, 128), logits)
    finally:
        routed_experts.set_global_experts_capturer(None)
    expected = route(logits, spec).topk_ids.int()
    assert torch.equal(capture.ids[3], expected) and bool((expected >= spec.num_experts).any())
    assert torch.equal(output.topk_ids == -1, expected >= spec.num_experts)


def test_forward_counter_file_is_shared_between_processes(tmp_path: Path) -> None:
    from zeda_server.sglang_models.forward_counter import (
        COUNTER_ENV,
        ForwardCounts,
        create_counter_file,
        read_forward_counts,
    )

    path = create_counter_file(tmp_path / "forward.bin")
    script = (
        "import time\n"
        "from zeda_server.sglang_models.forward_counter import FORWARD_COUNTER\n"
        "import sglang.srt.distributed.parallel_state as ps\n"
        "ps.get_tensor_model_parallel_rank = lambda: 0\n"
        "FORWARD_COUNTER.add_slots(5, 3); FORWARD_COUNTER.add_slots(2, 1)\n"
        "with FORWARD_COUNTER.timing('model'):\n"
        "    with FORWARD_COUNTER.timing('moe'):\n"
        "        time.sleep(0.05)\n"
        "    time.sleep(0.05)\n"
    )
    env = {**os.environ, COUNTER_ENV: str(path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = read_forward_counts(path)
    assert (counts.computed_slots, counts.skipped_slots) == (7, 4)
    assert 0.05 <= counts.moe_seconds < counts.model_seconds and counts.model_seconds >= 0.1
    assert read_forward_counts(create_counter_file(path)) == ForwardCounts(0, 0, 0.0, 0.0)


def test_launcher_settings_for_sglang(tmp_path: Path) -> None:
    from zeda_server.sglang_engine import CPU_KV_TOKENS_CAP, engine_arguments, parse_sglang_args
    from zeda_server.sglang_env import SglangPlatform, cores_per_rank

    cpu, gpu = SglangPlatform("cpu"), SglangPlatform("cuda")
    args = engine_arguments(cpu, "auto", 32, 1024, None, 1, {})
    assert args["device"] == "cpu" and args["dtype"] == "float32"
    assert args["disable_overlap_schedule"] and args["sleep_on_idle"]
    assert args["max_total_tokens"] == min(32 * 1024, CPU_KV_TOKENS_CAP) and args["enable_return_routed_experts"]
    assert engine_arguments(cpu, "bfloat16", 4, 1024, 999, 2, {"chunked_prefill_size": 64}) == args | {
        "dtype": "bfloat16",
        "max_total_tokens": 999,
        "max_running_requests": 4,
        "tp_size": 2,
        "chunked_prefill_size": 64,
    }
    on_gpu = engine_arguments(gpu, "auto", 32, 1024, None, 1, {})
    assert on_gpu["moe_runner_backend"] == "triton" and not {"device", "dtype", "max_total_tokens"} & set(on_gpu)
    with pytest.raises(ZedaError, match="enable_return_routed_experts cannot be changed"):
        engine_arguments(gpu, "auto", 32, 1024, None, 1, {"enable_return_routed_experts": False})
    assert parse_sglang_args(["disable-radix-cache=true", "ep_size=2", "attention_backend=torch_native"]) == {
        "disable_radix_cache": True,
        "ep_size": 2,
        "attention_backend": "torch_native",
    }
    with pytest.raises(ZedaError, match="expected KEY=VALUE"):
        parse_sglang_args(["tp_size"])
    assert cores_per_rank([0, 1], 2) == "0|1" and cores_per_rank(list(range(8)), 2) == "0-3|4-7"
    with pytest.raises(ZedaError, match="needs at least 4 CPU cores"):
        cores_per_rank([0, 1], 4)


def test_glm_configs_of_transformers_5_for_sglang(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from zeda_server.sglang_engine import moe_layer_indices
    from zeda_server.sglang_models.models import leading_dense_layers

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES["glm4_moe_lite"].tiny_config())
    inject_zero_experts(model, 2, init="gaussian")
    config = AutoConfig.from_pretrained(save_model(model, tmp_path / "glm"))
    assert config.architectures == ["Glm4MoeLitePlusPlusForCausalLM", "Glm4MoeLiteForCausalLM"]  # MLA cache sizing
    assert config.to_dict()["architectures"] == ["Glm4MoeLitePlusPlusForCausalLM"]
    assert leading_dense_layers(config) == 1 and moe_layer_indices(config) == [1, 2]
    config.mlp_layer_types = ["sparse", "dense", "sparse"]
    with pytest.raises(ZedaError, match="only before the first MoE layer"):
        leading_dense_layers(config)


def test_zeda_loads_the_same_checkpoint_in_torch() -> None:
    assert load_model(TINY_ZEDA).config.zce_nums == [4]


def test_sglang_engine_usage_from_routed_experts() -> None:
    import base64

    import numpy as np
    from transformers import AutoConfig

    from zeda_server.sglang_engine import (
        CaptureLayout,
        flop_model_of,
        moe_layer_indices,
        report_of,
        slot_counts_from_meta,
    )

    config = AutoConfig.from_pretrained(TINY_ZEDA)
    flop_model = flop_model_of(config)
    assert moe_layer_indices(config) == [0, 1, 2, 3] and flop_model.top_k == 2
    assert flop_model.slot_flops == FlopModel.from_model(load_model(TINY_ZEDA)).slot_flops
    ids = np.full((5, 4, 2), 3, dtype="<i4")  # 5 tokens, 4 layers, K = 2
    ids[:, :, 1] = 9  # every second slot is a zero slot (N = 8)
    meta = {"routed_experts": base64.b64encode(ids.tobytes()).decode()}
    report = report_of(slot_counts_from_meta(meta, CaptureLayout.of(config), num_experts=8), flop_model)
    assert report.tokens == 5 and report.zero_expert_ratio == 0.5
    assert report.expert_flops == report.expert_flops_saved == 5 * 4 * flop_model.slot_flops
