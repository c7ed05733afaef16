"""bench/serve.py: the per-model MoE profile and the BENCHMARKS.md section built from it."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("serve_bench", ROOT / "bench" / "serve.py")
serve_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve_bench)


def _results(streams: str, zeda_tokens_per_s: float, zeda_zero_ratio: float, profile: dict) -> dict:
    """A results dict as ``bench/serve.py`` builds it: one concurrency, the teacher at 100 tokens/s."""
    row = {"tokens_per_s": 100.0, "p50_latency_s": 0.1, "p95_latency_s": 0.2, "p50_ttft_s": 0.01}
    zeda = row | {"tokens_per_s": zeda_tokens_per_s, "zero_expert_ratio": zeda_zero_ratio}
    return {
        "teacher": {streams: row | {"zero_expert_ratio": 0.0}},
        "zeda": {streams: zeda},
        "requests": 8,
        "max_tokens": 6,
        "profile": profile,
    }


def test_moe_profile_of_both_models_feeds_the_section() -> None:
    requests = serve_bench.make_requests(6, 6, seed=0)
    profile = {
        key: serve_bench.moe_profile(str(ROOT / "models" / name), requests, streams=2, max_tokens=6)
        for key, name in (("teacher", "tiny-teacher"), ("zeda", "tiny-zeda"))
    }
    for measured in profile.values():
        assert 0 < measured["moe_s"] < measured["model_s"]
        assert measured["moe_tokens"] > 0 and measured["moe_calls"] > 0
        assert 0 < measured["expert_calls"] <= 8 * measured["moe_calls"]  # 8 real experts per layer
    results = _results("2", zeda_tokens_per_s=110.0, zeda_zero_ratio=0.4, profile=profile)
    section = serve_bench.markdown(results, "python bench/serve.py", "torch")
    assert section.startswith("<!-- bench:serve:cpu -->") and section.rstrip().endswith("<!-- /bench:serve:cpu -->")
    assert "Amdahl with the measured MoE-layer speed-up predicts" in section and "| 2 | ZEDA | 110.0 |" in section
    share = profile["teacher"]["moe_s"] / profile["teacher"]["model_s"]
    experts = {key: p["expert_calls"] / p["moe_calls"] for key, p in profile.items()}
    traffic_gain = 1.0 / ((1.0 - share) + share * experts["zeda"] / experts["teacher"])
    assert f"the gain could reach at most **{traffic_gain:.2f}x**" in section


def test_sglang_profile_comes_from_the_forward_counters_on_metrics() -> None:
    before = {"model": 2.0, "moe": 1.0, "computed": 100.0, "skipped": 20.0}
    after = {"model": 6.0, "moe": 2.5, "computed": 300.0, "skipped": 60.0}
    profile = serve_bench.sglang_profile(before, after, top_k=2)
    assert profile == {"model_s": 4.0, "moe_s": 1.5, "moe_tokens": 120}
    profiles = {"teacher": profile, "zeda": profile | {"moe_s": 1.0}}
    results = _results("16", zeda_tokens_per_s=105.0, zeda_zero_ratio=0.5, profile=profiles)
    section = serve_bench.markdown(results, "python bench/serve.py --backend sglang", "sglang")
    assert section.startswith("<!-- bench:serve:cpu:sglang -->") and "SGLang 0.5.23 CPU engine" in section
    # MoE share 1.5 / 4 = 37.5 %; r_ze 0.5: Amdahl 1 / (0.625 + 0.1875) = 1.23x; MoE-layer speed-up 1.5x.
    assert "**37.5%**" in section and "**1.23x**" in section and "a **1.50x** MoE-layer speed-up" in section
    assert "distinct experts" not in section  # SGLang's counters do not see which experts ran
