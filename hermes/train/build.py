"""What a run sets up before its model: the processes and meshes, the tokenizer and chat format, the
tokenized data and the loader; and config.toml. (The sharded model build is hermes.parallel.build, the
exports hermes.parallel.export, the loop hermes.train.trainer.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from hermes.config import Config
from hermes.data.chat_files import AnyChatFormat, check_vocabulary, read_chat_format
from hermes.data.dataset import TokenizedDataset
from hermes.data.loader import PackedLoader
from hermes.data.pipeline import prepare_preference_dataset, prepare_sft_dataset
from hermes.data.tokenizer import Tokenizer
from hermes.model import LlamaConfig
from hermes.model.hf import is_hf_checkpoint, read_hf_config
from hermes.parallel.mesh import Meshes, ParallelDims, build_mesh, device_type, init_distributed
from hermes.train.run_lock import RunDirectoryBusyError, RunLock


@dataclass
class Environment:
    """The processes of a run: this rank, how the world is split and its named meshes, the compute device
    (the accelerator even when parameters are offloaded to the CPU), and the chat format."""

    rank: int
    dims: ParallelDims
    meshes: Meshes
    device: torch.device
    chat: AnyChatFormat
    lock: RunLock | None = None
    """The run directory's lock, held by rank 0 for the run's life."""
    data_cache: Path | None = None
    """The tokenized data the run reads (set when it is prepared); its name holds the data's cache key."""

    @property
    def tokenizer(self) -> Tokenizer:
        return self.chat.tokenizer


def environment(config: Config) -> Environment:
    """Check the paths the run starts from, join the process group, check and build the mesh, seed every
    RNG, read the tokenizer and chat format."""
    _check_checkpoint_exists(config)
    rank = init_distributed()
    p = config.parallel
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, dist.get_world_size())
    lock = _lock_run_directory(config.run_dir, rank)
    meshes = build_mesh(dims)
    device = torch.device(device_type(), torch.cuda.current_device() if device_type() == "cuda" else None)
    torch.manual_seed(config.run.seed)
    chat = chat_format(config)
    vocabulary = _model_vocabulary(config)
    if vocabulary is not None:
        check_vocabulary(
            chat.tokenizer, vocabulary, config.model.checkpoint or f"preset {config.model.preset}"
        )
    return Environment(rank, dims, meshes, device, chat, lock)


def _lock_run_directory(run_dir: Path, rank: int) -> RunLock | None:
    """Rank 0 takes the run directory's lock; every rank raises if it could not.

    Raises:
        RunDirectoryBusyError: another live run holds it.
    """
    lock, outcome = None, [None]
    if rank == 0:
        lock = RunLock(run_dir)
        try:
            note = lock.acquire()
            if note:
                print(f"{run_dir}: {note}", flush=True)
        except RunDirectoryBusyError as busy:
            outcome[0] = str(busy)
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RunDirectoryBusyError(outcome[0])
    return lock


def _model_vocabulary(config: Config) -> int | None:
    """The vocabulary of the model a run trains: its Hugging Face config.json's, else the preset's (None for
    a Meta checkpoint, whose shape is known only once it is read)."""
    checkpoint = config.model.checkpoint
    if not checkpoint:
        return LlamaConfig.preset(config.model.preset).vocab_size
    return read_hf_config(checkpoint).vocab_size if is_hf_checkpoint(checkpoint) else None


def _check_checkpoint_exists(config: Config) -> None:
    """A missing model.checkpoint is reported before anything is built, with how to make it when it is the
    export of another run (as the default DPO run starts from the default SFT run's)."""
    checkpoint = Path(config.model.checkpoint) if config.model.checkpoint else None
    if checkpoint is None or checkpoint.exists():
        return
    hint = "point it at a Hugging Face or Meta checkpoint directory"
    if checkpoint.name == "hf" and checkpoint.parent.parent.name == "runs":
        hint = (
            f"it is the export of the training run {checkpoint.parent}: run that first (for the default DPO "
            "run: torchrun --standalone --nproc_per_node 2 launch/sft.py)"
        )
    raise FileNotFoundError(f"model.checkpoint = {checkpoint} does not exist; {hint}")


