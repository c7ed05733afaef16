"""Streaming conversion of sharded safetensors checkpoints (``zeda convert``).

A tiny Qwen3-MoE saved by transformers (per-expert keys, 4 shards) and a tiny DeepSeek-V3 saved by
``save_model`` (fused experts, sigmoid + selection bias, sharded) are converted tensor by tensor. The
new rows must be exactly those of the in-memory ``inject_zero_experts``; nothing is written on bad
input or when the writer dies.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from zeda_core import FAMILIES, ZedaError, inject_zero_experts, load_model, save_model
from zeda_core import convert_stream as convert_stream_module
from zeda_core.checkpoint import resolve_checkpoint
from zeda_core.convert import sparse_blocks
from zeda_core.convert_stream import convert_checkpoint

from family_checks import tiny_model, token_batch

Z = 4
LAYERS = 4
INDEX = "model.safetensors.index.json"
KILL_AFTER_FIRST_SHARD = """
import os, signal, sys
from pathlib import Path
from zeda_core import convert_stream

write = convert_stream._write_shard

def write_then_die(*args):
    write(*args)
    os.kill(os.getpid(), signal.SIGKILL)

convert_stream._write_shard = write_then_die
convert_stream.convert_checkpoint(Path(sys.argv[1]), sys.argv[2], 4)
"""


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch()).logits


def shard_names(path: Path) -> list[str]:
    return sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))


def shard_of(path: Path, key: str) -> Path:
    return path / json.loads((path / INDEX).read_text())["weight_map"][key]


@pytest.fixture(scope="module")
def qwen_source(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE (4 MoE layers, 16 experts, about 2 MB) saved by transformers: per-expert keys, 4 shards."""
    family = FAMILIES["qwen3_moe"]
    torch.manual_seed(0)
    config = family.tiny_config(hidden_size=64, num_hidden_layers=LAYERS, num_experts=16, vocab_size=512)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for _, _, block in sparse_blocks(model, family):
            block.gate.weight.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("qwen") / "source"
    model.save_pretrained(path, max_shard_size="600KB")
    assert len(shard_names(path)) >= 3
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in json.loads((path / INDEX).read_text())["weight_map"]
    return path


@pytest.fixture(scope="module")
def reversed_source(qwen_source: Path, tmp_path_factory) -> Path:
    """The Qwen source resharded so that the shard names sort opposite to the layer order."""
    path = tmp_path_factory.mktemp("reversed") / "source"
    shutil.copytree(qwen_source, path, ignore=shutil.ignore_patterns("*.safetensors", INDEX))
    state = {k: v for shard in shard_names(qwen_source) for k, v in load_file(qwen_source / shard).items()}
    weight_map = {}
    for key in state:
        layer = int(key.split(".")[2]) if key.startswith("model.layers.") else -1
        weight_map[key] = f"model-{LAYERS - layer:05d}.safetensors"  # layer 3 -> model-00001, other keys last
    for shard in set(weight_map.values()):
        save_file({k: state[k] for k, s in weight_map.items() if s == shard}, path / shard, metadata={"format": "pt"})
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert shard_of(path, "model.layers.3.mlp.gate.weight").name < shard_of(path, "model.layers.0.mlp.gate.weight").name
    return path


@pytest.fixture(scope="module")
def deepseek_source(tmp_path_factory) -> Path:
    """A tiny DeepSeek-V3 (sigmoid, selection bias, first layer dense) in ZEDA's fused layout, sharded."""
    path = save_model(tiny_model("deepseek_v3"), tmp_path_factory.mktemp("deepseek") / "source", max_shard_size="60KB")
    assert len(shard_names(path)) >= 2
    return path


