"""Stage 2: on-policy distillation (PPO clip, routing replay, teacher scoring) and kill -9 resume."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from processes import assert_resumed_exactly, kill_9_once_written, logged_up_to
from safetensors.torch import load_file
from torch.nn.functional import pad
from transformers import AutoTokenizer

from zeda_core import ZedaError, load_model
from zeda_trainer.common.generation import generate
from zeda_trainer.common.prompts import encode_prompt, load_prompts
from zeda_trainer.common.teacher import LocalTeacher
from zeda_trainer.stages.opd import OpdConfig, build_batch, clipped_policy_loss, opd_loss, policy_forward


def test_clipped_policy_loss_on_hand_values() -> None:
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]]))
    advantages = torch.tensor([[1.0, 1.0, -1.0, -2.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, clipped = clipped_policy_loss(new, old, advantages, mask, eps=0.2)
    # min(r*A, clip(r)*A): 1.0, min(1.5, 1.2) = 1.2, min(-0.5, -0.8) = -0.8; the masked token drops out.
    assert loss.item() == pytest.approx(-(1.0 + 1.2 - 0.8) / 3)
    assert clipped.item() == pytest.approx(2 / 3)


def _sampled_batch(student_path: Path, prompts_file: Path, count: int, replay: bool, teacher: Path | None = None):
    """The student's samples of the first ``count`` prompts as an on-policy batch, scored by
    ``teacher`` (a checkpoint) or, without one, a constant -1 per token."""
    student = load_model(student_path)
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    prompts = [encode_prompt(tokenizer, p) for p in load_prompts(prompts_file)[:count]]
    generations = generate(
        student,
        prompts,
        10,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
        record_routes=replay,
    )
    if teacher is None:
        teacher_scores = [[-1.0] * len(g.tokens) for g in generations]
    else:
        sequences = [p + g.tokens for p, g in zip(prompts, generations, strict=True)]
        teacher_scores = LocalTeacher(str(teacher), torch.device("cpu")).score(sequences, [len(p) for p in prompts])
    num_rows = student.config.num_experts + 4
    batch = build_batch(prompts, generations, teacher_scores, tokenizer.pad_token_id, num_rows, torch.device("cpu"))
    return student, prompts, generations, batch


def test_routing_replay_reuses_the_sampled_routes(small_student: Path, small_data: Path) -> None:
    student, prompts, generations, batch = _sampled_batch(small_student, small_data / "prompts" / "opd.jsonl", 6, True)
    assert batch.replay and all(ids.shape[:2] == batch.input_ids.shape for ids in batch.replay.values())
    for gen, prompt in zip(generations, prompts, strict=True):
        assert gen.processed_tokens == len(prompt) + len(gen.tokens) - 1
        assert all(ids.shape[0] == gen.processed_tokens for ids in gen.routes.values())
    # A replayed forward runs exactly the routes recorded while sampling, every token of every row.
    with torch.no_grad():
        _, replayed_routes = policy_forward(student, batch, keep_probs=False)
    assert sorted(layer.layer_idx for layer in replayed_routes.layers) == sorted(generations[0].routes)
    for layer in replayed_routes.layers:
        for row, gen in enumerate(generations):
            taken = layer.topk_ids[row, : gen.processed_tokens]
            assert torch.equal(taken, gen.routes[layer.layer_idx]), (layer.layer_idx, row)
    # The routes taken while decoding are the ones a full forward picks: a token may differ only where
    # the K-th and (K+1)-th routing probabilities tie to float precision.
    with torch.no_grad():
        _, free = policy_forward(student, replace(batch, replay={}), keep_probs=True)
    mask = batch.routed_mask
    for layer in free.layers:
        same = (layer.topk_ids.sort(-1).values == batch.replay[layer.layer_idx].sort(-1).values).all(-1)
        k = layer.topk_ids.shape[-1]
        top = layer.probs.topk(k + 1, dim=-1).values
        tie = top[..., k - 1] - top[..., k] < 1e-5
        assert (same | tie)[mask].all(), f"layer {layer.layer_idx}: {int((~same & ~tie)[mask].sum())} routes differ"
        assert same[mask].float().mean() > 0.97
    # Replay is really forced: routing every token to zero slots changes the log-probs.
    forced = {i: torch.full_like(ids, ids.max().item()) for i, ids in batch.replay.items()}
    with torch.no_grad():
        replayed, _ = policy_forward(student, batch, keep_probs=False)
        all_zero, recorder = policy_forward(student, replace(batch, replay=forced), False)
    assert not torch.allclose(replayed[batch.completion_mask], all_zero[batch.completion_mask])
    counts = recorder.slot_counts().sum(dim=(0, 1))
    assert counts[0] == 0 and counts[1] > 0


def test_opd_padding_changes_neither_loss_nor_ratio(small_student: Path, small_data: Path) -> None:
    student, _, _, batch = _sampled_batch(small_student, small_data / "prompts" / "opd.jsonl", 4, True)
    with torch.no_grad():
        batch.old_logprobs = policy_forward(student, batch, keep_probs=False)[0]
    extra = 5
    padded = batch.__class__(
        input_ids=pad(batch.input_ids, (0, extra)),
        attention_mask=pad(batch.attention_mask, (0, extra)),
        routed_mask=pad(batch.routed_mask, (0, extra)),
        completion_mask=pad(batch.completion_mask, (0, extra)),
        loss_mask=pad(batch.loss_mask, (0, extra)),
        old_logprobs=pad(batch.old_logprobs, (0, extra)),
        teacher_logprobs=pad(batch.teacher_logprobs, (0, extra)),
        replay={i: pad(ids, (0, 0, 0, extra), value=int(ids.max())) for i, ids in batch.replay.items()},
    )
    config = OpdConfig()
    with torch.no_grad():
        loss, metrics = opd_loss(student, batch, 8, config)
        loss_padded, metrics_padded = opd_loss(student, padded, 8, config)
    torch.testing.assert_close(loss_padded, loss, rtol=1e-5, atol=1e-6)
    assert metrics_padded == pytest.approx(metrics, rel=1e-5, abs=1e-6)
    assert metrics["clip_fraction"] == 0.0  # first update: the new policy is the sampling policy


def test_advantage_tokens_all_puts_the_prompt_in_the_loss(small_student: Path, small_data: Path) -> None:
    _, prompts, generations, batch = _sampled_batch(small_student, small_data / "prompts" / "opd.jsonl", 3, False)
    assert torch.equal(batch.loss_mask, batch.completion_mask)
    sequences = [p + g.tokens for p, g in zip(prompts, generations, strict=True)]
    scores = [[-0.5] * (len(s) - 1) for s in sequences]  # every target from token 1 on
    tokenizer = AutoTokenizer.from_pretrained(small_student)
    full = build_batch(prompts, generations, scores, tokenizer.pad_token_id, 12, torch.device("cpu"), [1] * 3)
    assert torch.equal(full.completion_mask, batch.completion_mask)
    assert torch.equal(full.loss_mask, full.attention_mask[:, 1:].bool())
    assert (full.teacher_logprobs[full.loss_mask] == -0.5).all() and (full.teacher_logprobs[~full.loss_mask] == 0).all()


def test_local_teacher_scores_and_caches(small_teacher: Path) -> None:
    teacher = LocalTeacher(str(small_teacher), torch.device("cpu"), cache_size=2)
    sequences = [[1, 5, 9, 13, 2], [1, 7, 3]]
    first = teacher.score(sequences, [2, 1])
    assert [len(s) for s in first] == [3, 2] and all(v <= 0 for s in first for v in s)
    for sequence, start, got in zip(sequences, [2, 1], first, strict=True):  # the second one is padded
        with torch.no_grad():
            logits = teacher.model(input_ids=torch.tensor([sequence])).logits
        targets = torch.tensor(sequence[start:])
        expected = torch.log_softmax(logits[0, start - 1 : -1].float(), -1)[torch.arange(len(targets)), targets]
        torch.testing.assert_close(torch.tensor(got), expected, rtol=1e-5, atol=1e-5)
    assert teacher.score(sequences, [2, 1]) == first and teacher.hits == 2


def test_opd_needs_a_zero_expert_student(small_teacher: Path, small_data: Path, tmp_path: Path) -> None:
    from zeda_trainer.stages.opd import train_opd

    config = OpdConfig(student=small_teacher, teacher=str(small_teacher), prompts=small_data / "prompts" / "opd.jsonl")
    with pytest.raises(ZedaError, match="has no zero experts"):
        train_opd(config.model_copy(update={"run_dir": tmp_path / "run", "out": tmp_path / "out"}))


def test_checkpoint_interval_must_fit_updates_per_batch() -> None:
    with pytest.raises(ValueError, match="multiple of updates_per_batch"):
        OpdConfig.model_validate({"updates_per_batch": 3, "optim": {"checkpoint_every": 10}})


def _stage_command(stage: str, run_dir: Path, out: Path, small_teacher: Path, student: Path, data: Path) -> list[str]:
    common = {
        "run_dir": run_dir,
        "out": out,
        "batch_size": 4,
        "optim.max_steps": 12,
        "optim.log_every": 1,
        "optim.checkpoint_every": 2,
        "optim.warmup_steps": 1,
        "optim.lr": 1e-3,
    }
    if stage == "sft":
        specific = {
            "teacher": small_teacher,
            "prompts": data / "prompts" / "sft.jsonl",
            "text.path": data / "text" / "train.jsonl",
            "rollout.max_new_tokens": 8,
        }
    else:
        specific = {
            "student": student,
            "teacher": small_teacher,
            "prompts": data / "prompts" / "opd.jsonl",
            "sampling.max_new_tokens": 8,
        }
    sets = [arg for key, value in (common | specific).items() for arg in ("--set", f"{key}={value}")]
    return [sys.executable, "-m", "zeda_cli.main", "train", stage, *sets]


@pytest.mark.parametrize("stage", ["sft", "opd"])
def test_kill_9_then_resume_matches_an_uninterrupted_run(
    stage: str, small_teacher: Path, small_student: Path, small_data: Path, tmp_path: Path
) -> None:
    straight = _stage_command(stage, tmp_path / "a", tmp_path / "a-out", small_teacher, small_student, small_data)
    done = subprocess.run(straight, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = _stage_command(stage, tmp_path / "b", tmp_path / "b-out", small_teacher, small_student, small_data)
    kill_9_once_written(killed, tmp_path / "b" / "checkpoints" / "step-00000002")
    assert not (tmp_path / "b-out").exists()
    logged_before_kill = logged_up_to(tmp_path / "b", 2)

    resumed = subprocess.run([*killed, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight_weights = load_file(tmp_path / "a-out" / "model.safetensors")
    resumed_weights = load_file(tmp_path / "b-out" / "model.safetensors")
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=1e-6, msg=name)
    # Steps 1-2 come from the checkpoint, not from a rerun that happens to end on the same weights.
    assert_resumed_exactly(logged_before_kill, tmp_path / "b", list(range(1, 13)))


def _scored_batch(student_path: Path, teacher_path: Path, prompts_file: Path, count: int):
    """A replayed on-policy batch of the student, scored by the real teacher, with its old log-probs."""
    student, _, _, batch = _sampled_batch(student_path, prompts_file, count, True, teacher_path)
    with torch.no_grad():
        batch.old_logprobs = policy_forward(student, batch, keep_probs=False)[0]
    return student, batch


def _step_along_gradient(student: torch.nn.Module, size: float) -> None:
    """Move every parameter by ``size`` along its own normalised negative gradient, then drop the gradient."""
    with torch.no_grad():
        for parameter in student.parameters():
            if parameter.grad is not None:
                parameter -= size * parameter.grad / (parameter.grad.norm() + 1e-12)
                parameter.grad = None


def _reverse_kl(student: torch.nn.Module, batch) -> float:
    """Sample estimate of KL(student || teacher) on the batch's sampled tokens, nats per token."""
    with torch.no_grad():
        new, _ = policy_forward(student, batch, keep_probs=False)
    mask = batch.completion_mask
    return float((new - batch.teacher_logprobs)[mask].mean())


