"""The process environment ``zeda serve --backend sglang`` prepares before SGLang starts.

SGLang spawns its scheduler and detokenizer as subprocesses, which inherit ``os.environ`` but not
anything patched in this process, so every setting here is an environment variable:

- ``ZEDA_SGLANG_SERVE=1``: the ZEDA plugin (loaded by SGLang in every process) also serves plain
  Qwen3-MoE / GLM4-MoE-Lite checkpoints with ZEDA's loading fixes;
- on a machine without a CUDA device, ``SGLANG_USE_CPU_ENGINE=1`` (SGLang's CPU platform:
  torch-native attention, PyTorch sampling, no CUDA graphs);
- where ``libcuda.so.1`` is missing, the ``common_ops`` stand-in on ``PYTHONPATH`` so that
  ``sgl_kernel`` imports (its loader's last fallback; the scheduler imports it before plugins);
- ``ZEDA_SGLANG_FORWARD_COUNTER``: the shared file the CPU forward counts its slots and times in;
- with tensor parallelism on CPU, ``SGLANG_CPU_OMP_THREADS_BIND``: this process's cores split
  evenly between the ranks (SGLang's default binds one NUMA node per rank, and refuses more
  ranks than nodes); and ``SGLANG_NCCL_SO_PATH`` naming no file, so that SGLang's NCCL
  communicator, which a CUDA build of torch would otherwise find and bind to a CUDA device,
  stays off and the ranks all-reduce over gloo.

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
from zeda_server.sglang_models.forward_counter import COUNTER_ENV
from zeda_server.sglang_models.plugin import SERVE_ENV

CPU_ENGINE_ENV = "SGLANG_USE_CPU_ENGINE"
THREADS_BIND_ENV = "SGLANG_CPU_OMP_THREADS_BIND"
NCCL_PATH_ENV = "SGLANG_NCCL_SO_PATH"
NO_NCCL = "no-nccl-on-the-cpu-engine"


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


def cores_per_rank(cores: list[int], ranks: int) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` for ``ranks`` ranks over ``cores``: contiguous equal groups, ``0-3|4-7``.

    Raises:
        ZedaError: fewer cores than ranks.
    """
    if len(cores) < ranks:
        raise ZedaError(f"--tp-size {ranks} needs at least {ranks} CPU cores; this process may use {len(cores)}")
    size = len(cores) // ranks
    groups = [sorted(cores)[rank * size : (rank + 1) * size] for rank in range(ranks)]
    return "|".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


def prepare_sglang_environment(forward_counter: Path | None = None, tp_size: int = 1) -> SglangPlatform:
    """Set what SGLang's processes need to inherit (see the module docstring); returns the platform.

    Call it before ``sglang`` is imported. Raises ZedaError when ``SGLANG_USE_CPU_ENGINE=0`` is
    set on a machine without a CUDA device, which SGLang could not start on, or when the CPU
    has fewer cores than tensor-parallel ranks.
    """
    os.environ[SERVE_ENV] = "1"
    if forward_counter is not None:
        os.environ[COUNTER_ENV] = str(forward_counter)
    if torch.cuda.is_available():
        return SglangPlatform("cuda")
    if os.environ.setdefault(CPU_ENGINE_ENV, "1") != "1":
        raise ZedaError(f"no CUDA device and {CPU_ENGINE_ENV}={os.environ[CPU_ENGINE_ENV]}: unset it to serve on CPU")
    if not has_cuda_driver():
        prepend_python_path(cpu_shim_dir())
    if tp_size > 1:
        if THREADS_BIND_ENV not in os.environ:
            os.environ[THREADS_BIND_ENV] = cores_per_rank(sorted(os.sched_getaffinity(0)), tp_size)
        os.environ.setdefault(NCCL_PATH_ENV, str(cpu_shim_dir() / NO_NCCL))
    return SglangPlatform("cpu")
