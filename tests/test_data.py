"""Local data: deterministic, split-safe, and with correct answers."""

import json
import re
from pathlib import Path

import pytest

from zeda_trainer.data import skills
from zeda_trainer.data.build import build_dataset
from zeda_trainer.data.packing import global_batch_rows, read_jsonl

from conftest import SMALL_SIZES


def test_same_seed_gives_identical_files(small_data: Path, tmp_path: Path) -> None:
    again = build_dataset(tmp_path / "again", seed=0, sizes=SMALL_SIZES)
    first = json.loads((small_data / "manifest.json").read_text())
    assert again["files"] == first["files"]
    for name in first["files"]:
        assert (tmp_path / "again" / name).read_bytes() == (small_data / name).read_bytes()


def test_other_seed_differs(small_data: Path, tmp_path: Path) -> None:
    other = build_dataset(tmp_path / "other", seed=1, sizes=SMALL_SIZES)
    first = json.loads((small_data / "manifest.json").read_text())
    assert other["files"]["skills/test.jsonl"]["sha256"] != first["files"]["skills/test.jsonl"]["sha256"]


def test_splits_never_overlap(small_data: Path) -> None:
    prompts = {
        s: {r["prompt"] for r in read_jsonl(small_data / "skills" / f"{s}.jsonl")}
        for s in ("train", "validation", "test")
    }
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    texts = {
        s: {r["text"] for r in read_jsonl(small_data / "text" / f"{s}.jsonl")} for s in ("train", "validation", "test")
    }
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    sft = {r["prompt"] for r in read_jsonl(small_data / "prompts" / "sft.jsonl")}
    opd = {r["prompt"] for r in read_jsonl(small_data / "prompts" / "opd.jsonl")}
    assert not sft & opd and not (sft | opd) & (prompts["test"] | prompts["validation"])


def test_every_skill_has_a_held_out_set(small_data: Path) -> None:
    test = read_jsonl(small_data / "skills" / "test.jsonl")
    counts = {name: sum(r["skill"] == name for r in test) for name in skills.SKILLS}
    assert counts == dict.fromkeys(skills.SKILLS, SMALL_SIZES.eval_per_skill)
    additions = [r for r in test if r["skill"] == "addition"]
    assert all(len(n) >= 2 for r in additions for n in re.findall(r"\d+", r["prompt"]))


def _check(row: dict) -> bool:
    prompt, answer = row["prompt"], row["answer"]
    if row["skill"] in ("addition", "subtraction", "multiplication"):
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", prompt).groups()
        return int(answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    items = prompt.split(": ", 1)[-1].split()
    if row["skill"] == "copy":
        return answer.split() == items
    if row["skill"] == "reverse":
        return answer.split() == items[::-1]
    if row["skill"] == "sort":
        return [int(x) for x in answer.split()] == sorted(int(x) for x in items)
    if row["skill"] == "brackets":
        return answer == ("yes" if skills._is_balanced(prompt.removeprefix("Balanced? ").split()) else "no")
    context, query = re.fullmatch(r"(.*)\. Value of (\w)\?", prompt).groups()
    return dict(pair.split("=") for pair in context.split())[query] == answer


def test_answers_are_correct(small_data: Path) -> None:
    rows = read_jsonl(small_data / "skills" / "train.jsonl")[::7] + read_jsonl(small_data / "skills" / "test.jsonl")
    assert all(_check(row) for row in rows)
    brackets = [r["answer"] for r in rows if r["skill"] == "brackets"]
    assert 0.3 < brackets.count("yes") / len(brackets) < 0.8


def test_existing_output_needs_overwrite(small_data: Path) -> None:
    from zeda_core import ZedaError

    with pytest.raises(ZedaError, match="already exists"):
        build_dataset(small_data, sizes=SMALL_SIZES)


def test_batch_order_is_a_function_of_the_step() -> None:
    first_epoch = [global_batch_rows(step, 4, 10, seed=0) for step in range(5)]  # 20 samples = 2 epochs of 10
    epoch_zero = [int(i) for rows in first_epoch[:2] for i in rows] + [int(i) for i in first_epoch[2][:2]]
    assert sorted(epoch_zero) == list(range(10))
    assert all(
        rows.tolist() == global_batch_rows(step, 4, 10, seed=0).tolist() for step, rows in enumerate(first_epoch)
    )
