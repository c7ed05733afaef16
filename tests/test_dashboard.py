"""The live dashboard in headless Chromium: it renders offline and its numbers move after requests."""

from pathlib import Path

import httpx
from browser import CHROMIUM_FLAGS, require_chromium
from playwright.sync_api import sync_playwright

from zeda_server.launch import running_server


def test_dashboard_updates_live_after_requests(small_student: Path, tmp_path: Path) -> None:
    chromium = require_chromium()
    with running_server(small_student) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        external: list[str] = []
        page.on("request", lambda r: external.append(r.url) if not r.url.startswith(url) else None)
        page.goto(f"{url}/dashboard")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('updated')")
        assert page.text_content("#requests") == "0"
        assert page.text_content("#version").startswith("fp_")
        before = tmp_path / "before.png"
        page.screenshot(path=str(before))

        for i in range(3):
            body = {"model": "student", "messages": [{"role": "user", "content": f"What is {i} + 1?"}], "max_tokens": 8}
            assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        page.wait_for_function("document.getElementById('requests').textContent === '3'", timeout=10_000)
        ratio = float(page.text_content("#ratio"))
        assert 0.0 < ratio < 1.0
        assert page.text_content("#saved") != "0"
        after = tmp_path / "after.png"
        page.screenshot(path=str(after))
        browser.close()
    assert before.stat().st_size > 5_000 and after.read_bytes() != before.read_bytes()
    assert external == []  # no CDN: every request the page made went to the server
