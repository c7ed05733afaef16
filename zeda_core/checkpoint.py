"""Checkpoints: safetensors only, written atomically, read back with ``zeda_core`` alone.

A ZEDA checkpoint is the family's own layout plus Z extra gate rows, with the config keys of
the published ZEDA models (``model_type: <family>_plus_plus``, ``architectures:
[<Family>PlusPlusForCausalLM]``, ``zce_nums``, ``zce_types``, ``use_zce_mask``). The loader also
reads plain MoE checkpoints and the per-expert (transformers 4.x) layout of the published
reference checkpoints (``mlp.experts.{e}.gate_proj|up_proj|down_proj.weight``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from zeda_core.atomic import atomic_directory
from zeda_core.convert import inject_zero_experts
from zeda_core.errors import ZedaError
from zeda_core.families import MoeFamily, family_for_config
from zeda_core.model_queries import hf_config
from zeda_core.moe_backends import set_moe_backend
from zeda_core.spec import read_num_zero_experts

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
SIDE_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|vocab\..*|merges\.txt|chat_template\..*|generation_config\.json)$"
)
ROUTER_KEY = re.compile(r"\.mlp\.gate\.\w+$")  # a router weight: its rows, selection bias, zero-row offset
_EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<idx>\d+)\.(?P<proj>\w+)\.weight$")
_ALIGNMENT = 64
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_checkpoint(path_or_id: str | os.PathLike[str]) -> Path:
    """A local checkpoint directory, downloading a hub id (config, weights, tokenizer) if needed."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise ZedaError(f"{path} has no {CONFIG_FILE}: not a model checkpoint")
        return path
    if path.exists():
        raise ZedaError(f"{path} is a file; a model checkpoint is a directory")
    if not _HUB_ID.match(str(path_or_id)):
        raise ZedaError(f"model path {str(path_or_id)!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception as exc:  # the hub client raises many types; all mean "not available"
        raise ZedaError(
            f"model {str(path_or_id)!r} is neither a local directory nor a reachable hub id: {exc}"
        ) from exc
    return Path(local)


def read_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint by the names the loaded model uses (per-expert keys fused).

    Raises:
        ZedaError: no safetensors weights, or a file that does not read as safetensors.
    """
    return _to_fused_layout(_read_weights(checkpoint), family_for_config(read_config(checkpoint)))


def read_config(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict."""
    try:
        return json.loads((checkpoint / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ZedaError(f"cannot read {checkpoint / CONFIG_FILE}: {exc}") from exc


def load_model(
    path_or_id: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    zero_aware: bool = True,
    attn_implementation: str | None = None,
    moe_backend: str = "auto",
) -> PreTrainedModel:
    """Load a ZEDA, reference-format or plain MoE checkpoint as a HF causal LM in eval mode.

    Args:
        path_or_id: local directory or hub id.
        dtype: cast parameters to this dtype; ``None`` keeps the checkpoint's.
        device: where the model lives.
        zero_aware: swap in zero-aware MoE blocks (always, for Z > 0; with Z = 0 they route
            exactly like the original). ``False`` returns the unmodified HF model of a plain MoE.
        attn_implementation: HF attention backend (``sdpa``, ``eager``, ...); default: HF's choice.
        moe_backend: what computes the zero-aware blocks' experts: ``auto`` (the Triton kernel on
            CUDA, torch elsewhere), ``torch`` or ``triton`` (see :mod:`zeda_core.moe_backends`);
            checked against ``device`` before any weight is read.

    Returns:
        A module with the HF interface: ``model(input_ids).logits`` is [B, S, vocab].
    """
    checkpoint = resolve_checkpoint(path_or_id)
    raw = read_config(checkpoint)
    family = family_for_config(raw)
    num_zero = read_num_zero_experts(raw)
    if num_zero and not zero_aware:
        raise ZedaError(f"{checkpoint} is a ZEDA checkpoint with {num_zero} zero experts; load it zero-aware")
    model = empty_model(raw, attn_implementation=attn_implementation)
    if zero_aware:
        inject_zero_experts(model, num_zero, init=None)
    set_moe_backend(model, moe_backend, device=device)
    state = _to_fused_layout(_read_weights(checkpoint), family)
    _assign_weights(model, state, checkpoint)
    if (checkpoint / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(checkpoint)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


def check_router_weights(path_or_id: str | os.PathLike[str]) -> None:
    """Refuse a checkpoint whose router weights (``*.mlp.gate.*``) are not the ones its config implies,
    by name and shape (N + Z gate rows, the zero rows' offset, the selection bias).

    Reads safetensors headers only (no tensor data), so it is cheap on any model
    size: a serving backend that loads weights by name (SGLang's skips names it does not know)
    runs it before it starts.

    Raises:
        ZedaError: a router weight the config implies is missing, one it does not imply is there
            (e.g. ``zero_logit_bias`` under a config that says ``zeda_zero_logit_bias: false``), or
            one has another shape.
    """
    checkpoint = resolve_checkpoint(path_or_id)
    raw = read_config(checkpoint)
    family = family_for_config(raw)
    model = empty_model(raw)
    inject_zero_experts(model, read_num_zero_experts(raw), init=None)
    expected = {key: list(t.shape) for key, t in model.state_dict().items() if ROUTER_KEY.search(key)}
    stored: dict[str, list[int]] = {}
    for shard in weight_files(checkpoint):
        try:
            with safe_open(shard, framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    name = canonical_key(key, family)
                    if ROUTER_KEY.search(name):
                        stored[name] = list(handle.get_slice(key).get_shape())
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ZedaError(f"cannot read weights {shard}: {exc}") from exc
    missing, unexpected = sorted(expected.keys() - stored.keys()), sorted(stored.keys() - expected.keys())
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ZedaError(f"{checkpoint}: router weights do not match the config ({detail})")
    for key, shape in expected.items():
        if stored[key] != shape:
            raise ZedaError(f"{checkpoint}: {key} has shape {stored[key]}, the config implies {shape}")


def empty_model(raw: dict[str, Any], attn_implementation: str | None = None) -> PreTrainedModel:
    """The HF causal LM a ``config.json`` dict describes, with its weights on the meta device (no memory)."""
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(hf_config(raw), attn_implementation=attn_implementation)


def save_model(
    model: PreTrainedModel,
    out_dir: str | os.PathLike[str],
    overwrite: bool = False,
    side_files_from: Path | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write config and safetensors weights to ``out_dir`` atomically (temp dir + rename).

    Tokenizer and generation files are copied from ``side_files_from`` when given.
    """
    out = Path(out_dir).expanduser().resolve()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        if side_files_from is not None:
            copy_side_files(side_files_from, tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(checkpoint_config(model), indent=2, sort_keys=True) + "\n")
        _write_weights(_unique_state_dict(model), tmp, max_shard_size)
    return out


def checkpoint_config(model: PreTrainedModel) -> dict[str, Any]:
    """The ``config.json`` dict of a (possibly zero-aware) model, in the published ZEDA format."""
    config = model.config.to_dict()
    family = family_for_config(config)
    zero = read_num_zero_experts(config) > 0
    config["model_type"] = family.plus_plus_model_type if zero else family.model_type
    config["architectures"] = [family.plus_plus_architecture if zero else family.architecture]
    return config


def copy_side_files(source: Path, directory: Path) -> None:
    """Copy the tokenizer and generation files (:data:`SIDE_FILES`) of checkpoint ``source`` into ``directory``."""
    for item in source.iterdir():
        if item.is_file() and SIDE_FILES.match(item.name):
            shutil.copy2(item, directory / item.name)


def weight_files(checkpoint: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index lists (sorted), or ``model.safetensors``.

    Raises:
        ZedaError: no safetensors weights, an unreadable index, or a shard the index lists that is missing.
    """
    index = checkpoint / WEIGHTS_INDEX
    if not index.is_file():
        if (checkpoint / WEIGHTS_FILE).is_file():
            return [checkpoint / WEIGHTS_FILE]
        raise ZedaError(f"{checkpoint} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX}; weights load through safetensors only")
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ZedaError(f"cannot read {index}: {exc!r}") from exc
    missing = [shard for shard in shards if not (checkpoint / shard).is_file()]
    if missing:
        raise ZedaError(f"{index} lists {checkpoint / missing[0]}, which does not exist")
    return [checkpoint / shard for shard in shards]


def canonical_key(key: str, family: MoeFamily) -> str:
    """A checkpoint key under the names the loaded model uses (the family's legacy renames applied)."""
    for old, new in family.legacy_renames:
        key = key.replace(old, new)
    return key


def _read_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in weight_files(checkpoint):
        try:
            state.update(load_file(shard))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ZedaError(f"cannot read weights {shard}: {exc}") from exc
    # safetensors may hand out tensors at unaligned offsets; CPU kernels then take another SIMD
    # path and results differ in the last bit. Aligned copies keep reloads bit-identical.
    return {k: v if v.data_ptr() % _ALIGNMENT == 0 else v.clone() for k, v in state.items()}


def _to_fused_layout(state: dict[str, torch.Tensor], family: MoeFamily) -> dict[str, torch.Tensor]:
    """Legacy per-expert keys -> transformers 5 fused ``gate_up_proj`` [N, 2I, H] / ``down_proj`` [N, H, I]."""
    fused: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[tuple[str, int], torch.Tensor]] = defaultdict(dict)
    for key, tensor in state.items():
        key = canonical_key(key, family)
        match = _EXPERT_KEY.match(key)
        if match and match["proj"] in family.legacy_expert_names:
            per_expert[match["prefix"]][(match["proj"], int(match["idx"]))] = tensor
        else:
            fused[key] = tensor
    gate_name, up_name, down_name = family.legacy_expert_names
    for prefix, parts in per_expert.items():
        num = 1 + max(idx for _, idx in parts)
        missing = [
            f"{prefix}.{e}.{p}" for e in range(num) for p in (gate_name, up_name, down_name) if (p, e) not in parts
        ]
        if missing:
            raise ZedaError(f"checkpoint lacks expert weights, e.g. {missing[0]}.weight")
        fused[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(gate_name, e)], parts[(up_name, e)]], dim=0) for e in range(num)]
        )
        fused[f"{prefix}.down_proj"] = torch.stack([parts[(down_name, e)] for e in range(num)])
    return fused


def _assign_weights(model: nn.Module, state: dict[str, torch.Tensor], checkpoint: Path) -> None:
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and expected[key].shape != tensor.shape:
            raise ZedaError(
                f"{checkpoint}: {key} has shape {list(tensor.shape)}, the config implies {list(expected[key].shape)}"
            )
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = set(tied_keys(model))
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise ZedaError(f"{checkpoint}: weights do not match the config ({detail})")
    model.tie_weights()
    still_empty = [name for name, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise ZedaError(f"{checkpoint}: no weights for {still_empty[:3]}")


def tied_keys(model: nn.Module) -> list[str]:
    """State-dict keys that alias another weight (not stored in checkpoints)."""
    if getattr(model.config, "tie_word_embeddings", False):
        return ["lm_head.weight"]
    return []


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates, as contiguous CPU tensors."""
    tied = set(tied_keys(model))
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in tied}


def _write_weights(state: dict[str, torch.Tensor], directory: Path, max_shard_size: str) -> None:
    split = split_torch_state_dict_into_shards(
        state, max_shard_size=max_shard_size, filename_pattern="model{suffix}.safetensors"
    )
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, directory / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
