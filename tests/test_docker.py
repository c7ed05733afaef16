"""The Docker image definition: hadolint-clean and meeting the deployment contract (no Docker here)."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_hadolint_is_clean() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    done = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_contract() -> None:
    assert re.search(r"^ARG SGLANG_IMAGE=lmsysorg/sglang:v0\.5\.23\b", DOCKERFILE, re.MULTILINE)
    assert "sglang==0.5.23" in (ROOT / "pyproject.toml").read_text()
    assert re.search(r'pip install --no-cache-dir "\.\[sglang', DOCKERFILE)
    user = re.findall(r"^USER (\S+)$", DOCKERFILE, re.MULTILINE)
    assert user and user[-1] not in {"root", "0"}
    assert re.search(r"^EXPOSE 8000$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*", DOCKERFILE, re.MULTILINE) and "/health" in DOCKERFILE
    assert re.search(r'^ENTRYPOINT \["zeda", "serve"\]$', DOCKERFILE, re.MULTILINE)
    for variable in ("ZEDA_MODEL", "ZEDA_BACKEND"):
        assert variable in DOCKERFILE


def test_compose_services() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"zeda", "train", "locust"} <= set(services)
    assert {"ZEDA_MODEL", "ZEDA_API_KEY", "ZEDA_BACKEND"} <= set(services["zeda"]["environment"])
    assert services["zeda"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["locust"]["depends_on"]["zeda"]["condition"] == "service_healthy"
    assert "--run-time" in services["locust"]["command"]
    retrain = services["retrain"]
    assert "zeda retrain" in retrain["command"][0] and "--every" in retrain["command"][0]
    assert retrain["volumes"] == ["zeda-data:/data"] and "zeda-data:/data" in services["zeda"]["volumes"]
    assert "ZEDA_CAPTURE_DB" in services["zeda"]["environment"]


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "build"} <= set(ignored)