def test_an_opd_step_moves_the_student_towards_the_teacher(
    small_student: Path, small_teacher: Path, small_data: Path
) -> None:
    """The advantage has the right sign: descending the clipped loss (L_GA off) lowers the reverse KL
    of the sampled tokens, and ascending it raises it."""
    config = OpdConfig(group_loss={"alpha": 0.0})
    moved = {}
    for direction in (1.0, -1.0):
        student, batch = _scored_batch(small_student, small_teacher, small_data / "prompts" / "opd.jsonl", 8)
        before = _reverse_kl(student, batch)
        assert before == pytest.approx(
            -float((batch.teacher_logprobs - batch.old_logprobs)[batch.completion_mask].mean())
        )
        loss, _ = opd_loss(student, batch, 8, config)
        (direction * loss).backward()
        _step_along_gradient(student, 1e-3)
        moved[direction] = _reverse_kl(student, batch) - before
    assert moved[1.0] < 0.0 < moved[-1.0], moved


def test_the_clip_bites_from_the_second_update_of_a_batch(
    small_student: Path, small_teacher: Path, small_data: Path
) -> None:
    """With one update per batch the ratio is 1 and nothing is clipped; a second update on the same
    batch (``updates_per_batch`` > 1) after a large step clips tokens, and clipped tokens add no gradient."""
    student, batch = _scored_batch(small_student, small_teacher, small_data / "prompts" / "opd.jsonl", 8)
    config = OpdConfig(group_loss={"alpha": 0.0}, clip_eps=0.05)
    loss, metrics = opd_loss(student, batch, 8, config)
    assert metrics["clip_fraction"] == 0.0
    loss.backward()
    _step_along_gradient(student, 0.05)
    loss, metrics = opd_loss(student, batch, 8, config)
    assert 0.0 < metrics["clip_fraction"] < 1.0
    loss.backward()
    clipped_grads = [p.grad.clone() for p in student.parameters() if p.grad is not None]
    student.zero_grad()
    loss_wide, wide = opd_loss(student, batch, 8, config.model_copy(update={"clip_eps": 100.0}))
    assert wide["clip_fraction"] == 0.0
    loss_wide.backward()
    wide_grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert any(not torch.allclose(a, b) for a, b in zip(clipped_grads, wide_grads, strict=True))