def test_per_expert_shards_convert_in_their_layout(qwen_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "zeda"
    done = convert_checkpoint(qwen_source, out, Z, init="preserve")
    assert (done.moe_layers, done.spec.num_rows, done.hidden_size) == (LAYERS, 16 + Z, 64)
    assert shard_names(out) == shard_names(qwen_source)
    weight_map = json.loads((out / INDEX).read_text())["weight_map"]
    assert "model.layers.2.mlp.experts.15.down_proj.weight" in weight_map
    assert not any(key.endswith("gate_up_proj") for key in weight_map)
    with safe_open(shard_of(out, "model.layers.1.mlp.gate.weight"), framework="pt") as handle:
        assert handle.get_tensor("model.layers.1.mlp.gate.weight").shape == (16 + Z, 64)
        assert handle.get_tensor("model.layers.1.mlp.gate.zero_logit_bias").tolist() == [-30.0] * Z
    assert (out / "generation_config.json").is_file()
    in_memory = load_model(qwen_source, zero_aware=False)
    inject_zero_experts(in_memory, Z, init="preserve")
    reference = save_model(in_memory, tmp_path / "in-memory")
    assert json.loads((out / "config.json").read_text()) == json.loads((reference / "config.json").read_text())
    converted = load_model(out)
    torch.testing.assert_close(logits(converted), logits(load_model(qwen_source, zero_aware=False)), rtol=0, atol=1e-5)


def test_gaussian_rows_are_the_in_memory_rule_in_layer_order(reversed_source: Path, tmp_path: Path) -> None:
    convert_checkpoint(reversed_source, tmp_path / "zeda", Z, init="gaussian", seed=7)
    reference = load_model(reversed_source, zero_aware=False)
    inject_zero_experts(reference, Z, init="gaussian", seed=7)
    expected, got = reference.state_dict(), load_model(tmp_path / "zeda").state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[key], expected[key]) for key in expected)


@pytest.mark.parametrize("init", ["preserve", "gaussian"])
def test_sigmoid_family_widens_its_selection_bias(init: str, deepseek_source: Path, tmp_path: Path) -> None:
    done = convert_checkpoint(deepseek_source, tmp_path / "zeda", Z, init=init, seed=3)
    assert done.moe_layers == 2 and done.spec.selection_bias and not done.spec.zero_logit_bias
    key = "model.layers.1.mlp.gate.e_score_correction_bias"
    with safe_open(shard_of(tmp_path / "zeda", key), framework="pt") as handle:
        bias = handle.get_tensor(key)
    assert bias.shape == (8 + Z,) and bias.dtype == torch.float32
    source = load_model(deepseek_source, zero_aware=False)
    converted = load_model(tmp_path / "zeda")
    if init == "preserve":
        torch.testing.assert_close(logits(converted), logits(source), rtol=0, atol=1e-5)
        assert torch.all(bias[8:] == bias[:8].min() - 2.0)
    else:
        inject_zero_experts(source, Z, init="gaussian", seed=3)
        expected = source.state_dict()
        assert all(torch.equal(tensor, expected[k]) for k, tensor in converted.state_dict().items())


def test_legacy_key_names_stay_legacy(tmp_path: Path) -> None:
    """Mixtral as transformers saves it (``block_sparse_moe.experts.{e}.w1``): the family's renames find the router."""
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "source", max_shard_size="60KB")
    convert_checkpoint(tmp_path / "source", tmp_path / "zeda", Z, init="preserve")
    weight_map = json.loads((tmp_path / "zeda" / INDEX).read_text())["weight_map"]
    assert "model.layers.1.block_sparse_moe.gate.zero_logit_bias" in weight_map
    assert "model.layers.1.block_sparse_moe.experts.7.w3.weight" in weight_map
    torch.testing.assert_close(logits(load_model(tmp_path / "zeda")), logits(model), rtol=0, atol=1e-5)


