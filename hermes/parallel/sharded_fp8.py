"""The FP8 export (hermes.model.fp8_checkpoint's layout) written from the shards, as `save_sharded` writes the
16-bit one: each rank quantises and writes the rows it holds, then rank 0 joins the files. No rank holds
the whole model.

A projection's per-channel scale needs the absmax of each whole row. Sharded on dim 0 (FSDP, colwise tensor
parallelism), a rank holds whole rows and computes their scales alone; sharded on dim 1 (rowwise tensor
parallelism: wo, w2), each rank holds a slice of every row, and the slices' absmaxes are max-reduced over
that mesh dimension first, so every rank quantises its slice with the row's scale (the scale is then
replicated there). The same code writes an unsharded model in one process (`export_fp8_directory`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from hermes.model.fp8 import absmax_scale, channel_scale
from hermes.model.fp8_checkpoint import SCALE_SUFFIX, is_fp8_weight
from hermes.model.fp8_format import compress_weight, write_quantization_config
from hermes.model.hf import (
    CONFIG_FILE,
    hf_name,
    is_dtensor,
    load_pretrained,
    stored_state,
)
from hermes.model.llama import Llama
from hermes.parallel.sharded_hf import save_state_sharded

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
"""Copied from the source directory by `export_fp8_directory`, those of them that it has."""


def save_sharded_fp8(model: Llama, directory: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write a (sharded or not) plain Llama as an FP8 checkpoint: config.json with its compressed-tensors
    `quantization_config`, and the safetensors files and index `save_sharded` would write, each block
    projection as float8 `weight` plus `weight_scale` (merge LoRA adapters first). Written beside
    `directory` and moved into it, so an interrupted save never looks complete. Collective.

    Args:
        model: the model; its parameters' dtype is kept for everything unquantised and for the scales.
        directory: the checkpoint directory (created with its parents if missing).
        max_shard_bytes: the largest file's payload, in bytes (a single larger tensor gets its own).
    """
    state = _fp8_state(model)
    save_state_sharded(state, directory, max_shard_bytes, lambda staging: _write_config(staging, model))


def export_fp8_directory(
    source: str | os.PathLike, output: str | os.PathLike, max_shard_bytes: int = 5 * 2**30
) -> Path:
    """Convert a Hugging Face Llama directory (e.g. a run's `hf/`) to an FP8 checkpoint in one process (the
    whole model in memory), with the source's tokenizer files, chat template and generation config.

    Args:
        source: the Hugging Face directory (config.json, safetensors, tokenizer files).
        output: the FP8 directory to write (created with its parents; the weights of one already there
            are replaced).
        max_shard_bytes: the largest safetensors file's payload, in bytes.

    Returns:
        The output directory.

    Raises:
        FileNotFoundError: the source is no checkpoint, or has no tokenizer (tokenizer.json or
            tokenizer.model), which serving the export needs.
        ValueError: the source's config or tensors do not describe a Llama (see `load_pretrained`).
    """
    source, output = Path(source), Path(output)
    model = load_pretrained(source)
    tokenizer_files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not any(path.name in ("tokenizer.json", "tokenizer.model") for path in tokenizer_files):
        raise FileNotFoundError(
            f"{source} has no tokenizer.json or tokenizer.model; the FP8 export is served with the source's "
            "tokenizer: export from a directory that has one (a run's hf/ does)"
        )
    save_sharded_fp8(model, output, max_shard_bytes)
    for path in tokenizer_files:
        shutil.copy(path, output / path.name)
    return output


def _write_config(staging: Path, model: Llama) -> None:
    """config.json of the model in its dtype, then the library's quantization_config added to it."""
    dtype = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    (staging / CONFIG_FILE).write_text(json.dumps(model.config.to_hf(torch_dtype=dtype), indent=2) + "\n")
    write_quantization_config(staging)


def _fp8_state(model: Llama) -> dict[str, torch.Tensor]:
    """Hugging Face name -> tensor of the FP8 export: projections as float8 weight and scale, sharded as the
    model holds them; every other tensor as it is."""
    state = {}
    for name, tensor in stored_state(model.state_dict(), model.config).items():
        key = hf_name(name)
        if is_fp8_weight(key):
            state[key], state[key + SCALE_SUFFIX] = _quantize_rows(tensor.detach())
        else:
            state[key] = tensor
    return state


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, scale [out, 1]) of a projection; a DTensor's are DTensors laid out like it, each rank
    quantising only its own part (module docstring)."""
    if not is_dtensor(weight):
        scale = channel_scale(weight)
        return compress_weight(weight, scale), scale
    local = weight.to_local()
    absmax = local.abs().amax(dim=1, keepdim=True).float()  # [local rows, 1]
    mesh, placements = weight.device_mesh, weight.placements
    for mesh_dim, placement in enumerate(placements):
        if placement.is_shard(dim=1):
            dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=mesh.get_group(mesh_dim))
    scale = absmax_scale(absmax, weight.dtype)
    scale_placements = [Replicate() if p.is_shard(dim=1) else p for p in placements]
    return (
        DTensor.from_local(
            compress_weight(local, scale), mesh, placements, shape=weight.shape, stride=weight.stride()
        ),
        DTensor.from_local(scale, mesh, scale_placements, shape=(weight.shape[0], 1), stride=(1, 1)),
    )
