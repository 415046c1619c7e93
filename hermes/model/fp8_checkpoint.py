"""The FP8 checkpoint layout (compressed-tensors, as llm-compressor writes FP8_DYNAMIC), and reading it.

A Hugging Face Llama directory whose config.json carries a `quantization_config` of quant_method
"compressed-tensors", format "float-quantized": each block projection (`model.layers.N.self_attn.q_proj`
... `mlp.down_proj`) stores `weight` in float8_e4m3fn [out, in] and `weight_scale` [out, 1] in the
checkpoint's dtype; the embedding, the norms and `lm_head` are stored as in the 16-bit export. Written by
hermes.parallel.sharded_fp8 (through the compressed-tensors library); read here without it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from hermes.model.config import LlamaConfig
from hermes.model.fp8 import FP8_DTYPE, dequantize
from hermes.model.fp8_linear import QuantizedWeight, fp8_projections
from hermes.model.hf import (
    CONFIG_FILE,
    expected_shapes,
    hermes_name,
    hf_weight_files,
    open_safetensors,
    read_hf_config,
    read_json,
    stored_state,
)
from hermes.model.llama import Llama

QUANTIZATION_CONFIG_KEY = "quantization_config"
QUANT_METHOD = "compressed-tensors"
FORMAT = "float-quantized"
SCALE_SUFFIX = "_scale"
"""A quantised tensor `X.weight` has its scale beside it as `X.weight_scale`."""

_PROJECTION = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
_WEIGHTS = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
"""The weight settings of FP8_DYNAMIC that this reader implements (per-channel float8)."""


def is_fp8_weight(hf_name: str) -> bool:
    """Whether the FP8 layout quantises the tensor of this Hugging Face name (a block projection's weight)."""
    return _PROJECTION.fullmatch(hf_name) is not None


def is_fp8_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a compressed-tensors checkpoint (config.json names the quant method)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return False
    quantization = read_json(path, "").get(QUANTIZATION_CONFIG_KEY)
    return isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD


@dataclass(frozen=True)
class FP8Checkpoint:
    """An FP8 checkpoint read into memory: the model shape, the tensors stored unquantised (hermes names,
    the checkpoint's dtype) and each block projection's (float8 weight, scale) by hermes module name."""

    config: LlamaConfig
    dense: dict[str, torch.Tensor]
    quantized: dict[str, QuantizedWeight]

    def dequantized_model(self, dtype: torch.dtype | None = None) -> Llama:
        """The plain Llama with every projection dequantised (weight * scale in float32, then `dtype`,
        default the dtype of the unquantised tensors)."""
        dtype = dtype or next(iter(self.dense.values())).dtype
        state = {name: t.to(dtype) for name, t in self.dense.items()}
        for module, (weight, scale) in self.quantized.items():
            state[f"{module}.weight"] = dequantize(weight, scale, dtype)
        with torch.device("meta"):
            model = Llama(self.config)
        model.load_state_dict(state, assign=True)
        return model


def read_fp8_checkpoint(directory: str | os.PathLike) -> FP8Checkpoint:
    """Read an FP8 checkpoint of the layout above (onto the CPU).

    Raises:
        FileNotFoundError: config.json or a listed shard is missing.
        ValueError: a quantization config other than per-channel float8 weights, or tensors missing,
            unexpected, of the wrong shape or dtype (each named).
    """
    directory = Path(directory)
    _check_quantization_config(directory)
    config = read_hf_config(directory)
    files, _ = hf_weight_files(directory)
    tensors: dict[str, torch.Tensor] = {}
    for file in dict.fromkeys(files.values()):
        with open_safetensors(directory / file) as handle:
            names = handle.keys()
            tensors.update({name: handle.get_tensor(name) for name in names if files.get(name) == file})
    expected = expected_shapes(config)
    dense, quantized, problems = {}, {}, []
    for name, tensor in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        try:
            ours = hermes_name(name)
        except ValueError:
            ours = None
        if ours not in expected:
            problems.append(f"{name} (shape {tuple(tensor.shape)}) is not a weight of this model")
        elif tuple(tensor.shape) != tuple(expected[ours]):
            problems.append(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(expected[ours])}")
        elif not is_fp8_weight(name):
            dense[ours] = tensor
        elif tensor.dtype != FP8_DTYPE or tensors.get(name + SCALE_SUFFIX, tensor).shape != (len(tensor), 1):
            problems.append(
                f"{name} must be float8_e4m3fn with a {name}{SCALE_SUFFIX} of shape ({len(tensor)}, 1) beside it"
            )
        else:
            quantized[ours.removesuffix(".weight")] = (tensor, tensors[name + SCALE_SUFFIX])
    missing = sorted(expected.keys() - dense.keys() - {f"{m}.weight" for m in quantized})
    problems += [f"{name} is missing" for name in missing]
    if problems:
        raise ValueError(
            f"{directory} is not an FP8 Llama checkpoint hermes reads:\n  " + "\n  ".join(problems)
        )
    return FP8Checkpoint(config, dense, quantized)


def _check_quantization_config(directory: Path) -> None:
    """config.json's quantization_config is compressed-tensors' float-quantized, per-channel float8 weights."""
    quantization = read_json(directory / CONFIG_FILE, "an FP8 checkpoint needs it").get(
        QUANTIZATION_CONFIG_KEY
    )
    if not isinstance(quantization, dict) or quantization.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{directory / CONFIG_FILE} has no {QUANT_METHOD} {QUANTIZATION_CONFIG_KEY}")
    groups = quantization.get("config_groups") or {}
    weights = [group.get("weights") or {} for group in groups.values() if isinstance(group, dict)]
    settings = [{key: w.get(key) for key in _WEIGHTS} for w in weights]
    if quantization.get("format") != FORMAT or not settings or any(s != _WEIGHTS for s in settings):
        raise ValueError(
            f"{directory / CONFIG_FILE}: hermes reads compressed-tensors checkpoints of format {FORMAT!r} "
            f"with weights {_WEIGHTS} (FP8_DYNAMIC); this one has format {quantization.get('format')!r} "
            f"and weights {settings}"
        )


def export_bytes(model: Llama) -> tuple[int, int]:
    """The tensor bytes of a plain (not yet FP8) model's exports, file headers aside.

    Returns:
        (the Hugging Face export in the model's dtype, the FP8 export: each projection one byte per weight
        plus one scale per output channel in the model's dtype, everything else as in the first).
    """
    state = stored_state(model.state_dict(), model.config)
    dense = sum(t.numel() * t.element_size() for t in state.values())
    saved = 0
    for _, module in fp8_projections(model):
        weight = module.weight
        saved += weight.numel() * (weight.element_size() - 1) - weight.shape[0] * weight.element_size()
    return dense, dense - saved
