"""The one sharded model build, for training runs: meta -> LoRA -> tensor parallel -> activation
checkpointing -> compile -> FSDP -> materialise -> load (torchtitan's order), so no rank ever holds more
than its shards of a Hugging Face checkpoint."""

from __future__ import annotations

import torch

from hermes.config import Config, LoraConfig
from hermes.model import Llama, LlamaConfig
from hermes.model.hf import is_hf_checkpoint, load_pretrained, read_hf_config
from hermes.model.lora import apply_lora, init_lora_weights
from hermes.parallel.activation_checkpointing import apply_activation_checkpointing, compile_blocks
from hermes.parallel.fsdp import DTYPES, apply_fsdp
from hermes.parallel.materialize import copy_whole_state, draws_as_one_process
from hermes.parallel.mesh import Meshes
from hermes.parallel.sharded_hf import load_sharded
from hermes.parallel.tensor_parallel import apply_tensor_parallel


def build_model(
    config: Config, meshes: Meshes, device: torch.device, lora: LoraConfig | None = None
) -> Llama:
    """The model, sharded before it holds any weights: built on the meta device, given a LoRA adapter when
    `lora` is given (only the adapter trains), parallelised in torchtitan's order (tensor parallel,
    activation checkpointing, compile, FSDP), materialised shard by shard, then filled:

    - a Hugging Face checkpoint (its config.json gives the shape) is read straight into the shards: each
      rank reads only the slices it holds, so no rank ever holds the whole model;
    - a Meta checkpoint (consolidated.NN.pth) is read whole on every rank, and each rank keeps its shards;
    - a fresh model is initialised whole on the CPU with the run seed, exactly as one process does, and
      each rank keeps its shards (fresh models are the small ones of tests and experiments).

    The adapter is initialised last, with the run seed, to the same values on any mesh."""
    dtype = DTYPES[config.model.dtype]
    checkpoint = config.model.checkpoint
    whole = None if checkpoint and is_hf_checkpoint(checkpoint) else _whole_model(config, dtype)
    with torch.device("meta"):
        net = Llama(read_hf_config(checkpoint) if whole is None else whole.config).to(dtype)
    net.set_attention_backend(config.model.attention_backend)
    if lora is not None:
        apply_lora(net, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=tuple(lora.targets))
    _parallelize(net, config, meshes)
    # FSDP's CPU offload keeps the shards on the CPU.
    net.to_empty(device="cpu" if config.parallel.cpu_offload else device)
    if whole is None:
        load_sharded(net, checkpoint)
    else:
        copy_whole_state(net, whole.state_dict())
        del whole
    if lora is not None:
        torch.manual_seed(config.run.seed)
        with draws_as_one_process():
            init_lora_weights(net)
    return net


def _whole_model(config: Config, dtype: torch.dtype) -> Llama:
    """A model built whole on the CPU: the Meta checkpoint `model.checkpoint` (a missing or unknown one
    raises `load_pretrained`'s error), or, with none, a fresh one of `model.preset` seeded with run.seed."""
    if config.model.checkpoint:
        return load_pretrained(config.model.checkpoint, device="cpu", dtype=dtype)
    torch.manual_seed(config.run.seed)
    return Llama(LlamaConfig.preset(config.model.preset)).to(dtype)


def _parallelize(net: Llama, config: Config, meshes: Meshes) -> None:
    """Tensor parallel, activation checkpointing, compile, FSDP, in place."""
    p = config.parallel
    if p.tp > 1:
        apply_tensor_parallel(net, meshes.tp)
    apply_activation_checkpointing(net, p.activation_checkpointing)
    if p.compile:
        compile_blocks(net)
    apply_fsdp(net, meshes.fsdp, p.param_dtype, p.reduce_dtype, p.cpu_offload)
