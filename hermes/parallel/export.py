"""Exports written from the shards at the end of a run: the Hugging Face model directory and the PEFT
adapter (and, at each epoch end, the model of that epoch), and the FP8 (compressed-tensors) model
directory, each with the tokenizer files and chat template the run trained with (hermes.data.chat_files). Collective: every rank writes the slices it holds; no rank
gathers the whole model."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from hermes.config import Config
from hermes.data.chat_files import AnyChatFormat, save_chat_format
from hermes.model.lora import lora_layers, save_adapter
from hermes.parallel.materialize import merge_lora_into_shards, merged_weights
from hermes.parallel.sharded_hf import save_sharded


def export_model(config: Config, chat: AnyChatFormat, net: torch.nn.Module) -> Path | None:
    """Write the trained model as a Hugging Face directory (<run dir>/hf) when train.export_hf is set, with
    the tokenizer and chat template it was trained with. Collective: each rank writes the slices it holds,
    then rank 0 joins them one tensor at a time."""
    if not config.train.export_hf:
        return None
    directory = config.run_dir / "hf"
    _save_hf(config, chat, net, directory)
    if dist.get_rank() == 0:
        print(f"Exported the model to {directory}", flush=True)
    return directory


def export_adapter(config: Config, chat: AnyChatFormat, net: torch.nn.Module) -> Path:
    """Write the LoRA adapter in PEFT's layout (<run dir>/adapter) and, when train.export_hf is set, the
    merged model as a Hugging Face directory (<run dir>/hf), merged and written shard by shard (the model
    is not trainable after); both with the tokenizer and chat template. Collective."""
    directory = config.run_dir / "adapter"
    save_adapter(net, directory, base_model_name_or_path=config.model.checkpoint)
    if dist.get_rank() == 0:
        save_chat_format(chat, directory, base_tokenizer_config=_base_tokenizer_config(config))
    if config.train.export_hf:
        _save_hf(config, chat, merge_lora_into_shards(net), config.run_dir / "hf")
    if dist.get_rank() == 0:
        print(f"Exported the adapter to {directory}", flush=True)
    return directory


def export_epoch(config: Config, chat: AnyChatFormat, net: torch.nn.Module, epoch: int) -> Path | None:
    """At an epoch end, when train.export_every_epoch is set: write the model as it is into
    <run dir>/epochs/epoch-K/hf, the final export's format (tokenizer and chat template in), for checkpoint
    selection (hermes.select --run). A LoRA run also writes its adapter to epochs/epoch-K/adapter, and its
    hf/ from merged copies of the adapted weights (`merged_weights`): the live model stays unmerged and
    training goes on. Returns the hf directory. Collective."""
    if not config.train.export_every_epoch:
        return None
    directory = config.run_dir / "epochs" / f"epoch-{epoch}"
    weights = None
    if lora_layers(net):
        save_adapter(net, directory / "adapter", base_model_name_or_path=config.model.checkpoint)
        if dist.get_rank() == 0:
            save_chat_format(
                chat, directory / "adapter", base_tokenizer_config=_base_tokenizer_config(config)
            )
        weights = merged_weights(net)
    _save_hf(config, chat, net, directory / "hf", weights)
    if dist.get_rank() == 0:
        print(f"Exported epoch {epoch} to {directory}", flush=True)
    return directory / "hf"


def export_fp8(config: Config, chat: AnyChatFormat, net: torch.nn.Module) -> Path | None:
    """Write the trained model in FP8 (<run dir>/fp8, hermes.parallel.sharded_fp8) when train.export_fp8 is
    set, with the tokenizer and chat template; LoRA adapters are merged into the shards first (the model is
    not trainable after). Collective: each rank quantises and writes the rows it holds."""
    if not config.train.export_fp8:
        return None
    from hermes.parallel.sharded_fp8 import save_sharded_fp8  # needs the optional compressed-tensors package

    directory = config.run_dir / "fp8"
    net = merge_lora_into_shards(net)
    net.config = net.config.replace(bos_token_id=chat.tokenizer.bos_id, eos_token_id=chat.end_of_turn)
    save_sharded_fp8(net, directory)
    if dist.get_rank() == 0:
        save_chat_format(chat, directory, base_tokenizer_config=_base_tokenizer_config(config))
        print(f"Exported the FP8 model to {directory}", flush=True)
    return directory


def _save_hf(
    config: Config,
    chat: AnyChatFormat,
    net: torch.nn.Module,
    directory: Path,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """The sharded Hugging Face export (of `weights`, if given, else of the model's own), its config.json
    naming the tokenizer's BOS and end of turn."""
    net.config = net.config.replace(bos_token_id=chat.tokenizer.bos_id, eos_token_id=chat.end_of_turn)
    save_sharded(net, directory, weights=weights)
    if dist.get_rank() == 0:
        save_chat_format(chat, directory, base_tokenizer_config=_base_tokenizer_config(config))


def _base_tokenizer_config(config: Config) -> Path | None:
    return Path(config.model.checkpoint) / "tokenizer_config.json" if config.model.checkpoint else None
