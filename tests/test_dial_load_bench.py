"""bench/dial_load.py: the probe set it sends and the BENCHMARKS.md section built from its runs."""

import importlib.util
from pathlib import Path

from zeda_core.atomic import write_marked_section

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("dial_load_bench", ROOT / "bench" / "dial_load.py")
dial_load = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dial_load)


def _run(statuses: list[int], correct: bool, offsets: list[float]) -> dict:
    results = [
        {"status": s, "latency": 1.0 + i, "correct": correct, "tokens": 10, "zero_expert_ratio": 0.5}
        if s == 200
        else {"status": s, "latency": 0.01}
        for i, s in enumerate(statuses)
    ]
    return {"results": results, "wall_s": 2.0, "offsets": offsets}


def test_probe_requests_are_graded_skill_questions() -> None:
    requests = dial_load.probe_requests(16, seed=0)
    assert requests == dial_load.probe_requests(16, seed=0)
    assert len({item.skill for _, item in requests}) == 8
    for body, item in requests:
        assert body["messages"][0]["content"] == item.prompt and body["temperature"] == 0
        assert body["max_tokens"] == len(item.answer) + 8 and item.correct(f" {item.answer}\n")


def test_summary_and_section_compare_the_two_modes(tmp_path: Path) -> None:
    off = dial_load.summarise([_run([200, 200, 429, 429], True, [0.0, 0.0])])
    on = dial_load.summarise([_run([200, 200, 200, 429], False, [0.25, 0.5])])
    assert (off["answered"], off["refused_429"], off["answered_per_s"], off["accuracy"]) == (2, 2, 1.0, 1.0)
    assert (on["refused_429"], on["accuracy"], on["mean_load_offset"], on["max_load_offset"]) == (1, 0.0, 0.375, 0.5)
    config = {
        "model": "m", "machine": "x", "flags": "f", "adaptive_flags": "a", "streams": 8,
        "capacity": 2.0, "rate": 4.0, "overload": 2.0, "per_run": 4,
    }  # fmt: skip
    section = dial_load.markdown(config, {"off": off, "queue": on}, "python bench/dial_load.py")
    assert "answered/s x1.50" in section and "429s 2 -> 1" in section and "accuracy 1.000 -> 0.000" in section
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# Benchmarks\n")
    write_marked_section(page, dial_load.MARKER, section)
    write_marked_section(page, dial_load.MARKER, section)  # a rerun replaces its section
    assert page.read_text().count("## Compute dial under overload") == 1
