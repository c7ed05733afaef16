"""Stage 1: cached teacher rollouts and SFT of the zero-expert student."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from zeda_cli.main import main
from zeda_core import ZedaError, load_model
from zeda_trainer.common.group_loss import GroupLossConfig
from zeda_trainer.common.loop import OptimConfig
from zeda_trainer.common.prompts import load_prompts
from zeda_trainer.stages.rollouts import RolloutConfig, teacher_rollouts
from zeda_trainer.stages.sft import SftConfig, build_student, collate, length_chunks, sft_loss, train_sft


def test_rollouts_are_cached_deduplicated_and_resumable(small_teacher: Path, small_data: Path, tmp_path: Path) -> None:
    source = small_data / "prompts" / "sft.jsonl"
    lines = source.read_text().splitlines()[:6]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("\n".join([*lines, lines[0]]) + "\n")  # a duplicate prompt
    prompts = load_prompts(prompts_file)
    assert len(prompts) == 6
    teacher, tokenizer = load_model(small_teacher), AutoTokenizer.from_pretrained(small_teacher)
    config = RolloutConfig(max_new_tokens=8, batch_size=4)
    cache = tmp_path / "rollouts.jsonl"
    first = teacher_rollouts(teacher, tokenizer, prompts, cache, config)
    assert [r["prompt"] for r in first] == [p.text for p in prompts]
    assert all(0 < len(r["completion_ids"]) <= 8 for r in first)
    kept = cache.read_text().splitlines()[:3]
    cache.write_text("\n".join(kept) + '\n{"prompt": "torn')  # killed mid-write
    again = teacher_rollouts(teacher, tokenizer, prompts, cache, config)
    assert again == first
    assert len(cache.read_text().splitlines()) == 6


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{bad\n", ":1: invalid JSON"),
        ('{"prompt": ""}\n', ":1: needs a non-empty string field 'prompt'"),
        ("\n", "has no prompts"),
    ],
)
def test_bad_prompt_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ZedaError, match=message):
        load_prompts(path)


def test_padding_changes_neither_loss_nor_ratio(small_teacher: Path) -> None:
    config = SftConfig(teacher=small_teacher, zero_experts=4)
    student, num_experts = build_student(config)
    records = [
        {"prompt_ids": [1, 4, 30, 31, 2, 5], "completion_ids": [40, 41, 2]},
        {"prompt_ids": [1, 4, 32, 2, 5], "completion_ids": [42, 2]},
    ]
    tight = collate(records, pad_id=0, device=torch.device("cpu"))
    padded = {k: torch.nn.functional.pad(v, (0, 7), value=-100 if k == "labels" else 0) for k, v in tight.items()}
    teacher = load_model(small_teacher)
    for kl_tokens in ("completion", "all"):
        group_loss = GroupLossConfig(per_sequence=kl_tokens == "all")
        terms = SftConfig(kl_weight=1.0, kl_tokens=kl_tokens, hidden_weight=1.0, group_loss=group_loss)
        with torch.no_grad():
            loss_tight, metrics_tight = sft_loss(student, tight, num_experts, terms, teacher)
            loss_padded, metrics_padded = sft_loss(student, padded, num_experts, terms, teacher)
        torch.testing.assert_close(loss_padded, loss_tight, rtol=1e-6, atol=1e-6)
        assert metrics_padded == pytest.approx(metrics_tight, rel=1e-6, abs=1e-6)


def test_per_sequence_group_loss_is_the_mean_over_rows(small_teacher: Path) -> None:
    config = SftConfig(teacher=small_teacher, zero_experts=4, group_loss=GroupLossConfig(alpha=1.0, per_sequence=True))
    student, num_experts = build_student(config)
    records = [
        {"prompt_ids": [1, 4, 30, 31, 2, 5], "completion_ids": [40, 41, 2]},
        {"prompt_ids": [1, 4, 32, 2, 5, 9, 9, 9, 9], "completion_ids": [42, 2]},
    ]
    batch = collate(records, pad_id=0, device=torch.device("cpu"))
    with torch.no_grad():
        _, metrics = sft_loss(student, batch, num_experts, config)
        rows = [sft_loss(student, collate([r], 0, torch.device("cpu")), num_experts, config)[1] for r in records]
        _, batch_wide = sft_loss(
            student, batch, num_experts, config.model_copy(update={"group_loss": GroupLossConfig(alpha=1.0)})
        )
    assert metrics["l_ga"] == pytest.approx((rows[0]["l_ga"] + rows[1]["l_ga"]) / 2, rel=1e-5)
    assert metrics["l_ga"] != pytest.approx(batch_wide["l_ga"], rel=1e-4)
    pooled_config = config.model_copy(update={"group_loss": GroupLossConfig(alpha=1.0, pool_layers=True)})
    with torch.no_grad():
        _, pooled = sft_loss(student, batch, num_experts, pooled_config)
    assert pooled["l_ga"] != pytest.approx(batch_wide["l_ga"], rel=1e-4)


def test_length_chunks_group_rows_of_similar_length() -> None:
    lengths = torch.tensor([128, 20, 0, 25, 50, 128, 9, 41])
    chunks = [chunk.tolist() for chunk in length_chunks(lengths)]
    assert chunks == [[6], [1, 3], [7, 4], [0, 5]]  # 9 | 20, 25 | 41, 50 | 128, 128; the empty row left out
    assert [chunk.tolist() for chunk in length_chunks(lengths, max_chunks=1)] == [[6, 1, 3, 7, 4, 0, 5]]
    with pytest.raises(ZedaError, match="no real tokens"):
        length_chunks(torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize(("per_sequence", "pool_layers"), [(False, False), (True, False), (True, True)])
def test_length_chunked_loss_equals_one_forward(small_teacher: Path, per_sequence: bool, pool_layers: bool) -> None:
    """Rows of very different lengths run in several groups; loss, metrics and gradients are the
    ones of the whole batch in a single forward (also with L_GA per sequence, or over pooled layers)."""
    config = SftConfig(
        teacher=small_teacher,
        zero_experts=4,
        kl_weight=1.0,
        kl_tokens="all",
        hidden_weight=0.5,
        allocation_weight=1.0,
        group_loss=GroupLossConfig(per_sequence=per_sequence, pool_layers=pool_layers),
    )
    student, num_experts = build_student(config)
    teacher = load_model(small_teacher)
    generator = torch.Generator().manual_seed(0)
    records = [
        {"prompt_ids": torch.randint(3, 60, (n,), generator=generator).tolist(), "completion_ids": [40, 41, 2]}
        for n in (3, 5, 14, 30, 4, 61)
    ]
    batch = collate(records, pad_id=0, device=torch.device("cpu"))
    batch["group_mask"] = batch["attention_mask"].clone()
    batch["group_mask"][-1] = 0  # a text row: in every loss but L_GA
    assert len(length_chunks(batch["attention_mask"].sum(dim=1))) == 3  # 6-8 | 17, 33 | 64 tokens
    results = []
    for max_chunks in (1, 8):
        student.zero_grad()
        loss, metrics = sft_loss(student, batch, num_experts, config, teacher, max_chunks=max_chunks)
        loss.backward()
        results.append((loss.detach(), metrics, [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    (one_loss, one_metrics, one_grads), (loss, metrics, grads) = results
    torch.testing.assert_close(loss, one_loss, rtol=1e-5, atol=1e-6)
    assert metrics == pytest.approx(one_metrics, rel=1e-5, abs=1e-6)
    assert len(grads) == len(one_grads)
    for grad, one_grad in zip(grads, one_grads, strict=True):
        torch.testing.assert_close(grad, one_grad, rtol=1e-4, atol=1e-5)  # summation order differs by CPU kernel


def test_left_padded_batch_is_refused(small_teacher: Path) -> None:
    student, num_experts = build_student(SftConfig(teacher=small_teacher, zero_experts=4))
    batch = collate([{"prompt_ids": [1, 4, 30], "completion_ids": [40, 2]}], 0, torch.device("cpu"))
    batch = {key: torch.nn.functional.pad(value, (2, 0)) for key, value in batch.items()}
    with pytest.raises(ZedaError, match="right-padded"):
        sft_loss(student, batch, num_experts, SftConfig())


def test_preserve_student_matches_the_teacher_exactly(small_teacher: Path) -> None:
    student, num_experts = build_student(SftConfig(teacher=small_teacher, zero_experts=4, init="preserve"))
    gaussian, _ = build_student(SftConfig(teacher=small_teacher, zero_experts=4))
    teacher = load_model(small_teacher)
    batch = collate([{"prompt_ids": [1, 4, 30, 31, 2, 5], "completion_ids": [40, 41, 2]}], 0, torch.device("cpu"))
    with torch.no_grad():
        terms = SftConfig(kl_weight=1.0, kl_tokens="all", hidden_weight=1.0)
        same = sft_loss(student, batch, num_experts, terms, teacher)[1]
        moved = sft_loss(gaussian, batch, num_experts, terms, teacher)[1]
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["hidden"] == pytest.approx(0.0, abs=1e-8)
    assert moved["hidden"] > 1e-4 and moved["kl"] > 1e-4


def test_kl_tokens_all_covers_prompt_positions(small_teacher: Path) -> None:
    student, num_experts = build_student(SftConfig(teacher=small_teacher, zero_experts=4))
    teacher = load_model(small_teacher)
    records = [{"prompt_ids": [1, 4, 30, 31, 2, 5], "completion_ids": [40, 41, 2]}]
    batch = collate(records, pad_id=0, device=torch.device("cpu"))
    with torch.no_grad():
        kl = {
            tokens: sft_loss(student, batch, num_experts, SftConfig(kl_weight=1.0, kl_tokens=tokens), teacher)[1]["kl"]
            for tokens in ("completion", "all")
        }
        student_lp = student(input_ids=batch["input_ids"]).logits[0, :-1].float().log_softmax(-1)
        teacher_lp = teacher(input_ids=batch["input_ids"]).logits[0, :-1].float().log_softmax(-1)
    per_position = (teacher_lp.exp() * (teacher_lp - student_lp)).sum(-1)  # 8 positions predict a next token
    assert kl["all"] == pytest.approx(per_position.mean().item(), rel=1e-4)
    assert kl["completion"] == pytest.approx(per_position[5:].mean().item(), rel=1e-4)


def test_router_only_mode_freezes_experts(small_teacher: Path) -> None:
    student, _ = build_student(SftConfig(teacher=small_teacher, zero_experts=4, trainable="router"))
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp.gate." in name for name in trainable)


def test_sft_end_to_end(small_teacher: Path, small_data: Path, tmp_path: Path) -> None:
    config = SftConfig(
        teacher=small_teacher,
        prompts=small_data / "prompts" / "sft.jsonl",
        run_dir=tmp_path / "run",
        out=tmp_path / "student",
        zero_experts=4,
        rollout=RolloutConfig(max_new_tokens=12, batch_size=32),
        batch_size=8,
        kl_weight=0.5,
        optim=OptimConfig(max_steps=12, lr=1e-3, warmup_steps=2, log_every=4, checkpoint_every=6),
    )
    out = train_sft(config)
    student = load_model(out)
    assert student.config.zce_nums == [4]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    assert all({"nll", "l_ga", "r_ze", "kl", "r_ze_layer0", "tokens_per_s"} <= set(r) for r in records)
    assert all(0.0 <= r["r_ze"] <= 1.0 for r in records)
    summary = json.loads((out / "training.json").read_text())
    assert summary["target_zero_ratio"] == 0.5 and summary["stage"] == "sft"
    assert (tmp_path / "run" / "curves.png").is_file()


def test_sft_cli_bad_teacher(tmp_path: Path, capsys) -> None:
    assert (
        main(
            [
                "train",
                "sft",
                "--config",
                "trainer/configs/tiny-sft.yaml",
                "--set",
                f"teacher={tmp_path / 'x'}",
                "--set",
                f"run_dir={tmp_path / 'run'}",
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
