"""The compute dial on the SGLang backend: zero-expert offsets (logits) that reach every MoE layer.

Two offsets add up on every token (see ``zeda_core.routing.route``):

- the server-wide offset: a float32 parameter ``model.layers.{i}.mlp.topk.zero_offset`` of shape [1]
  in every zero-aware MoE layer, 0 at load (no checkpoint holds it), set in place through SGLang's
  ``update_weights_from_tensor`` (:func:`server_offset_weights`). An in-place copy also reaches
  CUDA-graph replays;
- a request's own offset (``zero_expert_bias``): SGLang passes no per-request value to the model
  forward, but it does pass each request's id (``ForwardBatch.rids``), so the engine tags the ids
  of requests with an offset (:func:`tagged_rid`), and each forward turns the batch's ids into
  per-token offsets (:class:`RequestOffsets`). That runs in Python at every forward, so it holds
  only where every forward runs eagerly (SGLang's CPU engine); a CUDA-graph replay would not see it.

This module imports no SGLang.
"""

from __future__ import annotations

import uuid
from typing import Any

import torch

from zeda_core.errors import ZedaError

OFFSET_PARAMETER = "zero_offset"
RID_MARK = "~zero-offset="


def server_offset_weights(moe_layers: list[int], offset: float) -> dict[str, torch.Tensor]:
    """The weight update that makes ``offset`` (logits) the server-wide offset of MoE layers ``moe_layers``."""
    value = torch.tensor([offset], dtype=torch.float32)
    return {f"model.layers.{layer}.mlp.topk.{OFFSET_PARAMETER}": value for layer in moe_layers}


def tagged_rid(offset: float) -> str:
    """A fresh SGLang request id that carries the request's zero offset (exactly, as a hex float)."""
    return f"{uuid.uuid4().hex}{RID_MARK}{float(offset).hex()}"


def rid_offset(rid: str) -> float:
    """The zero offset a request id carries; 0 for an id :func:`tagged_rid` did not make."""
    _, mark, value = rid.rpartition(RID_MARK)
    return float.fromhex(value) if mark else 0.0


def cache_salt(offset: float) -> str | None:
    """SGLang's prefix-cache salt for a request routed with total ``offset``: cached KV is only shared
    between requests routed alike; None (SGLang's unsalted cache) at offset 0."""
    return None if offset == 0 else f"zeda-zero-offset={float(offset).hex()}"


class RequestOffsets:
    """The per-token request offsets of the forward in progress, shared by a model's MoE layers.

    The model sets them from the batch before each forward (:meth:`update`); every zero-aware top-k
    reads them (:meth:`of`). ``tokens`` is [T] float32, or None when no request in the batch has one.
    """

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None

    def update(self, forward_batch: Any, num_tokens: int, device: torch.device) -> None:
        """Read the offsets of ``forward_batch`` (an SGLang ``ForwardBatch`` of ``num_tokens`` tokens).

        Raises:
            ZedaError: requests carry offsets in a forward whose tokens cannot be mapped to them
                (speculative decoding).
        """
        rids = forward_batch.rids or []
        offsets = [rid_offset(rid) for rid in rids]
        if not any(offsets):
            self.tokens = None
            return
        if forward_batch.forward_mode.is_decode():
            counts = [1] * len(rids)
        elif forward_batch.extend_seq_lens_cpu is not None:
            counts = list(forward_batch.extend_seq_lens_cpu)
        else:
            counts = []
        if sum(counts) != num_tokens or len(counts) != len(rids):
            mode = forward_batch.forward_mode.name
            raise ZedaError(f"{mode} forward of {num_tokens} tokens: per-request zero offsets are not supported here")
        per_request = torch.tensor(offsets, dtype=torch.float32)
        self.tokens = per_request.repeat_interleave(torch.tensor(counts)).to(device)

    def of(self, num_tokens: int) -> torch.Tensor | None:
        """[num_tokens] float32 request offsets of the tokens a MoE layer routes, or None (all 0).

        Raises:
            ZedaError: the layer routes other tokens than the forward holds (e.g. gathered across
                attention data-parallel ranks).
        """
        if self.tokens is not None and self.tokens.shape[0] != num_tokens:
            raise ZedaError(f"a MoE layer routes {num_tokens} tokens, the forward holds {self.tokens.shape[0]}")
        return self.tokens
