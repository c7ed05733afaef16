"""Tokenizer, reduced teacher pretraining (resume included), generation and ``zeda eval`` end to end."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from processes import assert_resumed_exactly, logged_up_to
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from zeda_cli.main import main
from zeda_core import ZedaError, load_model
from zeda_trainer.common.generation import generate
from zeda_trainer.common.prompts import prompt_ids
from zeda_trainer.data.tokenizer import chat_text
from zeda_trainer.measure.evaluate import load_eval_set
from zeda_trainer.stages.pretrain import pretrain

from conftest import small_teacher_config


def test_tokenizer_round_trip(small_teacher: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(small_teacher)
    ids = tokenizer("What is 123 + 45?").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert [tokenizer.decode([i]) for i in ids if tokenizer.decode([i]).isdigit()] == list("12345")
    templated = prompt_ids(tokenizer, "Copy: a b")
    assert templated == tokenizer(chat_text("Copy: a b")).input_ids
    assert tokenizer.decode(templated, skip_special_tokens=True) == "Copy: a b"


def test_teacher_checkpoint_and_training_record(small_teacher: Path) -> None:
    record = json.loads((small_teacher / "training.json").read_text())
    assert record["parameters"] > record["active_parameters"] > 0
    assert record["final"]["step"] == 60
    config = json.loads((small_teacher / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["output_router_logits"] is False
    run_dir = small_teacher.parent / "run"
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 1.0
    assert (run_dir / "curves.png").stat().st_size > 0


def test_resume_continues_exactly(small_data: Path, small_teacher: Path, tmp_path: Path) -> None:
    """Killed right after the step-30 checkpoint: resuming gives the uninterrupted run's weights."""
    run = tmp_path / "run"
    shutil.copytree(small_teacher.parent / "run", run)
    shutil.rmtree(run / "checkpoints" / "step-00000060")
    logged_before_kill = logged_up_to(run, 30)
    config = small_teacher_config(small_data, run, tmp_path / "resumed")
    pretrain(config, resume=True)
    resumed, uninterrupted = (
        load_file(tmp_path / "resumed" / "model.safetensors"),
        load_file(small_teacher / "model.safetensors"),
    )
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 60
    # Steps 1-30 come from the checkpoint: a run from step 0 would rewrite their records (wall-clock throughput).
    assert_resumed_exactly(logged_before_kill, run, list(range(10, 61, 10)))


def test_batched_generation_equals_one_by_one(small_teacher: Path) -> None:
    model = load_model(small_teacher)
    tokenizer = AutoTokenizer.from_pretrained(small_teacher)
    prompts = [prompt_ids(tokenizer, p) for p in ("Copy: a b c", "What is 12 + 7?", "Sort: 9 3 5 1 22", "Reverse: q w")]
    args = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    together = generate(model, prompts, 12, batch_size=4, **args)
    for prompt, joint in zip(prompts, together, strict=True):
        (alone,) = generate(model, [prompt], 12, batch_size=1, **args)
        assert alone.tokens == joint.tokens
        assert torch.equal(alone.slot_counts, joint.slot_counts)
        assert alone.processed_tokens == joint.processed_tokens
        fed_back = len(joint.tokens) - 1
        assert joint.processed_tokens == len(prompt) + fed_back
        assert joint.slot_counts.sum(-1).tolist() == [joint.processed_tokens * 2] * 2  # K=2, 2 layers


