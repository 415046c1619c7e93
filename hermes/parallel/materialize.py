"""Filling a model that was built on the meta device, sharded (tensor parallel, FSDP) and then materialised
with `to_empty`, so that it holds what a single process would: whole tensors are cut to each rank's shards,
and random initialisation draws the whole tensor, as one process does, and keeps this rank's part.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

from hermes.model.hf import is_dtensor
from hermes.model.lora import LoRALinear, lora_layers, lora_state_dict, unwrap_lora

# A LoRA-adapted projection keeps the plain model's Linear as its child `base` (hermes.model.lora).
_LORA_BASE = re.compile(r"(.+)\.base\.(weight)")


def plain_name(name: str) -> str:
    """The plain model's name of a state dict entry: a LoRA base weight "layers.0.attention.wq.base.weight"
    is "layers.0.attention.wq.weight"; any other name is itself."""
    base = _LORA_BASE.fullmatch(name)
    return f"{base[1]}.{base[2]}" if base else name


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights that a plain checkpoint holds, by the plain model's name (LoRA adapters, which no
    base checkpoint holds, are left out). The tensors share storage with the parameters (DTensors stay
    DTensors): writing into them fills the model."""
    adapters = lora_state_dict(model)
    return {plain_name(name): t for name, t in model.state_dict().items() if name not in adapters}


def _local_part(target: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """The part of `whole` that `target` holds on this rank: its shard for a DTensor, else all of it."""
    if is_dtensor(target):
        # src_data_rank=None: every rank cuts its own part of its own copy, no communication.
        return distribute_tensor(whole, target.device_mesh, target.placements, src_data_rank=None).to_local()
    return whole


def _copy_part(target: torch.Tensor, whole: torch.Tensor) -> None:
    local = target.to_local() if is_dtensor(target) else target
    local.copy_(_local_part(target, whole.to(local.device)))


@torch.no_grad()
def copy_whole_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy into each weight of `model` (sharded or not) its part of the whole tensor `state` holds under the
    plain model's name (see `base_weights`); the values are converted to the weight's dtype.

    Raises:
        KeyError: `state` lacks a weight of the model (the model and the state differ in shape).
    """
    for name, target in base_weights(model).items():
        _copy_part(target, state[name])


def _merged_part(layer: LoRALinear) -> torch.Tensor:
    """This rank's part of a LoRA layer's base weight plus (alpha / r) * B @ A, in float32 (the update is
    formed whole, one layer at a time, on the weight's device). Collective: the adapters are gathered."""
    weight = layer.base.weight
    local = weight.to_local() if is_dtensor(weight) else weight
    return local.float() + _local_part(weight, layer.delta_weight().to(local.device))


@torch.no_grad()
def merge_lora_into_shards(model: nn.Module) -> nn.Module:
    """`hermes.model.lora.merge_lora` for a sharded model: each rank adds to its shard of every base weight
    its part of the adapter's update, then the base Linears go back in place. Collective.

    The merged model serves its weights (`state_dict`, `hermes.parallel.sharded_hf.save_sharded`); its
    parallel wrappers still hold the dropped adapters, so it is not for further training (for a copy that
    leaves the model trainable, see `merged_weights`).
    """
    for _, layer in lora_layers(model):
        weight = layer.base.weight
        (weight.to_local() if is_dtensor(weight) else weight).copy_(_merged_part(layer))
    return unwrap_lora(model)


@torch.no_grad()
def merged_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """`base_weights(model)` with every LoRA layer's update added, in new tensors (sharded as the weights
    are): what the merged model would hold, while the model itself stays as it is and trainable. Costs one
    more copy of this rank's shards of the adapted weights. Collective."""
    weights = base_weights(model)
    for name, layer in lora_layers(model):
        weight = layer.base.weight
        merged = _merged_part(layer).to(weight.dtype)
        if is_dtensor(weight):
            merged = DTensor.from_local(
                merged, weight.device_mesh, weight.placements, shape=weight.shape, stride=weight.stride()
            )
        weights[f"{name}.weight"] = merged
    return weights


class _WholeTensorDraws(TorchDispatchMode):
    """In-place random fills of DTensors draw the whole tensor on the CPU from the default generator, as
    one process would, and keep this rank's part; the number of draws, and so the generator's state
    afterwards, do not depend on the mesh. Every other op runs as usual."""

    _FILLS = (torch.ops.aten.uniform_.default, torch.ops.aten.normal_.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._FILLS and is_dtensor(args[0]):
            target = args[0]
            whole = torch.empty(target.shape, dtype=target.dtype)
            func(whole, *args[1:], **kwargs)
            _copy_part(target, whole)
            return target
        return func(*args, **kwargs)


@contextmanager
def draws_as_one_process() -> Iterator[None]:
    """Inside, random initialisation (`nn.init.*`, `reset_parameters`) of sharded parameters gives the
    values it gives the unsharded model in one process with the same seed, whatever the mesh.

    Each random fill of a DTensor draws the whole tensor, one at a time, on the CPU: use it for small
    tensors (LoRA adapters) or accept one whole tensor's memory at a time.
    """
    with _WholeTensorDraws():
        yield
