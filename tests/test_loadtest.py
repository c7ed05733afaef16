"""The locust A/B runner against two real servers on loopback, and its input checks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AB = [sys.executable, str(ROOT / "loadtest" / "ab.py")]


def test_ab_against_teacher_and_zeda(small_teacher: Path, small_student: Path, tmp_path: Path) -> None:
    out = tmp_path / "ab"
    command = [*AB, "--a-model", str(small_teacher), "--b-model", str(small_student), "--users", "4"]
    command += ["--run-time", "10s", "--rounds", "1", "--max-tokens", "8", "--out", str(out)]
    command += ["--write", str(tmp_path / "BENCHMARKS.md")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "ab.json").read_text())
    for side in ("A", "B"):
        summary = result["sides"][side]
        assert summary["requests"] > 0 and summary["errors"] == 0
        assert summary["tokens_per_s"] > 0 and summary["p95_latency_s"] >= summary["p50_latency_s"]
        # The savings the responses reported equal the server's /metrics counters over the window.
        assert summary["zero_expert_ratio"] == pytest.approx(summary["metrics_zero_expert_ratio"], rel=1e-9, abs=1e-12)
    assert result["sides"]["A"]["zero_expert_ratio"] == 0.0 < result["sides"]["B"]["zero_expert_ratio"]
    assert (out / "ab.csv").read_text().count("\n") == 3
    page = (out / "report.html").read_text()
    assert "<svg" in page and "http" not in page.split("<body>")[0].replace("http://www.w3.org", "")
    assert (out / "A-round0_stats.csv").is_file() and (out / "B-round0.jsonl").is_file()
    section = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- bench:ab:cpu -->" in section and "throughput" in section


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--a", "http://127.0.0.1:9", "--b", "http://127.0.0.1:9"], "server A at http://127.0.0.1:9 is unreachable"),
        (["--a", "http://x", "--b", "http://y", "--prompts", "BAD"], "invalid JSON"),
        (["--a", "http://x", "--b", "http://y", "--run-time", "soon"], "--run-time 'soon'"),
    ],
)
def test_bad_input_fails_before_the_load(extra: list[str], message: str, tmp_path: Path) -> None:
    extra = [str(tmp_path / "bad.jsonl") if e == "BAD" else e for e in extra]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    done = subprocess.run([*AB, *extra, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "out" / "ab.json").exists()
