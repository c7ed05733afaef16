"""Checkpoints: reference and legacy layouts, sharding, atomic writes, and clear errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from zeda_core import ZedaError, checkpoint_config, inject_zero_experts, load_model, save_model
from zeda_core import checkpoint as checkpoint_module

from family_checks import tiny_model, token_batch


def logits(model, tokens=None):
    with torch.no_grad():
        return model(token_batch() if tokens is None else tokens).logits


def zeda_qwen3(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = tiny_model("qwen3_moe")
    inject_zero_experts(model, 4, init="gaussian", seed=3)
    return model, save_model(model, tmp_path / "zeda")


def split_experts(state: dict, names=("gate_proj", "up_proj", "down_proj")) -> dict:
    """Fused transformers-5 experts -> the per-expert layout of transformers 4.x checkpoints."""
    out = {}
    for key, tensor in state.items():
        if key.endswith("experts.gate_up_proj"):
            prefix = key.removesuffix(".gate_up_proj")
            for e, fused in enumerate(tensor):
                gate, up = fused.chunk(2, dim=0)
                out[f"{prefix}.{e}.{names[0]}.weight"], out[f"{prefix}.{e}.{names[1]}.weight"] = gate, up
        elif key.endswith("experts.down_proj"):
            prefix = key.removesuffix(".down_proj")
            for e, down in enumerate(tensor):
                out[f"{prefix}.{e}.{names[2]}.weight"] = down
        else:
            out[key] = tensor
    return {k: v.contiguous() for k, v in out.items()}


def test_config_uses_published_keys(tmp_path: Path) -> None:
    model, path = zeda_qwen3(tmp_path)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe_plus_plus"
    assert config["architectures"] == ["Qwen3MoePlusPlusForCausalLM"]
    assert (config["zce_nums"], config["zce_types"], config["use_zce_mask"]) == ([4], ["zero"], False)
    assert json.loads(json.dumps(checkpoint_config(model))) == config
    assert load_file(path / "model.safetensors")["model.layers.0.mlp.gate.weight"].shape == (12, 32)


def test_published_reference_format_loads_unchanged(tmp_path: Path) -> None:
    model, path = zeda_qwen3(tmp_path)
    ref = tmp_path / "reference"
    ref.mkdir()
    config = json.loads((path / "config.json").read_text())
    config["num_experts"] = config.pop("num_local_experts")  # the published config's key
    (ref / "config.json").write_text(json.dumps(config))
    state = split_experts(load_file(path / "model.safetensors"))
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in state
    save_file(state, ref / "model.safetensors")
    assert torch.equal(logits(load_model(ref)), logits(model))


def test_legacy_mixtral_layout_loads(tmp_path: Path) -> None:
    model = tiny_model("mixtral")
    legacy = tmp_path / "mixtral"
    legacy.mkdir()
    state = split_experts(model.state_dict(), names=("w1", "w3", "w2"))
    state = {k.replace(".mlp.", ".block_sparse_moe."): v for k, v in state.items()}
    save_file(state, legacy / "model.safetensors")
    (legacy / "config.json").write_text(json.dumps(model.config.to_dict()))
    torch.testing.assert_close(logits(load_model(legacy)), logits(model), rtol=0, atol=1e-5)
    plain = load_model(legacy, zero_aware=False)
    assert type(plain.model.layers[0].mlp).__name__ == "MixtralSparseMoeBlock"


def test_sharded_checkpoint_round_trip(tmp_path: Path) -> None:
    model = tiny_model("deepseek_v3")
    inject_zero_experts(model, 4)
    path = save_model(model, tmp_path / "sharded", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*.safetensors"))) > 1
    assert torch.equal(logits(load_model(path)), logits(model))


def test_tied_embeddings_round_trip(tmp_path: Path) -> None:
    from zeda_core import FAMILIES

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES["olmoe"].tiny_config(tie_word_embeddings=True)).eval()
    inject_zero_experts(model, 2)
    path = save_model(model, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    reloaded = load_model(path)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(reloaded), logits(model))


def test_existing_output_is_kept_without_overwrite(tmp_path: Path) -> None:
    model, path = zeda_qwen3(tmp_path)
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(ZedaError, match="already exists"):
        save_model(model, path)
    assert (path / "model.safetensors").read_bytes() == before
    save_model(model, path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zeda"]


def test_failed_write_leaves_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    model, path = zeda_qwen3(tmp_path)
    before = sorted(p.name for p in path.iterdir())

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "_write_weights", broken)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, path, overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zeda"]


def test_gate_rows_disagreeing_with_config(tmp_path: Path) -> None:
    _, path = zeda_qwen3(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["zce_nums"] = [6]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ZedaError, match=r"mlp\.gate\.weight has shape \[12, \d+\], the config implies \[14, \d+\]"):
        load_model(path)


def test_corrupt_weights(tmp_path: Path) -> None:
    _, path = zeda_qwen3(tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ZedaError, match="cannot read weights"):
        load_model(path)


def test_missing_weights(tmp_path: Path) -> None:
    _, path = zeda_qwen3(tmp_path)
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.experts.down_proj"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(ZedaError, match="missing"):
        load_model(path)


def test_pickle_weights_are_refused(tmp_path: Path) -> None:
    _, path = zeda_qwen3(tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ZedaError, match="safetensors only"):
        load_model(path)


def test_dense_model_is_refused(tmp_path: Path) -> None:
    config = AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(ZedaError, match=r"'llama' is not a supported MoE family.*supported: deepseek_v3"):
        load_model(tmp_path / "llama")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "absent", "does not exist"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is a file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "has no config.json"),
        (lambda p: ((p / "bad").mkdir(), (p / "bad" / "config.json").write_text("{"))[0] or p / "bad", "cannot read"),
        (lambda p: "not a hub id!", "does not exist"),
    ],
)
def test_bad_paths(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(ZedaError, match=message):
        load_model(make(tmp_path))


def test_unsupported_zero_compute_types(tmp_path: Path) -> None:
    _, path = zeda_qwen3(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["zce_nums"], config["zce_types"] = [2, 2], ["zero", "copy"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ZedaError, match=r"\['copy'\] are not supported"):
        load_model(path)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "glm4_moe_lite"])
def test_preserve_round_trip(tmp_path: Path, model_type: str) -> None:
    model = tiny_model(model_type)
    expected = logits(model)
    inject_zero_experts(model, 4, init="preserve")
    path = save_model(model, tmp_path / "preserve")
    reloaded = load_model(path)
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-5)
    state = load_file(path / "model.safetensors")
    has_offset = any(k.endswith("gate.zero_logit_bias") for k in state)
    assert has_offset == (model_type == "qwen3_moe")  # softmax families only
    assert json.loads((path / "config.json").read_text())["zeda_zero_logit_bias"] == has_offset


@pytest.mark.parametrize("model_type", ["qwen3_moe", "glm4_moe_lite"])
def test_router_weights_are_checked_against_the_config_from_the_headers_only(tmp_path: Path, model_type: str) -> None:
    model = tiny_model(model_type)
    inject_zero_experts(model, 4, init="preserve")
    path = save_model(model, tmp_path / "ok")
    checkpoint_module.check_router_weights(path)  # what save_model writes matches its config
    config = json.loads((path / "config.json").read_text())
    offset = config["zeda_zero_logit_bias"]
    config["zeda_zero_logit_bias"] = not offset  # a hand-edited config: the weights no longer match it
    (path / "config.json").write_text(json.dumps(config))
    word = "unexpected" if offset else "missing"
    with pytest.raises(ZedaError, match=rf"router weights do not match the config \({word} \[.*gate\.zero_logit_bias"):
        checkpoint_module.check_router_weights(path)
    config["zeda_zero_logit_bias"], config["zce_nums"] = offset, [3]  # one zero row fewer: the same names
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ZedaError, match=r"mlp\.gate\.weight has shape \[12, 32\], the config implies \[11, 32\]"):
        checkpoint_module.check_router_weights(path)


def test_written_checkpoint_and_files_are_readable_by_others(tmp_path: Path) -> None:
    """Temporary files and directories are private; what appears at the target is not (umask 022:
    0755 directories, 0644 files), so a server under another account can load the model."""
    import os

    from zeda_core.atomic import atomic_write_text

    old_mask = os.umask(0o022)
    try:
        _, path = zeda_qwen3(tmp_path)
        atomic_write_text(tmp_path / "report.md", "saved\n")
    finally:
        os.umask(old_mask)
    assert path.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()} == dict.fromkeys(
        (p.name for p in path.iterdir()), 0o644
    )
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644


def test_umask_is_read_without_changing_it() -> None:
    import os

    from zeda_core.atomic import _umask

    old_mask = os.umask(0o027)
    try:
        assert _umask() == 0o027
        assert os.umask(0o027) == 0o027  # still in force
    finally:
        os.umask(old_mask)
