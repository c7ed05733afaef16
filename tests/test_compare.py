"""``zeda compare`` on the small models: every method measured by the same code, the report, bad input."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from zeda_cli.main import main
from zeda_core.errors import ZedaError
from zeda_trainer.common.loop import OptimConfig
from zeda_trainer.measure.compare import CompareConfig, Point, reused_points, run_compare
from zeda_trainer.measure.compare_report import baseline_accuracy_at, margins, write_report
from zeda_trainer.measure.stats import paired_difference, stratified_mean
from zeda_trainer.stages.adamoe import AdaMoeConfig
from zeda_trainer.stages.rollouts import RolloutConfig
from zeda_trainer.stages.sft import TextMixConfig

REPO = Path(__file__).parents[1]


def _config(teacher: Path, student: Path, data: Path, tmp_path: Path) -> CompareConfig:
    return CompareConfig(
        teacher=teacher,
        zeda=[student],
        data_dir=data,
        out=tmp_path / "out",
        work_dir=tmp_path / "work",
        eval_per_skill=2,
        max_new_tokens=12,
        text_windows=4,
        calibration_blocks=4,
        dynamic_skip_quantiles=[0.5, 1.0],
        top_p=[0.1, 1.0],
        eval_sets=["test", "validation"],
        adamoe_null_experts=[4],
        adamoe_labels_null_experts=[4],
        dial=[-40.0, 2.0],
        adamoe=AdaMoeConfig(
            top_k=3,
            batch_size=4,
            rollout=RolloutConfig(max_new_tokens=8, batch_size=16),
            text=TextMixConfig(rows=2, block_size=32, in_group_loss=False),
            optim=OptimConfig(max_steps=3, warmup_steps=1, checkpoint_every=3),
        ),
        adamoe_labels=AdaMoeConfig(
            top_k=3, block_size=64, batch_size=4, optim=OptimConfig(max_steps=3, warmup_steps=1, checkpoint_every=3)
        ),
    )


def test_compare_measures_every_method_and_writes_an_offline_report(
    small_teacher: Path, small_student: Path, small_data: Path, tmp_path: Path
) -> None:
    config = _config(small_teacher, small_student, small_data, tmp_path)
    points = run_compare(config)
    by_knob = {(p.method, p.knob): p for p in points}
    methods = ["teacher", "zeda", "zeda-dial", "zeda-dial", "dynamic-skip", "dynamic-skip", "top-p", "top-p"]
    assert [p.method for p in points] == [*methods, "adamoe", "adamoe-labels"]
    for point in points:  # 2 items per skill, from the test split; every item's result kept
        assert point.items == 16 and len(point.correct) == 8 and all(len(bits) == 2 for bits in point.correct.values())
        assert point.accuracy == pytest.approx(sum(bits.count("1") for bits in point.correct.values()) / 16)
        assert point.accuracy_low <= point.accuracy <= point.accuracy_high
    teacher = by_knob["teacher", "-"]
    assert teacher.flops_saved == 0.0 and teacher.kl == pytest.approx(0.0, abs=1e-6)
    full = by_knob["top-p", "p 1.0"]  # p = 1 is the original routing: the teacher's numbers exactly
    assert full.flops_saved == 0.0 and full.kl == pytest.approx(0.0, abs=1e-6) and full.accuracy == teacher.accuracy
    assert by_knob["top-p", "p 0.1"].flops_saved > 0.0 and by_knob["top-p", "p 0.1"].kl > 0.0
    median, everything = by_knob["dynamic-skip", "quantile 0.5"], by_knob["dynamic-skip", "quantile 1.0"]
    assert 0.0 < median.flops_saved < everything.flops_saved <= 0.5  # top-2: at most the second slot goes
    zeda = by_knob["zeda", small_student.name]
    assert zeda.flops_saved > 0.0
    # The dial on the router-only student: at -40 it is the teacher, at +2 it skips more than as trained.
    closed, opened = by_knob["zeda-dial", "bias -40"], by_knob["zeda-dial", "bias +2"]
    assert (
        closed.flops_saved == 0.0 and closed.kl == pytest.approx(0.0, abs=1e-5) and closed.accuracy == teacher.accuracy
    )
    assert opened.flops_saved > zeda.flops_saved
    assert (config.work_dir / "adamoe-z4-k3" / "config.json").is_file()
    assert (config.work_dir / "adamoe-labels-z4-k3" / "config.json").is_file()
    # Same-data AdaMoE learns from the teacher's rollouts of the SFT prompts, like ZEDA stage 1.
    rollouts = [json.loads(line) for line in (config.work_dir / "rollouts.jsonl").read_text().splitlines()]
    sft_prompts = (small_data / "prompts" / "sft.jsonl").read_text().splitlines()
    assert len(rollouts) == len(sft_prompts) and all(r["completion_ids"] for r in rollouts)
    summary = json.loads((config.work_dir / "adamoe-z4-k3" / "training.json").read_text())
    assert summary["config"]["data"] == "rollouts" and summary["config"]["num_null_experts"] == 4
    for point in points:  # savings are against the original top-2, whatever k the method runs
        assert point.flops_saved == pytest.approx(1.0 - point.real_experts / 2, abs=1e-9)
    assert by_knob["adamoe", "Z 4, k 3"].real_experts > 0.0
    assert by_knob["adamoe-labels", "Z 4, k 3"].real_experts > 0.0

    write_report(points, config)
    record = json.loads((config.out / "compare.json").read_text())
    assert len(record["points"]) == 10 and {m["baseline"] for m in record["margins"]} == {
        "dynamic-skip",
        "top-p",
        "adamoe",
        "adamoe-labels",
    }
    assert all(m["difference_se"] is not None and m["decisive"] in (True, False) for m in record["margins"])
    page = (config.out / "compare.html").read_text()
    assert "data:image/png;base64," in page and "http://" not in page and "https://" not in page
    assert (config.out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| zeda |" in (config.out / "compare.md").read_text()


def _point(method: str, knob: str, saved: float, accuracy: float) -> Point:
    return Point(method, knob, saved, saved, 2.0 * (1.0 - saved), accuracy, 0.0, 1.0, "m")


def test_baseline_accuracy_is_read_at_zedas_flop_level() -> None:
    skip = [_point("dynamic-skip", "q 0.5", 0.25, 0.6), _point("dynamic-skip", "q 0.9", 0.45, 0.4)]
    accuracy, how = baseline_accuracy_at(skip, 0.35)
    assert accuracy == pytest.approx(0.5) and how.startswith("interpolated")
    accuracy, how = baseline_accuracy_at(skip, 0.6)
    assert accuracy == 0.4 and "more FLOPs than ZEDA" in how
    accuracy, how = baseline_accuracy_at(skip, 0.1)
    assert accuracy == 0.6 and "fewer FLOPs than ZEDA" in how
    (margin,) = margins([_point("zeda", "z", 0.6, 0.7), *skip])
    assert margin.margin == pytest.approx(0.3)


def test_bad_input_is_refused_with_a_clear_message(
    small_teacher: Path, small_student: Path, small_data: Path, tmp_path: Path, capsys
) -> None:
    config = _config(small_teacher, REPO / "models" / "tiny-zeda", small_data, tmp_path)
    with pytest.raises(ZedaError, match="different tokenizer"):
        run_compare(config)
    assert main(["compare", "--teacher", str(small_teacher), "--zeda", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_reused_points_are_kept_unless_measured_again(tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(
        json.dumps({"points": [asdict(_point("top-p", "p 0.5", 0.3, 0.7)), asdict(_point("zeda", "z", 0.6, 0.7))]})
    )
    second.write_text(json.dumps({"points": [asdict(_point("top-p", "p 0.5", 0.3, 0.9))]}))
    kept = reused_points([first, second])
    assert [(p.method, p.accuracy) for p in kept] == [("top-p", 0.9), ("zeda", 0.7)]
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(ZedaError, match=r"bad\.json does not hold compare points"):
        reused_points([bad])


def test_stratified_interval_and_paired_difference_on_hand_values() -> None:
    # Two skills of 4 items: 3/4 and 1/4 right, mean 0.5; SE = sqrt(sum var_s / n_s) / 2 (ddof 1).
    estimate = stratified_mean({"a": [1, 1, 1, 0], "b": [0, 0, 1, 0]})
    assert estimate.mean == pytest.approx(0.5)
    assert estimate.standard_error == pytest.approx(((0.25 / 4) + (0.25 / 4)) ** 0.5 / 2)
    assert estimate.low == pytest.approx(0.5 - 1.96 * estimate.standard_error, abs=1e-3)
    # Paired: B is A with one item flipped, so the difference is small and its SE too.
    first = {"a": [1.0] * 50 + [0.0] * 50}
    second = {"a": [1.0] * 49 + [0.0] * 51}
    paired = paired_difference(first, second)
    unpaired = (stratified_mean(first).standard_error ** 2 + stratified_mean(second).standard_error ** 2) ** 0.5
    assert paired.mean == pytest.approx(0.01) and paired.standard_error < unpaired / 5
    with pytest.raises(ValueError, match="same items"):
        paired_difference(first, {"a": [1.0]})


def test_margins_are_paired_item_by_item() -> None:
    def scored(method: str, knob: str, saved: float, bits: str) -> Point:
        point = _point(method, knob, saved, bits.count("1") / len(bits))
        point.correct = {"s": bits}
        return point

    zeda = scored("zeda", "z", 0.5, "1" * 90 + "0" * 10)
    # Top-P at 0.4 and 0.6 saved: read halfway, its per-item scores averaged.
    low, high = scored("top-p", "p a", 0.4, "1" * 80 + "0" * 20), scored("top-p", "p b", 0.6, "1" * 60 + "0" * 40)
    (margin,) = margins([zeda, low, high])
    assert margin.baseline_accuracy == pytest.approx(0.7) and margin.margin == pytest.approx(0.2)
    differences = [1.0 - (1.0 + 1.0) / 2] * 60 + [1.0 - (1.0 + 0.0) / 2] * 20 + [1.0 - 0.0] * 10 + [-0.0] * 10
    expected = paired_difference({"s": differences}, {"s": [0.0] * 100})
    assert margin.difference_se == pytest.approx(expected.standard_error)
    assert margin.z == pytest.approx(0.2 / expected.standard_error) and margin.decisive
    # A point without its items (an older compare.json) gives the margin without a paired SE.
    (unpaired,) = margins([zeda, _point("top-p", "p c", 0.5, 0.7)])
    assert unpaired.difference_se is None and unpaired.decisive is None
