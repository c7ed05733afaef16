"""The Docker image definition: hadolint-clean and meeting the deployment contract (no Docker needed).

tests/test_docker_run.py (marked ``docker``, run by docker/smoke.sh) builds and runs the image for real.
"""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE_CPU = ROOT / "docker" / "compose.cpu.yml"


def test_hadolint_is_clean() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    done = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_contract() -> None:
    assert re.search(r"^ARG SGLANG_IMAGE=lmsysorg/sglang:v0\.5\.23\b", DOCKERFILE, re.MULTILINE)
    assert "sglang==0.5.23" in (ROOT / "pyproject.toml").read_text()
    # One Dockerfile for both bases: the extras, the device and torch are build arguments with the GPU defaults.
    assert re.search(r"^ARG ZEDA_EXTRAS=sglang,loadtest$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^ARG ZEDA_DEVICE=cuda$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^ARG TORCH_SPEC=$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^\s+ZEDA_DEVICE=\$\{ZEDA_DEVICE\}", DOCKERFILE, re.MULTILINE)
    assert re.search(r'pip install --no-cache-dir "\.\[\$\{ZEDA_EXTRAS\}\]"', DOCKERFILE)
    # The project lives in a venv on every base (Debian's system pip refuses installs, PEP 668).
    assert "python3 -m venv --system-site-packages /opt/venv" in DOCKERFILE
    assert re.search(r"^\s+PATH=/opt/venv/bin:\$PATH", DOCKERFILE, re.MULTILINE)
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
    # A configuration error exits 2: retried a few times, then left exited, not restarted forever.
    assert services["zeda"]["restart"].startswith("on-failure:")


def test_cpu_compose_file_is_host_network_loopback_and_gpu_free() -> None:
    gpu = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    services = yaml.safe_load(COMPOSE_CPU.read_text())["services"]
    assert {"zeda", "zeda-a", "locust", "ab"} <= set(services)
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert "ports" not in service and "deploy" not in service, name
    for name in ("zeda", "zeda-a"):
        environment = services[name]["environment"]
        assert environment["ZEDA_HOST"] == "127.0.0.1" and environment["ZEDA_DEVICE"] == "cpu"
        assert services[name]["restart"].startswith("on-failure:")
    assert set(gpu["zeda"]["environment"]) <= set(services["zeda"]["environment"])
    assert services["locust"]["entrypoint"] == gpu["locust"]["entrypoint"]
    assert (
        services["locust"]["command"][:2] == gpu["locust"]["command"][:2]
        and "--run-time" in services["locust"]["command"]
    )
    assert services["ab"]["entrypoint"] == ["python", "loadtest/ab.py"]
    for dependent in ("locust", "ab"):
        assert services[dependent]["depends_on"]["zeda"]["condition"] == "service_healthy"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="no docker-compose")
@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker/compose.cpu.yml"]])
def test_compose_files_are_valid_for_docker_compose(files: list[str]) -> None:
    command = ["docker-compose", *(a for f in files for a in ("-f", str(ROOT / f))), "config", "-q"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerignore_lets_in_only_what_the_dockerfile_copies() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"  # everything out (.git, .venv, build, tests, docs, caches) ...
    let_in = {line[1:] for line in lines if line.startswith("!")}
    copied = {source for line in re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.MULTILINE) for source in line.split()}
    assert let_in == copied  # ... then back in exactly what the Dockerfile copies
    assert {"**/__pycache__", "**/*.egg-info", "**/build"} <= set(lines)


def test_requirements_helper_swaps_torch_and_expands_extras() -> None:
    spec = importlib.util.spec_from_file_location("docker_requirements", ROOT / "docker" / "requirements.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pyproject = ROOT / "pyproject.toml"
    cpu = module.requirements(pyproject, ["loadtest"], {"torch"})
    names = [module.requirement_name(r) for r in cpu]
    assert "torch" not in names and "locust" in names and "transformers" in names
    assert module.requirements(pyproject, [], set())[0].startswith("torch==")
    dev = [module.requirement_name(r) for r in module.requirements(pyproject, ["dev"], set())]
    assert "locust" in dev and "zeda" not in dev  # zeda[loadtest] expanded
    with pytest.raises(ValueError, match="no extra"):
        module.requirements(pyproject, ["nope"], set())


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="no shellcheck")
def test_smoke_script_is_shellcheck_clean() -> None:
    done = subprocess.run(["shellcheck", str(ROOT / "docker" / "smoke.sh")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
