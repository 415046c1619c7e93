"""Hugging Face checkpoints read straight into a sharded model, and written straight from one, so that no
rank ever holds the whole model (a 405B one does not fit in one process).

Reading (`load_sharded`): the model is built on the meta device, sharded (tensor parallel, FSDP) and
materialised with `to_empty`; then each rank reads from the safetensors files only the slices its shards
hold (torch DCP's `HuggingFaceStorageReader`), converting them to the parameters' dtype. The files'
headers are checked against the model first, with the errors of `hermes.model.hf.load_pretrained`.

Writing (`save_sharded`): each rank writes the slices it holds (DCP's `HuggingFaceStorageWriter`, one
file per rank), then rank 0 joins them, one tensor at a time, into the layout `hf.save_pretrained`
writes and transformers reads: config.json plus `model.safetensors`, or `model-0000K-of-0000M.safetensors`
and `model.safetensors.index.json`, in Hugging Face names and the parameters' dtype. The export directory
must be on a file system every rank writes to and rank 0 reads (as for DCP checkpoints).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from hermes.model.hf import (
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    check_hf_tensors,
    hf_name,
    is_writer,
    new_staging_directory,
    plan_shard_files,
    publish_staged,
    stored_state,
    write_config_json,
)
from hermes.model.llama import Llama
from hermes.parallel.materialize import base_weights

# Where HuggingFaceStorageWriter puts each rank's own files before joining them.
RANK_FILES_DIR = "sharded"
# The writer names the joined files model-0000K-of-0000M.safetensors, as `plan_shard_files` names several;
# a single one is renamed model.safetensors (and its index dropped), as `save_pretrained` writes it.
JOINED_SINGLE_FILE = "model-00001-of-00001.safetensors"


def load_sharded(model: nn.Module, directory: str | os.PathLike) -> None:
    """Fill the weights of a materialised (sharded or not) model from the Hugging Face checkpoint in
    `directory` (config.json + model.safetensors, or index + shards), each rank reading only the slices it
    holds. A LoRA model's base weights take the checkpoint's projections; its adapters are left alone.
    Collective: every rank calls it.

    Raises:
        FileNotFoundError: a shard the index lists is missing.
        ValueError: an unreadable shard (named), or tensors missing, unexpected or of the wrong shape (all
            listed, each with its file and both shapes); checked before any data is read.
    """
    # A tied head is the embedding table: it is filled with it, from the file's one copy.
    weights = stored_state(base_weights(model), model.config)
    check_hf_tensors(directory, {name: t.shape for name, t in weights.items()})
    state = {hf_name(name): t for name, t in weights.items()}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(directory)))


def save_sharded(
    model: Llama,
    directory: str | os.PathLike,
    max_shard_bytes: int = 5 * 2**30,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write a (sharded or not) plain Llama as a Hugging Face checkpoint, each rank writing what it holds:
    the same files, names, dtype and tensors as `hermes.model.hf.save_pretrained` writes for the unsharded
    model (merge LoRA adapters first). Written beside `directory` and moved into it as `save_pretrained`
    does, so an interrupted save never looks complete. Collective: every rank calls it.

    Args:
        model: the model; its parameters' dtype is kept and recorded as config.json's torch_dtype.
        directory: the checkpoint directory (created with its parents if missing).
        max_shard_bytes: the largest file's payload, in bytes (a single larger tensor gets its own).
        weights: the plain model's weights by hermes name, in place of `model.state_dict()` (e.g.
            `hermes.parallel.materialize.merged_weights` of a model with LoRA adapters).
    """
    weights = model.state_dict() if weights is None else weights
    state = {hf_name(name): t for name, t in stored_state(weights, model.config).items()}
    dtype = next(iter(state.values())).dtype
    save_state_sharded(
        state, directory, max_shard_bytes, lambda staging: write_config_json(staging, model.config, dtype)
    )


def save_state_sharded(
    state: Mapping[str, torch.Tensor],
    directory: str | os.PathLike,
    max_shard_bytes: int,
    write_config: Callable[[Path], None],
) -> None:
    """Write `state` (Hugging Face names, each tensor sharded or not) in `save_pretrained`'s safetensors
    layout: every rank writes the slices it holds, rank 0 joins them one tensor at a time, adds config.json
    with `write_config(staging)`, and publishes the directory (the index or single file last). Collective.
    """
    files = plan_shard_files(state, max_shard_bytes)
    file_index = {name: k for k, names in enumerate(files.values(), start=1) for name in names}
    directory = Path(directory)
    staging = shared_staging_directory(directory)
    try:
        writer = HuggingFaceStorageWriter(
            str(staging),
            fqn_to_index_mapping=file_index,
            save_distributed=True,
            enable_consolidation=True,
            thread_count_consolidation=min(len(files), 8),
        )
        dcp.save(dict(state), storage_writer=writer)
        if is_writer():
            shutil.rmtree(staging / RANK_FILES_DIR)
            if len(files) == 1:
                (staging / JOINED_SINGLE_FILE).rename(staging / SAFETENSORS_FILE)
                (staging / SAFETENSORS_INDEX).unlink()
            write_config(staging)
            publish_staged(staging, directory, SAFETENSORS_INDEX if len(files) > 1 else SAFETENSORS_FILE)
    finally:
        if is_writer() and staging.exists():
            shutil.rmtree(staging)
    if dist.is_initialized():
        dist.barrier()


def shared_staging_directory(directory: Path) -> Path:
    """A fresh staging directory beside `directory` that rank 0 creates and every rank is told."""
    staging = [str(new_staging_directory(directory)) if is_writer() else None]
    if dist.is_initialized():
        dist.broadcast_object_list(staging, src=0)
    return Path(staging[0])
