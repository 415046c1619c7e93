"""FSDP2: shard each transformer block and the root over the data-parallel mesh.

FSDP's gradient reduction sums, it does not average (gradient divide factor 1, as torchtitan sets it): a
step's loss is each rank's local sum divided by the global batch's count, so the summed gradients are the
gradient of the global mean whatever the number of ranks.
"""

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
    """Shard the model in torchtitan's units: the embedding, each block, the final norm with the output
    head (kept gathered after forward: backward starts there), then the root. Each unit is gathered only
    while it computes, so at most one block's, the embedding's or the head's full weights exist at a time.
    A tied embedding table and head is one parameter, sharded once, in the root unit: FSDP2 requires a
    shared parameter to belong to a single unit, so then the embedding and the head get no units of their
    own.

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
    tied = model.output.weight is model.tok_embeddings.weight
    if not tied:
        fully_shard(model.tok_embeddings, **kwargs)
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again right away by backward: keep them gathered.
        fully_shard(block, reshard_after_forward=i < last, **kwargs)
    if not tied:
        fully_shard([model.norm, model.output], reshard_after_forward=False, **kwargs)
    fully_shard(model, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # Plain sums, with no pre- or post-scaling (gloo has no PREMUL_SUM; NCCL copies less).
            module.set_force_sum_reduction_for_comms(True)
    return model


def sync_gradients_after(model: torch.nn.Module, last_micro_batch: bool) -> None:
    """Set up gradient reduction for the next backward of a step with several micro-batches.

    Every micro-batch's gradients are reduce-scattered, so each rank accumulates only its shard (turning
    gradient sync off instead would keep the whole unsharded gradient until the last micro-batch: the full
    model's size per rank). Only HSDP's all-reduce across replicas waits for the last micro-batch.
    """
    if isinstance(model, FSDPModule):
        model.set_requires_all_reduce(last_micro_batch)