def chat_format(config: Config) -> AnyChatFormat:
    """The tokenizer (tokenizer.path, else the checkpoint's own, else Llama 3's) and the chat format of
    data.chat_template (see `hermes.data.chat_files.read_chat_format`)."""
    return read_chat_format(
        config.model.checkpoint or None,
        tokenizer_path=config.tokenizer.path or None,
        chat_template=config.data.chat_template,
        default_system_prompt=config.data.default_system_prompt,
    )


def _cache_directory(config: Config, env: Environment, prepare, **split) -> Path:
    """Rank 0 tokenizes (or finds the cache); every rank gets its directory. The training split's filter
    summaries are copied into the run directory."""
    cache_root = (
        Path(config.data.cache_dir)
        if config.data.cache_dir
        else config.run_dir.parent / ".cache" / "tokenized"
    )
    directory = [None]
    if env.rank == 0:
        report_dir = None if split else config.run_dir
        directory[0] = str(prepare(env.chat, config.data, config.run.seed, cache_root, report_dir, **split))
    dist.broadcast_object_list(directory, src=0)
    return Path(directory[0])


def _cached_dataset(config: Config, env: Environment, prepare) -> TokenizedDataset:
    """The training data, memory-mapped on every rank; its cache directory becomes `env.data_cache`."""
    env.data_cache = _cache_directory(config, env, prepare)
    return TokenizedDataset.load(env.data_cache)


def sft_dataset(config: Config, env: Environment) -> TokenizedDataset:
    """Conversations rendered with assistant-only labels (data.train, default: the bundled SFT example),
    without the records data.validation_fraction holds out."""
    return _cached_dataset(config, env, prepare_sft_dataset)


def _validation_dataset(config: Config, env: Environment, prepare) -> TokenizedDataset | None:
    """data.validation's records and those data.validation_fraction holds out of data.train (see
    hermes.data.holdout), prepared as the training ones; None when neither is configured."""
    if not config.data.validation and not config.data.validation_fraction:
        return None
    return TokenizedDataset.load(_cache_directory(config, env, prepare, split="validation"))


def sft_validation_dataset(config: Config, env: Environment) -> TokenizedDataset | None:
    """The validation conversations, rendered as the training ones (`_validation_dataset`)."""
    return _validation_dataset(config, env, prepare_sft_dataset)


def preference_dataset(config: Config, env: Environment) -> TokenizedDataset:
    """Preference pairs as interleaved (chosen, rejected) samples (data.train, default: the bundled example),
    without the pairs data.validation_fraction holds out."""
    return _cached_dataset(config, env, prepare_preference_dataset)


def preference_validation_dataset(config: Config, env: Environment) -> TokenizedDataset | None:
    """The validation pairs, as interleaved (chosen, rejected) samples (`_validation_dataset`)."""
    return _validation_dataset(config, env, prepare_preference_dataset)


def loader(config: Config, env: Environment, dataset: TokenizedDataset, group_size: int = 1) -> PackedLoader:
    return PackedLoader(
        dataset,
        seq_len=config.data.seq_len,
        global_batch=config.train.global_batch,
        micro_batch=config.train.micro_batch,
        dp_rank=env.meshes.dp_rank,
        dp_size=env.dims.dp_size,
        seed=config.run.seed,
        pad_id=env.tokenizer.pad_id,
        group_size=group_size,
    )


def write_resolved_config(config: Config) -> Path:
    """Write config.toml (the resolved configuration) into the run directory (rank 0)."""
    path = config.run_dir / "config.toml"
    if dist.get_rank() == 0:
        config.run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(config.to_toml())
    dist.barrier()
    return path


def finish(env: Environment) -> None:
    """Wait for every rank, let the run directory go, then leave the process group."""
    dist.barrier()
    if env.lock is not None:
        env.lock.release()
    dist.destroy_process_group()
