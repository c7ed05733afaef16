"""``zeda analyze``: per-token figures consistent with served FLOPs, the report in headless Chromium, bad input."""

import base64
import math
from pathlib import Path

import pytest
from browser import CHROMIUM_FLAGS, require_chromium
from playwright.sync_api import sync_playwright

from zeda_cli.main import main
from zeda_core.errors import ZedaError
from zeda_trainer.measure.analyze import Analysis, analyze
from zeda_trainer.measure.analyze_report import write_analysis

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def analysis(small_student: Path, small_teacher: Path, small_data: Path) -> Analysis:
    return analyze(small_student, small_teacher, small_data / "prompts" / "opd.jsonl", limit=24, max_new_tokens=8)


def test_per_token_compute_matches_the_served_flops(analysis: Analysis, small_data: Path) -> None:
    assert len(analysis.prompts) == 24 and 0.0 < analysis.zero_ratio < 1.0
    assert len(analysis.per_layer_zero_ratio) == 2 and set(analysis.per_domain_zero_ratio) == {
        p.domain for p in analysis.prompts
    }
    for item in analysis.prompts:
        assert len(item.tokens) == len(item.experts) == len(item.delta) == len(item.kl)
        assert all(0.0 <= e <= analysis.top_k for e in item.experts)
        served = item.experts[:-1]  # the last sampled token is never fed back
        assert 1.0 - sum(served) / len(served) / analysis.top_k == pytest.approx(item.zero_ratio, abs=0.02)
        assert item.delta[-1] is None and all(k >= -1e-5 for k in item.kl[:-1])
    worst = analysis.worst(5)
    assert [p.mean_kl for p in worst] == sorted((p.mean_kl for p in analysis.prompts), reverse=True)[:5]
    assert [c.name for c in analysis.correlations] == [
        "|log p_T - log p_S| of the next token",
        "teacher entropy",
        "KL(teacher || student)",
    ]
    for c in analysis.correlations:
        assert -1.0 <= c.rho <= 1.0 and 0.0 <= c.p_value <= 1.0 and not math.isnan(c.rho)
        assert c.n == sum(len(p.tokens) - 1 for p in analysis.prompts)


def test_the_plots_are_also_written_as_png_files(analysis: Analysis, tmp_path: Path) -> None:
    write_analysis(analysis, tmp_path / "analysis.html", figures=tmp_path / "figures")
    inlined = (tmp_path / "analysis.html").read_text()
    for name in ("layers", "domains", "correlation"):  # the report's own plots, for a README
        png = (tmp_path / "figures" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and base64.b64encode(png).decode() in inlined, name


def test_report_renders_offline_in_headless_chromium(analysis: Analysis, tmp_path: Path) -> None:
    chromium = require_chromium()
    report = tmp_path / "analysis.html"
    write_analysis(analysis, report, tmp_path / "analysis.json")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 2000})
        fetched: list[str] = []
        page.on("request", lambda r: fetched.append(r.url))
        page.goto(report.as_uri())
        tokens = page.locator("#tokens span.tok").count()
        assert tokens == sum(len(p.tokens) for p in analysis.prompts)
        for plot in ("plot-layers", "plot-domains", "plot-correlation"):
            assert page.evaluate(f"document.getElementById('{plot}').naturalWidth") > 100, plot
        rows = page.locator("#correlations tbody tr").all_inner_texts()
        assert len(rows) == 3 and all(("+" in r or "-" in r) and "e" in r for r in rows)  # sign and p-value
        assert page.locator("#worst tbody tr").count() == 10
        shot = tmp_path / "analysis.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 20_000
    assert all(url.startswith(("file://", "data:")) for url in fetched)  # opens offline: no CDN


def test_bad_input_gets_a_clear_error(
    small_student: Path, small_teacher: Path, small_data: Path, tmp_path: Path, capsys
) -> None:
    prompts = small_data / "prompts" / "opd.jsonl"
    with pytest.raises(ZedaError, match=r"missing\.jsonl does not exist"):
        analyze(small_student, small_teacher, tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ZedaError, match="has no prompts"):
        analyze(small_student, small_teacher, tmp_path / "empty.jsonl")
    with pytest.raises(ZedaError, match="different tokenizer"):
        analyze(small_student, REPO / "models" / "tiny-teacher", prompts)
    with pytest.raises(ZedaError, match="no zero experts"):
        analyze(small_teacher, small_teacher, prompts)
    args = ["analyze", "--model", str(small_student), "--teacher", str(small_teacher), "--prompts", str(prompts)]
    assert main([*args, "--limit", "0"]) == 2
    assert "--limit must be >= 1, got 0" in capsys.readouterr().err