def test_eval_json_schema(small_teacher: Path, small_data: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "doc.txt"
    text.write_text("def add(a, b):\n    return a + b\n")
    code = main(
        [
            "eval",
            "--model",
            str(small_teacher),
            "--data",
            str(small_data),
            "--limit",
            "4",
            "--json",
            "--text",
            str(text),
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["skills"]) == {
        "addition",
        "subtraction",
        "multiplication",
        "copy",
        "reverse",
        "sort",
        "brackets",
        "recall",
    }
    assert all(0.0 <= s["accuracy"] <= 1.0 and s["n"] == 4 for s in result["skills"].values())
    assert result["perplexity"]["validation"] > 1 and result["perplexity"]["text"] > 1
    assert result["zero_expert_ratio"] == 0.0  # a teacher has no zero experts
    assert result["expert_flops_per_token"] == result["dense_expert_flops_per_token"] > 0


def test_eval_of_a_zeda_model_reports_savings(small_teacher: Path, small_data: Path, tmp_path: Path, capsys) -> None:
    assert main(["convert", "--model", str(small_teacher), "--zero-experts", "4", "--out", str(tmp_path / "z")]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "z"), "--data", str(small_data), "--limit", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 < result["zero_expert_ratio"] < 1.0
    assert result["expert_flops_per_token"] < result["dense_expert_flops_per_token"]
    domains = result["routing"]["domains"]
    assert {"code", "prose", "addition"} <= set(domains)
    dialled = ["eval", "--model", str(tmp_path / "z"), "--data", str(small_data), "--limit", "3", "--json"]
    assert main([*dialled, "--zero-expert-bias", "-40"]) == 0  # the compute dial closed: no zero slot
    closed = json.loads(capsys.readouterr().out)
    assert closed["zero_expert_bias"] == -40.0 and closed["zero_expert_ratio"] == 0.0
    assert closed["expert_flops_per_token"] == closed["dense_expert_flops_per_token"]


def test_eval_of_a_dense_model(small_teacher: Path, small_data: Path, tmp_path: Path, capsys) -> None:
    dense = tmp_path / "dense"
    config = AutoConfig.for_model(
        "llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=384
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(dense)
    AutoTokenizer.from_pretrained(small_teacher).save_pretrained(dense)
    assert (
        main(
            [
                "eval",
                "--model",
                str(dense),
                "--data",
                str(small_data),
                "--limit",
                "2",
                "--json",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["zero_expert_ratio"] is None and result["expert_flops_per_token"] is None
    assert result["skills"]["copy"]["n"] == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a", "answer": "b"}\n{"prompt": "c"\n', ":2: invalid JSON"),
        ('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c"}\n', ":3: missing or non-string field 'answer'"),
        ('{"prompt": "a", "answer": "b", "scorer": "fuzzy"}\n', ":1: scorer must be one of exact, regex"),
        ('{"prompt": "a", "answer": "(", "scorer": "regex"}\n', ":1: answer is not a valid regex"),
        ("[1, 2]\n", ":1: each line must be a JSON object"),
        ("\n", " has no records"),
    ],
)
def test_bad_eval_set_names_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bench.jsonl"
    path.write_text(content)
    with pytest.raises(ZedaError, match=re.escape("bench.jsonl" + message)):
        load_eval_set(path)


def test_user_eval_set_with_regex_scorer(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "x", "answer": "4[0-9]", "scorer": "regex"}\n{"prompt": "y", "answer": "ok"}\n')
    regex, exact = load_eval_set(path)
    assert regex.correct(" 42 ") and not regex.correct("420")
    assert exact.correct("ok\n") and not exact.correct("okay") and exact.skill == "mine"


def test_eval_cli_bad_input(small_teacher: Path, small_data: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert main(["eval", "--model", str(small_teacher), "--data", str(small_data), "--eval-set", str(bad)]) == 2
    assert f"{bad}:1: invalid JSON" in capsys.readouterr().err
    assert main(["eval", "--model", str(small_teacher), "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err
    for bad_bias in ("nan", "1e9"):
        assert main(["eval", "--model", str(small_teacher), "--zero-expert-bias", bad_bias]) == 2
        assert f"--zero-expert-bias must be a finite number within ±100 logits, got {float(bad_bias)}" in (
            capsys.readouterr().err
        )


def test_bad_recipe_is_refused(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim:\n  max_steps: 10\nshape:\n  hidden_size: 32\n")
    assert main(["train", "teacher", "--config", str(recipe), "--set", "shape.hiden_size=3"]) == 2
    assert "shape.hiden_size: Extra inputs are not permitted" in capsys.readouterr().err
    assert main(["train", "teacher", "--config", str(recipe), "--set", "optim.max_steps=many"]) == 2
    assert "optim.max_steps: Input should be a valid integer" in capsys.readouterr().err
    assert main(["train", "teacher", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
