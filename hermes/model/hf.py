"""Hugging Face and Meta checkpoint files <-> hermes models: reading and writing (the names, the q/k
permutation and Meta's shard layout are hermes.model.hf_names).

Written: the Hugging Face layout that `transformers.AutoModelForCausalLM.from_pretrained` reads —
config.json plus safetensors in Hugging Face names, dtype preserved. A model that fits in one shard is
written as a single `model.safetensors` (as transformers does); a larger one as
`model-0000K-of-0000M.safetensors` shards plus `model.safetensors.index.json`.

Read: that layout (single file or index + shards), and Meta's original one (params.json plus
`consolidated.NN.pth` model-parallel shards, whose q/k rows rotate interleaved pairs and are permuted here
to the halves that hermes and Hugging Face rotate).

A model with tied embeddings (`tie_word_embeddings`) stores its table once, as `model.embed_tokens.weight`:
its files have no `lm_head.weight`, as transformers writes them (and a Meta checkpoint without
`output.weight` is read as tied).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hermes.model.config import LlamaConfig
from hermes.model.hf_names import (
    HF_IGNORED,
    from_hf_state_dict,
    from_meta_state_dict,
    hermes_name,
    hf_name,
    hf_state_dict,
    merge_meta_shards,
    meta_qk_to_hf,
    stored_state,
)
from hermes.model.llama import TIED_HEAD_WEIGHT, Llama

__all__ = [  # the names moved to hermes.model.hf_names stay importable from here
    "from_hf_state_dict",
    "from_meta_state_dict",
    "hermes_name",
    "hf_name",
    "hf_state_dict",
    "merge_meta_shards",
    "meta_qk_to_hf",
    "stored_state",
]

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
META_PARAMS_FILE = "params.json"
META_SHARD_PATTERN = "consolidated.*.pth"

# Saving --------------------------------------------------------------------------------------------------


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (a parallel layer sharded it); False where torch has no distributed."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor is gathered (collective, every rank calls), anything else is itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def full_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of the whole tensor (DTensors are gathered: collective, every rank calls)."""
    return whole_tensor(tensor).detach().to("cpu").contiguous()


