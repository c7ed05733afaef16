"""Validation of a checkpoint before it is swapped into a running server, and the new version it yields.

Checks, in order, each refusing with a :class:`CandidateRejected` that names what is wrong:
the checkpoint reads (config and safetensors), its routing spec equals the served one, it has
every weight the swap needs and each has the served shape, a floating dtype and only finite
values. The torch engine then builds the new model and runs a smoke generation on it; only a
candidate that passes everything reaches :meth:`TorchEngine.swap`.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Literal

import torch

from zeda_core.checkpoint import ROUTER_KEY, read_config, read_state, resolve_checkpoint, tied_keys
from zeda_core.errors import ZedaError
from zeda_core.model_queries import model_spec, spec_from_config
from zeda_core.spec import RoutingSpec
from zeda_server.versions import ModelVersion, checkpoint_fingerprint, router_fingerprint

Scope = Literal["router", "all"]
SMOKE_PROMPT = "Hello"
SMOKE_TOKENS = 4


class CandidateRejected(Exception):
    """The checkpoint may not be swapped in; the message says why."""


def candidate_weights(
    candidate: str | Path, served_spec: RoutingSpec, expected: dict[str, torch.Tensor], scope: Scope
) -> dict[str, torch.Tensor]:
    """The candidate's tensors to install, after the file-level checks.

    Args:
        candidate: checkpoint directory.
        served_spec: the served model's :class:`RoutingSpec` (``zero_logit_bias`` ignored).
        expected: name -> tensor of the served weights (shapes and names to match).
        scope: ``router`` takes only the router rows (``*.mlp.gate.*``), ``all`` every weight.

    Returns:
        name -> tensor, exactly the in-scope names of ``expected``.
    """
    try:
        checkpoint = resolve_checkpoint(candidate)
        spec = spec_from_config(read_config(checkpoint))
        state = read_state(checkpoint)
    except ZedaError as exc:
        raise CandidateRejected(f"cannot read checkpoint: {exc}") from exc
    if dataclasses.replace(spec, zero_logit_bias=False) != dataclasses.replace(served_spec, zero_logit_bias=False):
        raise CandidateRejected(f"routing spec differs from the served model's: {spec} vs {served_spec}")
    wanted = [name for name in expected if scope == "all" or ROUTER_KEY.search(name)]
    missing = [name for name in wanted if name not in state]
    if missing:
        raise CandidateRejected(f"checkpoint lacks {len(missing)} weight(s) of the served model, e.g. {missing[0]}")
    if scope == "all":
        extra = sorted(set(state) - set(expected))
        if extra:
            raise CandidateRejected(f"checkpoint has weights the served model lacks, e.g. {extra[0]}")
    for name in wanted:
        tensor, served = state[name], expected[name]
        if tensor.shape != served.shape:
            raise CandidateRejected(f"{name} has shape {list(tensor.shape)}, the served model {list(served.shape)}")
        if not tensor.is_floating_point():
            raise CandidateRejected(f"{name} has dtype {tensor.dtype}; weights must be floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise CandidateRejected(f"{name} has non-finite values (NaN or inf)")
    return {name: state[name] for name in wanted}


def prepare_version(current: ModelVersion, candidate: str | Path, scope: Scope, tokenizer) -> ModelVersion:
    """A new :class:`ModelVersion`: ``current``'s model with the candidate's weights, smoke-tested.

    Runs off the engine thread; ``current`` keeps serving meanwhile (it is copied, not changed).
    """
    model = current.model
    served_spec = model_spec(model)
    tied = set(tied_keys(model))
    expected = {k: v for k, v in model.state_dict().items() if k not in tied}
    weights = candidate_weights(candidate, served_spec, expected, scope)
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        params = fresh.state_dict()
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].dtype))
    _smoke_generate(fresh, tokenizer)
    source_fp = checkpoint_fingerprint(resolve_checkpoint(candidate))
    if scope == "router":
        source_fp = router_fingerprint(current.fingerprint, source_fp)
    return ModelVersion(source_fp, str(candidate), scope, model=fresh)


@torch.inference_mode()
def _smoke_generate(model: torch.nn.Module, tokenizer) -> None:
    """Greedy-generate a few tokens; refuse a model whose logits are not finite."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(SMOKE_PROMPT).input_ids], device=device)
    try:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=SMOKE_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    except Exception as exc:  # any failure of the new weights refuses them
        raise CandidateRejected(f"smoke generation failed: {type(exc).__name__}: {exc}") from exc
    if not all(bool(torch.isfinite(logits).all()) for logits in out.logits):
        raise CandidateRejected("smoke generation produced non-finite logits")
