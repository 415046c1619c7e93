"""Builders the launch scripts share: the distributed environment, tokenizer, data, model (sharded),
optimizer and schedule, and the final export."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from hermes.config import Config, LoraConfig
from hermes.data.chat_files import AnyChatFormat, read_chat_format, save_chat_format
from hermes.data.dataset import TokenizedDataset
from hermes.data.loader import PackedLoader, StepBatch
from hermes.data.pipeline import prepare_preference_dataset, prepare_sft_dataset
from hermes.data.tokenizer import Tokenizer
from hermes.model import Llama, LlamaConfig
from hermes.model.hf import is_hf_checkpoint, load_pretrained, read_hf_config
from hermes.model.lora import apply_lora, init_lora_weights, save_adapter
from hermes.parallel.activation_checkpointing import apply_activation_checkpointing, compile_blocks
from hermes.parallel.fsdp import DTYPES, apply_fsdp
from hermes.parallel.materialize import copy_whole_state, draws_as_one_process, merge_lora_into_shards
from hermes.parallel.mesh import ParallelDims, build_mesh, device_type, dp_rank, fsdp_mesh, init_distributed
from hermes.parallel.sharded_hf import load_sharded, save_sharded
from hermes.parallel.tensor_parallel import apply_tensor_parallel
from hermes.train.metrics import training_flops
from hermes.train.optim import build_optimizer, build_scheduler


@dataclass
class Environment:
    rank: int
    dims: ParallelDims
    mesh: DeviceMesh
    device: torch.device
    chat: AnyChatFormat

    @property
    def tokenizer(self) -> Tokenizer:
        return self.chat.tokenizer


def environment(config: Config) -> Environment:
    """Join the process group, check and build the mesh, seed every RNG."""
    rank = init_distributed()
    p = config.parallel
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, dist.get_world_size())
    mesh = build_mesh(dims)
    device = torch.device(device_type(), torch.cuda.current_device() if device_type() == "cuda" else None)
    torch.manual_seed(config.run.seed)
    return Environment(rank, dims, mesh, device, chat_format(config))


def chat_format(config: Config) -> AnyChatFormat:
    """The tokenizer (tokenizer.path, else the checkpoint's own, else Llama 3's) and the chat format of
    data.chat_template (see `hermes.data.chat_files.read_chat_format`)."""
    return read_chat_format(
        config.model.checkpoint or None,
        tokenizer_path=config.tokenizer.path or None,
        chat_template=config.data.chat_template,
        default_system_prompt=config.data.default_system_prompt,
    )


def _cached_dataset(config: Config, env: Environment, prepare) -> TokenizedDataset:
    """Rank 0 tokenizes (or finds the cache); every rank then memory-maps the same arrays."""
    cache_root = (
        Path(config.data.cache_dir)
        if config.data.cache_dir
        else config.run_dir.parent / ".cache" / "tokenized"
    )
    directory = [None]
    if env.rank == 0:
        directory[0] = str(prepare(env.chat, config.data, config.run.seed, cache_root, config.run_dir))
    dist.broadcast_object_list(directory, src=0)
    return TokenizedDataset.load(Path(directory[0]))


def sft_dataset(config: Config, env: Environment) -> TokenizedDataset:
    """Conversations rendered with assistant-only labels (data.train, default: the bundled SFT example)."""
    return _cached_dataset(config, env, prepare_sft_dataset)


def preference_dataset(config: Config, env: Environment) -> TokenizedDataset:
    """Preference pairs as interleaved (chosen, rejected) samples (data.train, default: the bundled example)."""
    return _cached_dataset(config, env, prepare_preference_dataset)


def loader(config: Config, env: Environment, dataset: TokenizedDataset, group_size: int = 1) -> PackedLoader:
    return PackedLoader(
        dataset,
        seq_len=config.data.seq_len,
        global_batch=config.train.global_batch,
        micro_batch=config.train.micro_batch,
        dp_rank=dp_rank(env.mesh),
        dp_size=env.dims.dp_size,
        seed=config.run.seed,
        pad_id=env.tokenizer.pad_id,
        group_size=group_size,
    )


def model(config: Config, env: Environment, lora: LoraConfig | None = None) -> Llama:
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
    _parallelize(net, config, env)
    # FSDP's CPU offload keeps the shards on the CPU.
    net.to_empty(device="cpu" if config.parallel.cpu_offload else env.device)
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


def _parallelize(net: Llama, config: Config, env: Environment) -> None:
    """Tensor parallel, activation checkpointing, compile, FSDP, in place."""
    p = config.parallel
    if p.tp > 1:
        apply_tensor_parallel(net, env.mesh["tp"])
    apply_activation_checkpointing(net, p.activation_checkpointing)
    if p.compile:
        compile_blocks(net)
    apply_fsdp(net, fsdp_mesh(env.mesh), p.param_dtype, p.reduce_dtype, p.cpu_offload)


def optimization(config: Config, net: torch.nn.Module, data: PackedLoader):
    """Optimizer, schedule, and the number of optimizer steps the run takes."""
    total = data.steps_per_epoch * config.train.epochs
    if config.train.max_steps:
        total = min(total, config.train.max_steps)
    optimizer = build_optimizer(net, config.optim)
    return optimizer, build_scheduler(optimizer, config.optim, total), total


def flops_counter(model_config: LlamaConfig) -> Callable[[StepBatch], float] | None:
    """FLOPs of a global batch for MFU, on GPU only (CPU has no meaningful peak)."""
    if device_type() != "cuda":
        return None
    return lambda batch: training_flops(model_config, batch.global_sample_lengths)


def write_resolved_config(config: Config) -> Path:
    """Write config.toml (the resolved configuration) into the run directory (rank 0)."""
    path = config.run_dir / "config.toml"
    if dist.get_rank() == 0:
        config.run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(config.to_toml())
    dist.barrier()
    return path


def export(config: Config, env: Environment, net: torch.nn.Module) -> Path | None:
    """Write the trained model as a Hugging Face directory (<run dir>/hf) when train.export_hf is set, with
    the tokenizer and chat template it was trained with. Collective: each rank writes the slices it holds,
    then rank 0 joins them one tensor at a time."""
    if not config.train.export_hf:
        return None
    directory = config.run_dir / "hf"
    _save_hf(config, env, net, directory)
    if dist.get_rank() == 0:
        print(f"Exported the model to {directory}", flush=True)
    return directory


def export_adapter(config: Config, env: Environment, net: torch.nn.Module) -> Path:
    """Write the LoRA adapter in PEFT's layout (<run dir>/adapter) and, when train.export_hf is set, the
    merged model as a Hugging Face directory (<run dir>/hf), merged and written shard by shard (the model
    is not trainable after); both with the tokenizer and chat template. Collective."""
    directory = config.run_dir / "adapter"
    save_adapter(net, directory, base_model_name_or_path=config.model.checkpoint)
    if dist.get_rank() == 0:
        save_chat_format(env.chat, directory, base_tokenizer_config=_base_tokenizer_config(config))
    if config.train.export_hf:
        _save_hf(config, env, merge_lora_into_shards(net), config.run_dir / "hf")
    if dist.get_rank() == 0:
        print(f"Exported the adapter to {directory}", flush=True)
    return directory


def _save_hf(config: Config, env: Environment, net: torch.nn.Module, directory: Path) -> None:
    """The sharded Hugging Face export, its config.json naming the tokenizer's BOS and end of turn."""
    net.config = net.config.replace(bos_token_id=env.tokenizer.bos_id, eos_token_id=env.chat.end_of_turn)
    save_sharded(net, directory)
    if dist.get_rank() == 0:
        save_chat_format(env.chat, directory, base_tokenizer_config=_base_tokenizer_config(config))


def _base_tokenizer_config(config: Config) -> Path | None:
    return Path(config.model.checkpoint) / "tokenizer_config.json" if config.model.checkpoint else None


def finish() -> None:
    """Wait for every rank, then leave the process group."""
    dist.barrier()
    dist.destroy_process_group()