def _plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Group names, in order, into shards of at most max_shard_bytes (a larger tensor gets one alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def is_writer() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def save_pretrained(model: Llama, directory: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model` as a Hugging Face checkpoint: config.json plus safetensors in Hugging Face names.

    One `model.safetensors` when the weights fit in `max_shard_bytes`, else `model-0000K-of-0000M.safetensors`
    shards plus `model.safetensors.index.json`. Everything is written to a hidden temporary directory beside
    `directory` and then renamed into place, so an interrupted save never leaves a directory that looks
    complete. Into an existing directory (e.g. one holding a tokenizer), the Hugging Face weights already
    there are replaced, and the file that makes the checkpoint look complete (the index, or the single
    `model.safetensors`) is moved in last.

    Parameters that are DTensors (FSDP / TP) are gathered one shard at a time; then every rank must call
    this, and only rank 0 writes (`hermes.parallel.sharded_hf.save_sharded` writes from the shards instead).

    Args:
        model: the model; its parameters' dtype is kept and recorded as config.json's torch_dtype.
        directory: the checkpoint directory (created with its parents if missing).
        max_shard_bytes: the largest shard file's payload, in bytes (a single larger tensor gets its own).
    """
    state = stored_state(model.state_dict(), model.config)
    groups = plan_shard_files(state, max_shard_bytes)
    writer = is_writer()
    directory = Path(directory)
    staging = new_staging_directory(directory) if writer else None
    try:
        weight_map, total_size = {}, 0
        for file, group in groups.items():
            tensors = {hf_name(name): full_cpu(state[name]) for name in group}
            total_size += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, file))
            if staging is not None:
                save_file(tensors, staging / file, metadata={"format": "pt"})
            del tensors
        if staging is None:
            return
        if len(groups) > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            (staging / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        publish_checkpoint(staging, directory, model.config, next(iter(state.values())).dtype)
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging)


def plan_shard_files(state: Mapping[str, torch.Tensor], max_shard_bytes: int) -> dict[str, list[str]]:
    """Safetensors file name -> the state's names it holds, in order, each file at most `max_shard_bytes`
    (a larger tensor gets a file alone): `model.safetensors` alone, or `model-0000K-of-0000M.safetensors`."""
    groups = _plan_shards([(n, t.numel() * t.element_size()) for n, t in state.items()], max_shard_bytes)
    if len(groups) == 1:
        return {SAFETENSORS_FILE: groups[0]}
    return {f"model-{k:05d}-of-{len(groups):05d}.safetensors": g for k, g in enumerate(groups, start=1)}


def new_staging_directory(directory: Path) -> Path:
    """A fresh hidden directory beside `directory` (created with its parents) to write a checkpoint into."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))


def write_config_json(directory: Path, config: LlamaConfig, dtype: torch.dtype) -> None:
    """config.json of `config` with `dtype` as its torch_dtype."""
    hf_config = config.to_hf(torch_dtype=str(dtype).removeprefix("torch."))
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")


def publish_checkpoint(staging: Path, directory: Path, config: LlamaConfig, dtype: torch.dtype) -> None:
    """Add config.json to the safetensors (and index) written into `staging`, then move them into
    `directory`, the file that makes the checkpoint look complete last."""
    write_config_json(staging, config, dtype)
    marker = SAFETENSORS_INDEX if (staging / SAFETENSORS_INDEX).exists() else SAFETENSORS_FILE
    publish_staged(staging, directory, marker)


def publish_staged(staging: Path, directory: Path, marker: str) -> None:
    """Move the staged checkpoint into `directory`, the file that completes it (`marker`) last."""
    if not directory.exists():
        os.replace(staging, directory)
        return
    for old in [directory / SAFETENSORS_INDEX, directory / SAFETENSORS_FILE]:
        old.unlink(missing_ok=True)
    for old in directory.glob("model-*-of-*.safetensors"):
        old.unlink()
    for path in sorted(staging.iterdir(), key=lambda p: p.name == marker):
        os.replace(path, directory / path.name)
    staging.rmdir()


# Loading -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a checkpoint, before its data is read: the name its file gives it, shape, file."""

    name: str
    shape: tuple[int, ...]
    file: str


def load_pretrained(
    directory: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Llama:
    """Read a Hugging Face checkpoint (config.json + model.safetensors, or its index and shards), a Meta
    original one (params.json + consolidated.NN.pth) or a llama.cpp GGUF file (`X.gguf`, read by
    `hermes.model.gguf.load_gguf`; needs the gguf package) into a hermes Llama.

    The model is built on the meta device and the checkpoint's tensors are assigned to it, so the weights
    exist once, on `device`.

    Args:
        directory: the checkpoint directory, or a .gguf file.
        device: where the parameters go.
        dtype: convert floating-point weights to this dtype; None keeps the checkpoint's (float32 for GGUF).

    Returns:
        The model, in training mode.

    Raises:
        FileNotFoundError: the directory is neither layout, or lacks its config file or a listed shard.
        ValueError: a config or shard file is unreadable (named), or tensors are missing, unexpected or of
            the wrong shape (all listed, each with its file and both shapes).
    """
    directory = Path(directory)
    if directory.suffix == ".gguf":
        from hermes.model.gguf import load_gguf  # the gguf package is an optional dependency

        return load_gguf(directory, device, dtype)
    if not directory.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {directory} does not exist")
    if is_hf_checkpoint(directory):
        config, state = _read_hf(directory, device, dtype)
    elif _meta_shard_files(directory):
        config, state = _read_meta(directory, device, dtype)
    else:
        raise FileNotFoundError(
            f"{directory} is neither a Hugging Face checkpoint ({CONFIG_FILE} with {SAFETENSORS_FILE}, or "
            f"{SAFETENSORS_INDEX} and its shards) nor a Meta original one ({META_PARAMS_FILE} with "
            "consolidated.00.pth, ...); point model.checkpoint at the folder that holds those files"
        )
    with torch.device("meta"):
        model = Llama(config)
    model.load_state_dict(state, assign=True)
    return model


def read_json(path: Path, what: str) -> dict:
    """A JSON object file.

    Raises:
        FileNotFoundError: no such file; `what` says what needs it.
        ValueError: not valid JSON, or not an object.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore the file") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


def _convert(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None) -> torch.Tensor:
    to_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device, dtype=to_dtype)


@contextmanager
def open_safetensors(path: Path):
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            yield handle
    except SafetensorError as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt: "
            "write or download it again"
        ) from err


def check_against(
    expected: Mapping[str, torch.Size],
    stored: Mapping[str, StoredTensor],
    unexpected: Sequence[StoredTensor],
    stored_name: Callable[[str], str],
    why_missing: Callable[[str], str],
    source: Path,
) -> None:
    """Raise one error listing every tensor that is missing, unexpected or of the wrong shape.

    `stored` and `expected` are keyed by hermes name; `stored_name` gives the checkpoint's own name of a
    hermes name, and `why_missing` says, for such a name, which file should have held it.
    """
    problems = []
    for name, shape in expected.items():
        found = stored.get(name)
        if found is None:
            theirs = stored_name(name)
            problems.append(f"{theirs} is missing (expected shape {tuple(shape)}): {why_missing(theirs)}")
        elif found.shape != tuple(shape):
            problems.append(f"{found.name} in {found.file} has shape {found.shape}, expected {tuple(shape)}")
    strangers = [*unexpected, *(s for name, s in stored.items() if name not in expected)]
    problems += [f"{s.name} in {s.file} (shape {s.shape}) is not a weight of this model" for s in strangers]
    if problems:
        raise ValueError(
            f"Checkpoint {source} does not match the model its config describes "
            f"({len(problems)} problem{'s' if len(problems) > 1 else ''}); fix the weights or the config:\n  "
            + "\n  ".join(problems)
        )


def expected_shapes(config: LlamaConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {name: t.shape for name, t in stored_state(Llama(config).state_dict(), config).items()}


def hf_weight_files(directory: Path) -> tuple[dict[str, str], str]:
    """Hugging Face tensor name -> file name, and the file that lists them (index or single file)."""
    index_path = directory / SAFETENSORS_INDEX
    if not index_path.exists():
        with open_safetensors(directory / SAFETENSORS_FILE) as handle:
            return dict.fromkeys(handle.keys(), SAFETENSORS_FILE), SAFETENSORS_FILE
    index = read_json(index_path, "the shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path} has no 'weight_map' object {{tensor name: shard file}}; restore it")
    absent = sorted({f for f in weight_map.values() if not (directory / f).exists()})
    if absent:
        raise FileNotFoundError(
            f"{index_path} lists shard files that are missing from {directory}: {', '.join(absent)}; "
            "copy them in (an interrupted download?)"
        )
    return dict(weight_map), SAFETENSORS_INDEX


def is_hf_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds Hugging Face safetensors weights (a single file, or an index)."""
    directory = Path(directory)
    return (directory / SAFETENSORS_INDEX).exists() or (directory / SAFETENSORS_FILE).exists()


def read_hf_config(directory: str | os.PathLike) -> LlamaConfig:
    """The model shape a Hugging Face checkpoint's config.json describes.

    Raises:
        FileNotFoundError: config.json is missing.
        ValueError: config.json is not valid JSON or not a Llama config.
    """
    return LlamaConfig.from_hf(
        read_json(Path(directory) / CONFIG_FILE, "a Hugging Face checkpoint needs it beside its safetensors")
    )


def check_hf_tensors(
    directory: str | os.PathLike, expected: Mapping[str, torch.Size]
) -> dict[str, StoredTensor]:
    """The tensors of a Hugging Face checkpoint by hermes name, checked from the safetensors headers alone
    (no data is read) against `expected` (hermes name -> shape).

    Raises:
        FileNotFoundError: a shard the index lists is missing.
        ValueError: an unreadable index or shard (named), or tensors missing, unexpected or of the wrong
            shape (all listed, each with its file and both shapes).
    """
    directory = Path(directory)
    files, listing = hf_weight_files(directory)
    stored: dict[str, StoredTensor] = {}
    unexpected: list[StoredTensor] = []
    for file in dict.fromkeys(files.values()):
        with open_safetensors(directory / file) as handle:
            names = handle.keys()
            for name in names:
                if files.get(name) != file or HF_IGNORED.fullmatch(name):
                    continue
                entry = StoredTensor(name, tuple(handle.get_slice(name).get_shape()), file)
                try:
                    stored[hermes_name(name)] = entry
                except ValueError:
                    unexpected.append(entry)

    def why_missing(name: str) -> str:
        if name not in files:
            return f"{listing} {'lists' if listing == SAFETENSORS_INDEX else 'holds'} no such tensor"
        return f"{files[name]} does not hold it, though {listing} lists it there"

    check_against(expected, stored, unexpected, hf_name, why_missing, directory)
    return stored


def _read_hf(directory: Path, device, dtype) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    config = read_hf_config(directory)
    stored = check_hf_tensors(directory, expected_shapes(config))
    state = {}
    for file in dict.fromkeys(s.file for s in stored.values()):
        with open_safetensors(directory / file) as handle:
            for name, entry in stored.items():
                if entry.file == file:
                    state[name] = _convert(handle.get_tensor(entry.name), device, dtype)
    return config, state


def _meta_shard_files(directory: Path) -> list[Path]:
    """consolidated.NN.pth files in rank order."""
    return sorted(directory.glob(META_SHARD_PATTERN), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))


def _load_meta_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint ({err}); it is truncated or corrupt: "
            "download it again"
        ) from err


def _read_meta(directory: Path, device, dtype) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    params = read_json(directory / META_PARAMS_FILE, "a Meta checkpoint needs it beside consolidated.NN.pth")
    paths = _meta_shard_files(directory)
    names = [p.name for p in paths]
    merged = merge_meta_shards([_load_meta_shard(p) for p in paths], names)
    # params.json of Llama 3 may say vocab_size -1: the embedding (or output head) rows tell.
    rows = merged.get("tok_embeddings.weight", merged.get("output.weight"))
    config = LlamaConfig.from_meta(params, vocab_size=None if rows is None else rows.shape[0])
    # params.json does not say whether the head is tied: a checkpoint without its weight is (Llama 3.2).
    config = config.replace(tie_word_embeddings=TIED_HEAD_WEIGHT not in merged)
    listing = ", ".join(names)
    stored = {name: StoredTensor(name, tuple(t.shape), listing) for name, t in merged.items()}
    check_against(
        expected_shapes(config), stored, [], str, lambda _: f"none of {listing} holds it", directory
    )
    state = from_meta_state_dict(merged, config.n_heads, config.n_kv_heads)
    return config, {name: _convert(t, device, dtype) for name, t in state.items()}
