"""Sharded parameters (FSDP2, DeepSpeed ZeRO-3) as the training loop and the stages meet them.

With sharded parameters every process holds a slice of each weight, and a forward all-gathers
the slices of each shard unit as it runs. Three things follow:

- every process must run the same forwards (the same number of them, in the same order), so a
  stage that runs a data-dependent number of forwards (generation) first gathers the full
  parameters once (:func:`full_parameters`);
- the final model is gathered into a plain module (:func:`gathered_model`), so that it saves as a
  normal ZEDA checkpoint;
- DeepSpeed, through accelerate 1.16, needs a gloo group without GPUs, a nominal batch size, no
  ``zero.Init`` at model build, and the MoE blocks as ZeRO-3 leaves (:func:`prepare_deepspeed`,
  :func:`zero3_leaf_blocks`); OPD and the zero ramp refuse ZeRO-3 (see the stages);
- accelerate 1.16 keeps CPU processes on plain data parallelism even when FSDP is configured
  (its ``AcceleratorState`` turns only accelerator device types into FSDP), while torch's FSDP2
  runs on CPU over gloo: :func:`enable_fsdp_on_cpu` switches such processes to FSDP.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
    get_torch_accelerator_backend,
    parse_flag_from_env,
)
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers.integrations import unset_hf_deepspeed_config

from zeda_core.moe import ZeroExpertMoeBlock


def enable_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Turn CPU processes launched with an FSDP config (``ACCELERATE_USE_FSDP``) into FSDP processes.

    ``accelerate launch --config_file <fsdp config>`` with ``ACCELERATE_USE_CPU=true`` starts CPU
    processes in one gloo group with the FSDP settings in the environment, but accelerate then
    runs them as ``MULTI_CPU`` (DDP). Here the state takes the FSDP plugin those settings
    describe, so that ``prepare``, ``save_state``/``load_state``, ``get_state_dict`` and
    gradient clipping take accelerate's FSDP paths, as on GPUs. Anything else is left as it is.
    """
    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
        state.distributed_type = DistributedType.FSDP
        # Where AcceleratorState records it too: each later AcceleratorState() copies it back.
        PartialState().distributed_type = DistributedType.FSDP


def deepspeed_process_group() -> list[InitProcessGroupKwargs]:
    """The kwargs handler that DeepSpeed processes without an accelerator device need: a gloo group.

    accelerate 1.16 finds no process-group backend on a host without GPUs, and then counts each
    DeepSpeed process as a run of its own (``num_processes`` 1). Elsewhere: none.
    """
    on_cpu = get_torch_accelerator_backend()[0] is None and parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    return [InitProcessGroupKwargs(backend="gloo")] if on_cpu else []


def prepare_deepspeed(accelerator: Accelerator) -> None:
    """What DeepSpeed needs before the stages build their models and call ``prepare``.

    - The batch size it asks for at ``prepare``: one batch per process per step. The stages build
      their batches themselves (no dataloader goes through ``prepare``) and take one optimizer
      step per global batch; DeepSpeed uses the number only to account its batches.
    - Under ZeRO-3, accelerate registers transformers' DeepSpeed config, so that every model
      built from a config is built under ``deepspeed.zero.Init``, which breaks the meta-device
      build of :func:`zeda_core.load_model`; it is unset (the model is partitioned at ``prepare``).
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    if plugin.is_auto("train_micro_batch_size_per_gpu"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
    unset_hf_deepspeed_config()


def deepspeed_zero3(accelerator: Accelerator) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the parameters (outside a forward, a process holds none)."""
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin.zero_stage == 3


def zero3_leaf_blocks(accelerator: Accelerator, model: nn.Module) -> None:
    """Under ZeRO-3, gather each zero-aware MoE block's parameters as one (before ``prepare``).

    The block computes its experts from their weights itself, not through their modules'
    forwards, so ZeRO-3's per-module gathering would miss them in the backward.
    """
    if deepspeed_zero3(accelerator):
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [ZeroExpertMoeBlock])


def shards_parameters(accelerator: Accelerator) -> bool:
    """Whether the prepared model's parameters are sharded over processes (FSDP or DeepSpeed)."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def plain_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (not yet prepared) whose parameters are empty, on the meta device.

    Buffers are copied (they are small, and non-persistent ones are in no state dict). It costs
    no parameter memory, and takes the gathered weights in :func:`gathered_model`.
    """
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


def gathered_model(accelerator: Accelerator, model: nn.Module, twin: nn.Module) -> nn.Module:
    """The prepared sharded ``model``'s full weights in its :func:`plain_twin`, on the main process.

    Every process must call it (the weights are gathered from all of them). Other processes get
    ``twin`` back without weights; only the main process's model is meant to be saved.
    """
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        twin.load_state_dict(state, assign=True)
    return twin


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Inside, every FSDP2 unit of ``model`` holds its full parameters and its forwards communicate nothing.

    Under FSDP2 a forward all-gathers each unit's parameters and frees them after it, so all
    processes must run the same forwards. Sampling runs as many forwards as its sampled tokens
    need, which differ between processes: inside this block the units are gathered once (a full
    copy of the parameters on each process, for no-grad forwards) and kept until it ends. A model
    without FSDP2 units is left as it is.

    The units' reshard-after-forward settings are saved and restored as torch 2.14 keeps them
    (``post_forward_mesh_info`` of each parameter group); the root is initialised first, since its
    first forward would otherwise set its own.
    """
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    units[0]._get_fsdp_state()._lazy_init()
    groups = [group for unit in units for group in unit._get_fsdp_state()._fsdp_param_groups]
    saved = [group.post_forward_mesh_info for group in groups]
    for group in groups:
        group.post_forward_mesh_info = None
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        for group, info in zip(groups, saved, strict=True):
            group.post_forward_mesh_info = info
