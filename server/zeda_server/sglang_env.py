"""The process environment ``zeda serve --backend sglang`` prepares before SGLang starts.

SGLang spawns its scheduler and detokenizer as subprocesses, which inherit ``os.environ`` but not
anything patched in this process, so every setting here is an environment variable:

- ``ZEDA_SGLANG_SERVE=1``: the ZEDA plugin (loaded by SGLang in every process) also serves plain
  Qwen3-MoE / GLM4-MoE-Lite checkpoints with ZEDA's loading fixes;
- on a machine without a CUDA device, ``SGLANG_USE_CPU_ENGINE=1`` (SGLang's CPU platform:
  torch-native attention, PyTorch sampling, no CUDA graphs);
- where ``libcuda.so.1`` is missing, the ``common_ops`` stand-in on ``PYTHONPATH`` so that
  ``sgl_kernel`` imports (its loader's last fallback; the scheduler imports it before plugins);
- ``ZEDA_SGLANG_SLOT_COUNTER``: the shared file the CPU MoE forward counts its slots in.

On a GPU host only the first and the last are set: the GPU path of SGLang is unchanged.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch

from zeda_core.errors import ZedaError
from zeda_server.sglang_models.plugin import SERVE_ENV
from zeda_server.sglang_models.slot_counter import COUNTER_ENV

CPU_ENGINE_ENV = "SGLANG_USE_CPU_ENGINE"


@dataclass(frozen=True)
class SglangPlatform:
    """Where SGLang will run: ``device`` is ``cpu`` or ``cuda``."""

    device: str

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"


def has_cuda_driver() -> bool:
    """Whether ``libcuda.so.1`` can be loaded (``sgl_kernel`` needs it to import its ops)."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def cpu_shim_dir() -> Path:
    """The directory holding the ``common_ops`` stand-in."""
    return Path(str(files("zeda_server.sglang_models").joinpath("cpu_shim")))


def prepend_python_path(directory: Path) -> None:
    """Put ``directory`` first on this process's ``sys.path`` and on the inherited ``PYTHONPATH``."""
    entries = [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e]
    if str(directory) not in entries:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(directory), *entries])
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))


def prepare_sglang_environment(slot_counter: Path | None = None) -> SglangPlatform:
    """Set what SGLang's processes need to inherit (see the module docstring); returns the platform.

    Call it before ``sglang`` is imported. Raises ZedaError when ``SGLANG_USE_CPU_ENGINE=0`` is
    set on a machine without a CUDA device, which SGLang could not start on.
    """
    os.environ[SERVE_ENV] = "1"
    if slot_counter is not None:
        os.environ[COUNTER_ENV] = str(slot_counter)
    if torch.cuda.is_available():
        return SglangPlatform("cuda")
    if os.environ.setdefault(CPU_ENGINE_ENV, "1") != "1":
        raise ZedaError(f"no CUDA device and {CPU_ENGINE_ENV}={os.environ[CPU_ENGINE_ENV]}: unset it to serve on CPU")
    if not has_cuda_driver():
        prepend_python_path(cpu_shim_dir())
    return SglangPlatform("cpu")
