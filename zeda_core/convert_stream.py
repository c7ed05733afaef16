"""Streaming conversion: inject zero experts into a safetensors checkpoint one tensor at a time.

The in-memory path (``load_model``, ``inject_zero_experts``, ``save_model``) holds the whole
model. :func:`convert_checkpoint` never does: it reads the source (``model.safetensors``, or
``model.safetensors.index.json`` and its shards) with ``safe_open``'s ``pread`` backend, so
only the tensor being copied is in memory, and writes each output shard tensor by tensor.

- Every MoE layer's router gets the rows of :func:`zeda_core.convert.widen_router`, the rule
  ``inject_zero_experts`` applies, drawn in the model's layer order: for a fixed seed the new
  rows are bit-identical to the in-memory conversion's. Its gate ``[N, H]`` becomes
  ``[N + Z, H]``; a selection bias ``[N]`` becomes ``[N + Z]`` (float32); softmax ``preserve``
  adds a ``zero_logit_bias`` ``[Z]`` (float32) next to the gate.
- Every other tensor is copied unchanged, in the source layout (per-expert keys stay per-expert,
  fused stay fused) and dtype, unless a target dtype is given: then floating-point tensors
  (F16, BF16, F32, F64) are cast as they are read, before the router rule sees them.
- Output shards keep the source shards' names. They are written into a temporary directory that
  replaces ``out`` only when complete (:func:`zeda_core.atomic.atomic_directory`), with
  ``config.json`` written last, after the weights.

Memory: the largest tensor plus the new routers of all layers (``L * (N + Z) * H`` elements).
Time: one read and one write of every byte.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from zeda_core.atomic import atomic_directory
from zeda_core.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_INDEX,
    canonical_key,
    checkpoint_config,
    copy_side_files,
    empty_model,
    read_config,
    weight_files,
)
from zeda_core.convert import ZeroInit, record_zero_experts, sparse_blocks, widen_router, zero_expert_spec
from zeda_core.errors import ZedaError
from zeda_core.families import MoeFamily, family_for_config
from zeda_core.spec import RoutingSpec, read_num_zero_experts

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors header dtype -> torch dtype."""
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
CASTABLE = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})
"""Source dtypes a target dtype applies to (fp8 and integer tensors are copied as they are)."""
_HEADER_ALIGNMENT = 8


@dataclass(frozen=True)
class StreamedConversion:
    """What :func:`convert_checkpoint` wrote.

    Attributes:
        out: the output checkpoint directory.
        model_type: the source's HF ``model_type``.
        spec: the routing spec of every converted MoE layer.
        moe_layers: MoE layers converted.
        hidden_size: H, the width of each router row.
        bytes_written: tensor bytes in the output shards.
    """

    out: Path
    model_type: str
    spec: RoutingSpec
    moe_layers: int
    hidden_size: int
    bytes_written: int


@dataclass(frozen=True)
class _Plan:
    """What the config says the output is.

    Attributes:
        config: the output ``config.json`` dict.
        family: the source's MoE family.
        spec: the routing spec after conversion.
        gates: (gate weight key, [N, H]) of each MoE layer in layer order, in the loaded model's names.
        hidden_size: H.
    """

    config: dict[str, Any]
    family: MoeFamily
    spec: RoutingSpec
    gates: list[tuple[str, tuple[int, ...]]]
    hidden_size: int


