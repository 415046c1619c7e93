"""FSDP2: shard each transformer block and the root over the data-parallel mesh."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from hermes.model.llama import Llama

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def apply_fsdp(
    model: Llama,
    mesh: DeviceMesh,
    param_dtype: str = "float32",
    reduce_dtype: str = "float32",
    cpu_offload: bool = False,
) -> Llama:
    """`fully_shard` every block, then the root (embedding, final norm and output head).

    Args:
        model: the model, on meta (to be materialised after) or on a real device.
        mesh: 1-D (FSDP) or 2-D (HSDP: replicate x shard) data-parallel mesh.
        param_dtype: dtype of the unsharded parameters used in compute; "auto" is bfloat16 on GPU and
            float32 on CPU (where bfloat16 matmuls are slow and the tests compare to float32 references).
        reduce_dtype: dtype of the gradient reduce-scatter (keep float32 for exact sums).
        cpu_offload: keep sharded parameters, gradients and optimizer state on the CPU.
    """
    if param_dtype == "auto":
        param_dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    kwargs = {"mesh": mesh, "mp_policy": policy}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again right away by backward: keep them gathered.
        fully_shard(block, reshard_after_forward=i < last, **kwargs)
    fully_shard(model, **kwargs)
    return model


def sync_gradients_after(model: torch.nn.Module, last_micro_batch: bool) -> None:
    """Set up gradient reduction for the next backward of a step with several micro-batches.

    Every micro-batch's gradients are reduce-scattered, so each rank accumulates only its shard (turning
    gradient sync off instead would keep the whole unsharded gradient until the last micro-batch: the full
    model's size per rank). Only HSDP's all-reduce across replicas waits for the last micro-batch.
    """
    if isinstance(model, FSDPModule):
        model.set_requires_all_reduce(last_micro_batch)
