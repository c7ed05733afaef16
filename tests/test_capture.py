"""Traffic capture: the SQLite store (retention, concurrent writers) and the server's opt-in capture."""

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from zeda_cli.main import main
from zeda_core.errors import ZedaError
from zeda_core.traffic import CapturedRequest, TrafficStore, open_existing_store
from zeda_server.launch import running_server
from zeda_server.settings import ServerSettings
from zeda_trainer.common.prompts import load_prompts

ADMIN = {"Authorization": "Bearer admin-secret"}


def _row(text: str, created: float = 0.0) -> CapturedRequest:
    return CapturedRequest("chat", "fp_test", text, True, created=created)


def test_concurrent_writers_lose_no_rows(tmp_path: Path) -> None:
    db = tmp_path / "capture.db"
    store = TrafficStore(db)
    threads = [
        threading.Thread(target=lambda t=t: [store.add(_row(f"thread {t} row {i}")) for i in range(150)])
        for t in range(8)
    ]
    writer = (
        "import sys; from zeda_core.traffic import TrafficStore, CapturedRequest;"
        "s = TrafficStore(sys.argv[1]);"
        "[s.add(CapturedRequest('completions', 'fp', f'proc {sys.argv[2]} row {i}', False)) for i in range(150)]"
    )
    processes = [subprocess.Popen([sys.executable, "-c", writer, str(db), str(p)]) for p in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(p.wait(timeout=120) == 0 for p in processes)
    assert store.count() == 8 * 150 + 2 * 150
    assert len({r.prompt for r in store.rows()}) == 8 * 150 + 2 * 150


def test_retention_by_count_and_age(tmp_path: Path) -> None:
    store = TrafficStore(tmp_path / "capture.db", max_rows=10, max_age_s=3600)
    for i in range(25):
        store.add(_row(f"row {i}"))
    assert [r.prompt for r in store.rows()] == [f"row {i}" for i in range(24, 14, -1)]
    old = TrafficStore(tmp_path / "aged.db", max_rows=100, max_age_s=3600)
    old.add(_row("two hours ago", created=time.time() - 7200))
    old.add(_row("fresh"))
    assert [r.prompt for r in old.rows()] == ["fresh"]
    with pytest.raises(ZedaError, match="must be positive"):
        TrafficStore(tmp_path / "bad.db", max_rows=0)


def test_retention_by_size_keeps_the_file_bounded(tmp_path: Path) -> None:
    db = tmp_path / "capture.db"
    store = TrafficStore(db, max_bytes=64 << 10)
    for i in range(400):  # about 400 KB of prompts into a 64 KiB store
        store.add(_row(f"row {i} " + "x" * 1000))
    rows = [r.prompt for r in store.rows()]
    assert 10 < len(rows) < 64 and rows[0].startswith("row 399 ")  # the newest are kept
    store.close()
    with sqlite3.connect(db) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert db.stat().st_size <= (64 << 10) + 16 * 4096  # freed pages went back to the file system


def test_export_cli_writes_a_prompt_set(tmp_path: Path, capsys) -> None:
    store = TrafficStore(tmp_path / "capture.db")
    store.add(_row("What is 2 + 2?"))
    store.add(CapturedRequest("completions", "fp_test", "def add(a, b):", False, "\n    return a + b", 0.4))
    out = tmp_path / "export" / "captured.jsonl"
    assert main(["capture", "export", "--db", str(tmp_path / "capture.db"), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["What is 2 + 2?", "def add(a, b):"]
    assert records[1]["completion"] == "\n    return a + b" and records[1]["zero_expert_ratio"] == 0.4
    assert [(p.text, p.chat, p.domain) for p in load_prompts(out)] == [
        ("What is 2 + 2?", True, "captured"),
        ("def add(a, b):", False, "captured"),
    ]
    assert main(["capture", "export", "--db", str(tmp_path / "missing.db"), "--out", str(out)]) == 2
    assert "missing.db does not exist" in capsys.readouterr().err
    (tmp_path / "garbage.db").write_text("not a database")
    with pytest.raises(ZedaError, match="cannot open the capture store"):
        open_existing_store(tmp_path / "garbage.db")


def test_server_captures_only_when_on_and_honours_the_opt_out_header(small_student: Path, tmp_path: Path) -> None:
    db = tmp_path / "traffic.db"
    flags = ("--capture-db", str(db), "--capture-completions", "true", "--admin-key", "admin-secret")
    with running_server(small_student, *flags) as url:
        chat = {"model": "student", "messages": [{"role": "user", "content": "What is 7 + 1?"}], "max_tokens": 6}
        kept = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
        opted_out = httpx.post(f"{url}/v1/chat/completions", json=chat, headers={"X-Zeda-Capture": "off"}, timeout=60)
        streamed = {"model": "student", "prompt": "Reverse: abc", "max_tokens": 6, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=streamed, timeout=60) as response:
            assert response.status_code == 200 and "[DONE]" in response.read().decode()
        assert kept.status_code == opted_out.status_code == 200
        status = httpx.get(f"{url}/admin/status", headers=ADMIN, timeout=60).json()["capture"]
        assert status["enabled"] and status["rows"] == 2

        paused = httpx.post(f"{url}/admin/capture", json={"enabled": False}, headers=ADMIN, timeout=60)
        assert paused.status_code == 200 and paused.json()["enabled"] is False
        httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
        no_key = httpx.post(f"{url}/admin/capture", json={"enabled": True}, timeout=60)
        assert no_key.status_code == 401

    rows = list(open_existing_store(db).rows())
    assert len(rows) == 2
    newest, oldest = rows
    assert (oldest.prompt, oldest.chat, oldest.endpoint) == ("What is 7 + 1?", True, "chat")
    assert oldest.completion == kept.json()["choices"][0]["message"]["content"]
    assert oldest.model_version == kept.json()["system_fingerprint"]
    assert oldest.zero_expert_ratio == pytest.approx(kept.json()["usage"]["zeda"]["zero_expert_ratio"])
    assert (newest.prompt, newest.chat, newest.endpoint) == ("Reverse: abc", False, "completions")


def test_capture_is_off_by_default_and_cannot_be_turned_on_without_a_store(small_student: Path) -> None:
    with running_server(small_student, "--admin-key", "admin-secret") as url:
        status = httpx.get(f"{url}/admin/status", headers=ADMIN, timeout=60).json()["capture"]
        assert status == {"available": False, "enabled": False, "db": None, "rows": 0, "completions": False}
        response = httpx.post(f"{url}/admin/capture", json={"enabled": True}, headers=ADMIN, timeout=60)
        assert response.status_code == 409 and response.json()["error"]["code"] == "capture_unavailable"


def test_empty_environment_values_mean_unset(monkeypatch) -> None:
    """Compose files pass unset variables as empty strings: no key, no capture store."""
    for name in ("ZEDA_API_KEY", "ZEDA_ADMIN_KEY", "ZEDA_CAPTURE_DB", "ZEDA_SERVED_MODEL_NAME"):
        monkeypatch.setenv(name, "")
    settings = ServerSettings()
    assert settings.api_key is None and settings.admin_key is None and settings.capture_db is None
    assert settings.model_name == "tiny-zeda"
