"""``zeda tiny | convert | inspect`` end to end, and one clear line + exit 2 on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from zeda_cli.main import main


def zeda(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zeda_cli.main", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "teacher"
    assert main(["tiny", "--family", "qwen3_moe", "--out", str(path)]) == 0
    return path


def test_convert_and_inspect_end_to_end(teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "zeda"
    done = zeda("convert", "--model", str(teacher), "--zero-experts", "4", "--init", "gaussian", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "8 -> 12 rows per layer" in done.stdout and "+0 expert parameters" in done.stdout
    assert "r_ze@init" in done.stdout
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3MoePlusPlusForCausalLM"]
    assert (teacher / "generation_config.json").is_file() == (out / "generation_config.json").is_file()
    inspected = zeda("inspect", "--model", str(out), "--json")
    assert inspected.returncode == 0, inspected.stderr
    result = json.loads(inspected.stdout)
    assert result["routing"]["num_zero_experts"] == 4
    assert 0 < result["zero_expert_ratio"] < 1
    assert result["expert_flops"] + result["expert_flops_saved"] == result["dense_expert_flops"]


def test_preserve_init_reports_zero_ratio(teacher: Path, tmp_path: Path, capsys) -> None:
    args = ["convert", "--model", str(teacher), "--zero-experts", "4", "--init", "preserve", "--out"]
    assert main([*args, str(tmp_path / "preserve"), "--probe"]) == 0
    assert "r_ze@init  0.000" in capsys.readouterr().out
    assert main([*args, str(tmp_path / "unprobed")]) == 0  # the default never loads the model
    assert "r_ze@init  not measured (--probe)" in capsys.readouterr().out


def _plain(tmp_path: Path, name: str, model_type: str, **config) -> Path:
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).save_pretrained(tmp_path / name)
    return tmp_path / name


def _gate_rows_disagree(tmp_path: Path, teacher: Path) -> Path:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in teacher.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["num_local_experts"] = 10
    (broken / "config.json").write_text(json.dumps(config))
    return broken


TINY_LLAMA = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=64, intermediate_size=64)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("zero_z", "--zero-experts must be >= 1, got 0"),
        ("missing", "does not exist"),
        ("dense", "'llama' is not a supported MoE family"),
        ("unknown", "'mystery_moe' is not a supported MoE family"),
        ("exists", "already exists; pass --overwrite"),
        ("gate_rows", "the config implies"),
    ],
)
def test_convert_bad_input(case: str, message: str, teacher: Path, tmp_path: Path, capsys) -> None:
    model, z, out = str(teacher), "4", tmp_path / "out"
    if case == "zero_z":
        z = "0"
    elif case == "missing":
        model = str(tmp_path / "absent")
    elif case == "dense":
        model = str(_plain(tmp_path, "llama", "llama", **TINY_LLAMA))
    elif case == "unknown":
        unknown = _plain(tmp_path, "unknown", "llama", **TINY_LLAMA)
        config = json.loads((unknown / "config.json").read_text())
        (unknown / "config.json").write_text(json.dumps({**config, "model_type": "mystery_moe"}))
        model = str(unknown)
    elif case == "exists":
        out.mkdir()
    elif case == "gate_rows":
        model = str(_gate_rows_disagree(tmp_path, teacher))
    capsys.readouterr()  # drop what setting up the case printed
    code = main(["convert", "--model", model, "--zero-experts", z, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("zeda convert: error:") and message in err[0]
    if case != "exists":
        assert not out.exists()
    else:
        assert list(out.iterdir()) == []


def test_argparse_errors_exit_2(teacher: Path) -> None:
    done = zeda("convert", "--model", str(teacher), "--zero-experts", "4", "--init", "uniform", "--out", "x")
    assert done.returncode == 2 and "invalid choice: 'uniform'" in done.stderr


def test_inspect_bad_input(teacher: Path, tmp_path: Path, capsys) -> None:
    assert main(["inspect", "--model", str(teacher), "--tokens", "0"]) == 2
    assert "--tokens must be >= 1" in capsys.readouterr().err
    assert main(["inspect", "--model", str(teacher), "--text", str(tmp_path / "none.txt")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_convert_counts_moe_layers_not_layers_with_an_index(tmp_path: Path, capsys) -> None:
    """DeepSeek-V3's first layer is dense (``first_k_dense_replace=1``): 3 decoder layers, 2 of them MoE."""
    teacher, out = tmp_path / "deepseek", tmp_path / "zeda"
    assert main(["tiny", "--family", "deepseek_v3", "--out", str(teacher)]) == 0
    capsys.readouterr()
    assert main(["convert", "--model", str(teacher), "--zero-experts", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "deepseek_v3: 2 MoE layers" in printed
    assert "+256 router parameters" in printed  # 2 layers x 4 zero rows x hidden 32
