"""Process groups and the device mesh: dp_replicate x dp_shard x tp, and the meshes named on it.

`Meshes` names each mesh by what it is for, as torchtitan's ParallelDims does:
- `batch`: the data-parallel ranks (dp_replicate x dp_shard); each holds its own share of the global batch.
- `loss`: the ranks over which a step's per-rank metric sums are reduced into global values: the batch
  ranks (the tp ranks of one data-parallel rank hold the same sums, so reducing over them would count
  each sum tp times).
- `fsdp`: what FSDP shards over (2-D HSDP when there are replicas).
- `tp`: the tensor-parallel ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from hermes.parallel.processes import free_port

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """How the world is split. dp_shard = -1 takes whatever dp_replicate and tp leave."""

    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp_shard == -1:
            rest, remainder = divmod(self.world_size, self.dp_replicate * self.tp)
            if remainder or rest < 1:
                raise ValueError(
                    f"World size {self.world_size} is not divisible by dp_replicate x tp = "
                    f"{self.dp_replicate} x {self.tp} = {self.dp_replicate * self.tp}"
                )
            object.__setattr__(self, "dp_shard", rest)
        product = self.dp_replicate * self.dp_shard * self.tp
        if product != self.world_size:
            raise ValueError(
                f"dp_replicate x dp_shard x tp = {self.dp_replicate} x {self.dp_shard} x {self.tp} = {product}, "
                f"but the world has {self.world_size} processes; make the product equal the world size "
                "(dp_shard = -1 fills in the rest)"
            )

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: replicas x shards. Each gets a different share of the global batch."""
        return self.dp_replicate * self.dp_shard


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed() -> int:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU); a plain `python` run becomes
    a world of one. Returns this process's rank."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(
                RANK="0",
                LOCAL_RANK="0",
                WORLD_SIZE="1",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()),
            )
        if device_type() == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # NCCL for the GPUs, and gloo beside it for CPU tensors (asynchronous checkpoints stage on the CPU).
        dist.init_process_group("cuda:nccl,cpu:gloo" if device_type() == "cuda" else "gloo")
    return dist.get_rank()


@dataclass(frozen=True)
class Meshes:
    """The device mesh and the meshes named on it (module docstring)."""

    world: DeviceMesh
    batch: DeviceMesh
    loss: DeviceMesh
    fsdp: DeviceMesh
    tp: DeviceMesh

    @property
    def dp_rank(self) -> int:
        """This process's index among the data-parallel ranks (replica-major)."""
        return self.batch.get_local_rank()


def build_mesh(dims: ParallelDims) -> Meshes:
    """The 3-D mesh named MESH_DIMS (size-1 dimensions included, so code can always name them) and the
    meshes of the module docstring, flattened from it once."""
    world = init_device_mesh(
        device_type(), (dims.dp_replicate, dims.dp_shard, dims.tp), mesh_dim_names=MESH_DIMS
    )
    data_parallel = world["dp_replicate", "dp_shard"]
    batch = data_parallel._flatten("batch")
    fsdp = data_parallel if dims.dp_replicate > 1 else world["dp_shard"]
    return Meshes(world=world, batch=batch, loss=batch, fsdp=fsdp, tp=world["tp"])
