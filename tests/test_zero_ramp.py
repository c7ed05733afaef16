"""The floor ramp that brings a ``preserve``-initialised model's zero rows into play."""

import json
from pathlib import Path

import torch

from zeda_core import inject_zero_experts, record_routing
from zeda_core.convert import PRESERVE_LOGIT, nudge_zero_bias
from zeda_core.moe import ZeroExpertMoeBlock
from zeda_trainer.common.loop import OptimConfig
from zeda_trainer.stages.rollouts import RolloutConfig
from zeda_trainer.stages.sft import SftConfig, train_sft

from family_checks import tiny_model, token_batch


def _zero_ratio(model: torch.nn.Module) -> float:
    with torch.no_grad(), record_routing() as recorder:
        model(input_ids=token_batch())
    counts = recorder.slot_counts().sum(dim=(0, 1))
    return float(counts[1] / counts.sum())


def _gates(model: torch.nn.Module):
    return [m.gate for m in model.modules() if isinstance(m, ZeroExpertMoeBlock)]


def test_offsets_step_towards_each_layers_target() -> None:
    model = tiny_model("qwen3_moe")
    inject_zero_experts(model, 4, init="preserve")
    assert _zero_ratio(model) == 0.0
    layers = len(_gates(model))
    nudge_zero_bias(model, [0.0] * layers, [0.5] * layers, 2.0)  # below target: up
    assert all(torch.all(g.zero_logit_bias == PRESERVE_LOGIT + 2.0) for g in _gates(model))
    nudge_zero_bias(model, [0.9] + [0.5] * (layers - 1), [0.5] * layers, 2.0)  # above: down; on target: still
    assert _gates(model)[0].zero_logit_bias.tolist() == [PRESERVE_LOGIT] * 4
    assert _gates(model)[1].zero_logit_bias.tolist() == [PRESERVE_LOGIT + 2.0] * 4
    for _ in range(20):
        nudge_zero_bias(model, [0.0] * layers, [0.5] * layers, 2.0)
    assert _zero_ratio(model) > 0.0


def test_sigmoid_families_move_the_zero_rows_selection_bias() -> None:
    model = tiny_model("glm4_moe_lite")
    inject_zero_experts(model, 4, init="preserve")
    before = [g.e_score_correction_bias.clone() for g in _gates(model)]
    layers = len(before)
    nudge_zero_bias(model, [0.0] * layers, [0.5] * layers, 0.1)
    for gate, old in zip(_gates(model), before, strict=True):
        n = gate.spec.num_experts
        torch.testing.assert_close(gate.e_score_correction_bias[n:], old[n:] + 0.1)
        assert torch.equal(gate.e_score_correction_bias[:n], old[:n])


def test_preserve_sft_with_the_ramp_uses_zero_experts(small_teacher: Path, small_data: Path, tmp_path: Path) -> None:
    def run(name: str, ramp_steps: int) -> list[dict]:
        config = SftConfig(
            teacher=small_teacher,
            prompts=small_data / "prompts" / "sft.jsonl",
            run_dir=tmp_path / name,
            out=tmp_path / f"{name}-out",
            zero_experts=4,
            init="preserve",
            zero_ramp_steps=ramp_steps,
            zero_ramp_step_size=8.0,
            rollout=RolloutConfig(max_new_tokens=12, batch_size=32),
            batch_size=8,
            optim=OptimConfig(max_steps=8, lr=1e-3, warmup_steps=1, log_every=1, checkpoint_every=8),
        )
        train_sft(config)
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert all(r["r_ze"] == 0.0 for r in run("no-ramp", 0))
    ramped = run("ramp", 4)
    assert ramped[0]["r_ze"] == 0.0 and max(r["r_ze"] for r in ramped) > 0.05
