"""bench/soak.py: the per-minute summary, the RSS-growth verdict, and the process-tree readings."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("soak_bench", ROOT / "bench" / "soak.py")
soak_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(soak_bench)


class Args:
    minutes, clients, max_batch, max_tokens = 3, 48, 32, 32


def test_summary_counts_per_minute_and_judges_rss_growth_from_minute_2() -> None:
    started = 1000.0
    records = [(started + 10, 0.1, 200), (started + 70, 0.3, 200), (started + 80, 0.2, 503), (started + 130, 0.5, 429)]
    samples = [(started, 800 * 1024, 14), (started + 60, 900 * 1024, 40), (started + 120, 1000 * 1024, 41)]
    samples.append((started + 180, 1040 * 1024, 41))
    result = soak_bench.summarise(records, samples, started, minutes=3)
    assert [row["requests"] for row in result["minutes"]] == [1, 2, 1]
    assert [row["errors_5xx"] for row in result["minutes"]] == [0, 1, 0]
    assert result["minutes"][2]["refused_429"] == 1 and result["minutes"][2]["p50_latency_s"] is None
    assert result["minutes"][1]["p99_latency_s"] == 0.3 and result["errors_5xx"] == 1
    assert result["rss_growth_from_minute_2"] == (1040 - 1000) / 1000  # minute 2 ends at the 1000 MB sample
    section = soak_bench.markdown(result, "python bench/soak.py", "torch", Args)
    assert section.startswith("<!-- bench:soak:cpu -->") and "**1 5xx**" in section and "Verdict: **FAIL**" in section
    clean = soak_bench.summarise(records[:2], samples, started, minutes=3)
    assert "Verdict: **pass**" in soak_bench.markdown(clean, "python bench/soak.py", "torch", Args)


def test_rss_covers_the_process_tree_and_fds_are_counted() -> None:
    alone = soak_bench.process_tree_rss_kb(os.getpid())
    script = "import time; block = b'x' * (80 << 20); print('ready', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        assert soak_bench.process_tree_rss_kb(os.getpid()) >= alone + 70 * 1024  # the child's 80 MB count
    finally:
        child.kill()
        child.wait()
    assert soak_bench.open_fds(os.getpid()) >= 3