def test_dtype_casts_like_loading_in_that_dtype(qwen_source: Path, tmp_path: Path) -> None:
    convert_checkpoint(qwen_source, tmp_path / "zeda", Z, init="gaussian", dtype=torch.bfloat16)
    reference = load_model(qwen_source, dtype=torch.bfloat16, zero_aware=False)
    inject_zero_experts(reference, Z, init="gaussian")
    expected, got = reference.state_dict(), load_model(tmp_path / "zeda").state_dict()
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], expected[k]) for k in expected)
    assert json.loads((tmp_path / "zeda" / "config.json").read_text())["dtype"] == "bfloat16"


def test_writer_error_leaves_no_output(qwen_source: Path, tmp_path: Path, monkeypatch) -> None:
    write = convert_stream_module._write_shard

    def write_one_then_fail(*args) -> None:
        write(*args)
        raise OSError("disk full")

    monkeypatch.setattr(convert_stream_module, "_write_shard", write_one_then_fail)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(qwen_source, tmp_path / "out" / "zeda", Z)
    assert list((tmp_path / "out").iterdir()) == []


def test_killed_midway_leaves_no_valid_output(qwen_source: Path, tmp_path: Path) -> None:
    script = tmp_path / "kill.py"
    script.write_text(KILL_AFTER_FIRST_SHARD)
    parent = tmp_path / "out"
    done = subprocess.run([sys.executable, script, qwen_source, parent / "zeda"], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    left = list(parent.iterdir())
    assert [p.name for p in left if not p.name.startswith(".zeda.tmp-")] == []
    assert left and all(any(p.glob("*.safetensors")) for p in left)  # it died midway, after a shard
    for partial in left:
        with pytest.raises(ZedaError, match=r"no config\.json"):
            resolve_checkpoint(partial)


def _missing_shard(source: Path) -> Path:
    shard = shard_of(source, "model.layers.2.mlp.gate.weight")
    shard.unlink()
    return shard


def _truncated_shard(source: Path) -> Path:
    shard = shard_of(source, "model.layers.3.mlp.gate.weight")
    shard.write_bytes(shard.read_bytes()[:-100])
    return shard


def _gate_of_wrong_shape(source: Path) -> Path:
    key = "model.layers.1.mlp.gate.weight"
    shard = shard_of(source, key)
    state = load_file(shard)
    state[key] = state[key][:-1].clone()
    save_file(state, shard, metadata={"format": "pt"})
    return shard


def _dense(source: Path) -> Path:
    config = json.loads((source / "config.json").read_text())
    config["mlp_only_layers"] = list(range(LAYERS))
    (source / "config.json").write_text(json.dumps(config))
    return source / "config.json"


def _already_zeda(source: Path) -> Path:
    converted = source.parent / "converted"
    convert_checkpoint(source, converted, Z)
    shutil.rmtree(source)
    converted.rename(source)
    return source / "config.json"


BAD_INPUTS = {
    "missing_shard": (_missing_shard, "does not exist"),
    "truncated_shard": (_truncated_shard, "cannot read weights"),
    "gate_shape": (_gate_of_wrong_shape, "has shape [15, 64], the config implies [16, 64]"),
    "dense": (_dense, "has no MoE layer to convert"),
    "already_zeda": (_already_zeda, "already a ZEDA checkpoint with 4 zero experts"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_the_file_and_writes_nothing(case: str, qwen_source: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(qwen_source, source)
    breaker, message = BAD_INPUTS[case]
    bad_file = breaker(source)
    with pytest.raises(ZedaError) as raised:
        convert_checkpoint(source, tmp_path / "out" / "zeda", Z)
    assert str(bad_file) in str(raised.value) and message in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_missing_shard_in_one_line(qwen_source: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(qwen_source, source)
    shard = _missing_shard(source)
    out = tmp_path / "zeda"
    command = [sys.executable, "-m", "zeda_cli.main", "convert", "--model", str(source), "--zero-experts", "4"]
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2
    assert err == [f"zeda convert: error: {source / INDEX} lists {shard}, which does not exist"]
    assert not out.exists()
