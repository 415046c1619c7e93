"""The compressed-tensors side of the FP8 export, through the library itself (`pip install 'hermes[fp8]'`):
the quantization config of llm-compressor's FP8_DYNAMIC preset and the library's own serialisation of it
into config.json, and each weight compressed to float8 by the library's quantisation kernel with the
per-channel scale hermes.model.fp8 computes (llm-compressor's rule). vLLM serves the result as it is.
"""

from __future__ import annotations

import os

import torch

try:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        preset_name_to_scheme,
        quantize,
    )
except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "The FP8 export writes the compressed-tensors format through its library: pip install 'hermes[fp8]'"
    ) from error

from hermes.model.fp8 import FP8_DTYPE

SCHEME = "FP8_DYNAMIC"
"""llm-compressor's preset: float8 weights per output channel (static), float8 activations per token
(dynamic)."""
TARGETS = ["Linear"]
IGNORE = ["lm_head"]
"""Every Linear but the output head; hermes' embedding and norms are no Linear, so they stay unquantised."""


def quantization_config() -> QuantizationConfig:
    """FP8_DYNAMIC over every Linear but lm_head, stored compressed in the float-quantized format."""
    return QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme(SCHEME, TARGETS)},
        ignore=IGNORE,
        format=CompressionFormat.float_quantized.value,
        quantization_status=QuantizationStatus.COMPRESSED,
    )


def write_quantization_config(directory: str | os.PathLike) -> None:
    """Add `quantization_config` to the config.json in `directory`, serialised by the library."""
    ModelCompressor(quantization_config=quantization_config()).update_config(str(directory))


def compress_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A weight in float8, quantised by compressed-tensors' own kernel (what its float-quantized compressor
    runs) with the given per-channel scales.

    Args:
        weight: [rows, in], any floating dtype (taken in float32, so the quotient is rounded once, to the
            nearest float8).
        scale: [rows, 1], as `hermes.model.fp8.channel_scale` computes them (a sharded weight's rows with
            the scales of their whole rows).

    Returns:
        float8_e4m3fn [rows, in].
    """
    weights = quantization_config().config_groups["group_0"].weights
    return quantize(x=weight.float(), scale=scale.float(), zero_point=None, args=weights, dtype=FP8_DTYPE)