@dataclass(frozen=True)
class _Router:
    """One MoE layer's router in the source files.

    Attributes:
        prefix: source key prefix of the gate (``model.layers.3.mlp.gate``), in the source's naming.
        shard: the file holding its weight; new router tensors go into the same output shard.
        shape: [N, H], the gate weight shape the config implies.
    """

    prefix: str
    shard: Path
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Entry:
    """One output tensor: its key, header dtype and shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SAFETENSORS_DTYPES[self.dtype].itemsize


def convert_checkpoint(
    source: Path,
    out: str | os.PathLike[str],
    num_zero_experts: int,
    init: ZeroInit = "gaussian",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> StreamedConversion:
    """Write ``source`` with Z zero experts per MoE layer to ``out``, streaming tensor by tensor.

    Args:
        source: a local checkpoint directory (see :func:`zeda_core.checkpoint.resolve_checkpoint`).
        out: output directory; replaced atomically, existing only with ``overwrite``.
        num_zero_experts: Z >= 1.
        init: ``gaussian`` or ``preserve`` (see :mod:`zeda_core.convert`).
        seed: seed of the gaussian rows; the same seed gives the same rows as ``inject_zero_experts``.
        dtype: cast floating-point tensors to this dtype (``torch.bfloat16`` ...); None keeps them.
        progress: show a progress bar over the bytes written.

    Raises:
        ZedaError: naming the file, for a config that is not a MoE of a supported family, has no MoE
            layer or is already a ZEDA checkpoint; a missing, truncated or unreadable shard; a router
            missing or of the wrong shape. Nothing is written then.
    """
    if num_zero_experts < 1:
        raise ZedaError(f"number of zero experts must be >= 1, got {num_zero_experts}")
    if dtype is not None and dtype not in CASTABLE:
        raise ZedaError(f"cannot convert to dtype {dtype}; choose one of {sorted(map(str, CASTABLE))}")
    plan = _plan(source, num_zero_experts, init, dtype)
    headers = {shard: _read_header(shard) for shard in weight_files(source)}
    holder = {key: shard for shard, header in headers.items() for key in header}
    routers = _locate_routers(source, plan, headers, holder)
    replaced = _widen_routers(routers, holder, plan.spec, init, seed, dtype)
    prefix_shard = {router.prefix: router.shard for router in routers}
    home = {key: holder.get(key, prefix_shard[key.rpartition(".")[0]]) for key in replaced}
    shards = {shard: _entries(shard, header, replaced, home, dtype) for shard, header in headers.items()}
    total = sum(entry.nbytes for entries in shards.values() for entry in entries)
    with (
        atomic_directory(out, overwrite=overwrite) as tmp,
        tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not progress) as bar,
    ):
        for shard, entries in shards.items():
            _write_shard(tmp / shard.name, entries, _tensors(shard, entries, replaced, dtype), bar)
        if (source / WEIGHTS_INDEX).is_file():
            _write_index(tmp / WEIGHTS_INDEX, shards, total)
        copy_side_files(source, tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    return StreamedConversion(
        out=Path(out).expanduser().resolve(),
        model_type=plan.family.model_type,
        spec=plan.spec,
        moe_layers=len(routers),
        hidden_size=plan.hidden_size,
        bytes_written=total,
    )


def _plan(source: Path, num_zero_experts: int, init: ZeroInit, dtype: torch.dtype | None) -> _Plan:
    """Read the output's config, spec and MoE layers off the source config.

    The model is built on the meta device, so its MoE layers, their order and their gate shapes are
    those ``inject_zero_experts`` sees, at no memory cost.
    """
    config_path = source / CONFIG_FILE
    raw = read_config(source)
    already = read_num_zero_experts(raw)
    if already:
        raise ZedaError(f"{config_path}: already a ZEDA checkpoint with {already} zero experts per layer")
    try:
        family = family_for_config(raw)
        model = empty_model(raw)
        spec = zero_expert_spec(model.config, family, num_zero_experts, init)
        blocks = sparse_blocks(model, family)
    except ZedaError as exc:
        raise ZedaError(f"{config_path}: {exc}") from exc
    if not blocks:
        raise ZedaError(f"{config_path}: model of type {raw['model_type']!r} has no MoE layer to convert")
    record_zero_experts(model.config, spec)
    config = checkpoint_config(model)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    gates = [(f"{name}.gate.weight", tuple(block.gate.weight.shape)) for name, _, block in blocks]
    return _Plan(config, family, spec, gates, model.config.hidden_size)


def _read_header(shard: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (safetensors dtype, shape)} of one shard, in file order; checks the file is complete."""
    try:
        with safe_open(shard, framework="pt", backend="pread") as handle:
            views = {key: handle.get_slice(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
            header = {key: (view.get_dtype(), tuple(view.get_shape())) for key, view in views.items()}
    except Exception as exc:  # safetensors raises its own error types for corrupt or truncated files
        raise ZedaError(f"cannot read weights {shard}: {exc}") from exc
    unknown = sorted({dtype for dtype, _ in header.values()} - SAFETENSORS_DTYPES.keys())
    if unknown:
        raise ZedaError(f"{shard}: unsupported tensor dtype {unknown[0]}")
    return header


def _locate_routers(
    source: Path, plan: _Plan, headers: dict[Path, dict[str, tuple[str, tuple[int, ...]]]], holder: dict[str, Path]
) -> list[_Router]:
    """Each MoE layer's router in the source files, in layer order, with its shape checked."""
    source_keys = {canonical_key(key, plan.family): key for key in holder}
    routers = []
    for gate_key, shape in plan.gates:
        if gate_key not in source_keys:
            raise ZedaError(f"{source}: no weights for the MoE router {gate_key}")
        key = source_keys[gate_key]
        shard = holder[key]
        got = headers[shard][key][1]
        if got != shape:
            raise ZedaError(f"{shard}: {key} has shape {list(got)}, the config implies {list(shape)}")
        routers.append(_Router(prefix=key.removesuffix(".weight"), shard=shard, shape=shape))
    return routers


def _widen_routers(
    routers: list[_Router],
    holder: dict[str, Path],
    spec: RoutingSpec,
    init: ZeroInit,
    seed: int,
    dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    """{source-layout key: new tensor} of every router, drawn in layer order from one generator."""
    generator = torch.Generator().manual_seed(seed)
    replaced: dict[str, torch.Tensor] = {}
    for router in routers:
        weight = _read_tensor(router.shard, f"{router.prefix}.weight", dtype)
        bias = _read_bias(router, holder, dtype) if spec.selection_bias else None
        rows = widen_router(weight, bias, spec, init, generator)
        replaced.update({f"{router.prefix}.{name}": tensor for name, tensor in rows.tensors().items()})
    return replaced


def _read_bias(router: _Router, holder: dict[str, Path], dtype: torch.dtype | None) -> torch.Tensor:
    """The router's [N] selection bias, checked against the gate's N."""
    key = f"{router.prefix}.e_score_correction_bias"
    if key not in holder:
        raise ZedaError(f"{router.shard}: no selection bias {key} next to the router")
    bias = _read_tensor(holder[key], key, dtype)
    if tuple(bias.shape) != router.shape[:1]:
        raise ZedaError(f"{holder[key]}: {key} has shape {list(bias.shape)}, the config implies {[router.shape[0]]}")
    return bias


def _read_tensor(shard: Path, key: str, dtype: torch.dtype | None) -> torch.Tensor:
    with safe_open(shard, framework="pt", backend="pread") as handle:
        return _cast(handle.get_tensor(key), dtype)


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.dtype in CASTABLE else tensor


def _entries(
    shard: Path,
    header: dict[str, tuple[str, tuple[int, ...]]],
    replaced: dict[str, torch.Tensor],
    home: dict[str, Path],
    dtype: torch.dtype | None,
) -> list[_Entry]:
    """The output tensors of one shard: its own (dtype applied) and the router tensors that live here,
    wider dtypes first so that every tensor starts aligned to its element size."""
    entries = []
    for key, (name, shape) in header.items():
        if key not in replaced:
            castable = dtype is not None and SAFETENSORS_DTYPES[name] in CASTABLE
            entries.append(_Entry(key, _DTYPE_NAMES[dtype] if castable else name, shape))
    for key, tensor in replaced.items():
        if home[key] == shard:
            entries.append(_Entry(key, _DTYPE_NAMES[tensor.dtype], tuple(tensor.shape)))
    return sorted(entries, key=lambda e: (-SAFETENSORS_DTYPES[e.dtype].itemsize, e.key))


def _tensors(
    shard: Path, entries: list[_Entry], replaced: dict[str, torch.Tensor], dtype: torch.dtype | None
) -> Iterator[torch.Tensor]:
    """The tensors of ``entries``, in order, one at a time."""
    with safe_open(shard, framework="pt", backend="pread") as handle:
        for entry in entries:
            yield replaced[entry.key] if entry.key in replaced else _cast(handle.get_tensor(entry.key), dtype)


def _write_shard(path: Path, entries: list[_Entry], tensors: Iterator[torch.Tensor], bar: tqdm) -> None:
    """Write a safetensors file: header, then each tensor's bytes as ``tensors`` yields them."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        header[entry.key] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % _HEADER_ALIGNMENT)
    with _synced(path) as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for entry, tensor in zip(entries, tensors, strict=True):
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            bar.update(entry.nbytes)


@contextmanager
def _synced(path: Path) -> Iterator[Any]:
    """A binary file opened for writing, flushed to disk on close."""
    with path.open("wb") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def _write_index(path: Path, shards: dict[Path, list[_Entry]], total: int) -> None:
    weight_map = {entry.key: shard.name for shard, entries in shards.items() for entry in entries}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(index, indent=2) + "\n")
