"""FP8 numerics of llm-compressor's FP8_DYNAMIC scheme (the one vLLM serves), in plain torch.

- Weights: float8_e4m3fn, symmetric, one static scale per output channel (row): scale = row absmax / 448
  (448 is the largest e4m3 value), rounded to the scale's dtype; the row is divided by its scale in float32,
  clamped to [-448, 448] and rounded to the nearest e4m3 value (ties to even). No calibration data.
- Activations: one dynamic scale per token, computed the same way from the token's absmax at run time, in
  float32.
- A zero row or token has absmax 0: its scale is the machine epsilon of the scale's dtype instead (what
  compressed-tensors' `calculate_qparams`, which llm-compressor calls, puts in place of a zero scale), so
  nothing is divided by zero and the row quantises to zeros.

llm-compressor divides a weight by its scale in the weight's own dtype (bfloat16 rounds the quotient once
before the e4m3 rounding); here the quotient is float32, so a bfloat16 weight can differ from its output by
one e4m3 step where that double rounding lands on a tie.

`scaled_matmul` is the FP8 matrix product: `torch._scaled_mm` on a GPU that has FP8 matrix cores, else
`scaled_matmul_reference`, its float32 twin on any device.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
"""448.0, the largest finite float8_e4m3fn value: a channel's absmax maps onto it."""

_SCALED_MM_CAPABILITY = (8, 9)
"""CUDA compute capability from which torch._scaled_mm multiplies float8 (Ada, Hopper and later)."""
_SCALED_MM_ALIGNMENT = 16
"""torch._scaled_mm needs the inner and output widths to be multiples of this."""


def absmax_scale(absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The FP8 scale of each absmax: absmax / 448 rounded to `dtype`, the epsilon of `dtype` where it is 0.

    Args:
        absmax: non-negative absolute maxima (any shape).
        dtype: the scale's floating-point dtype.

    Returns:
        Scales of `absmax`'s shape, in `dtype`.
    """
    scale = (absmax.float() / FP8_MAX).to(dtype)
    return torch.where(scale == 0, torch.finfo(dtype).eps, scale)


def channel_scale(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One scale per output channel (row) of a weight.

    Args:
        weight: [out, in].
        dtype: the scales' dtype; default the weight's (as llm-compressor stores them).

    Returns:
        [out, 1] scales (`absmax_scale` of each row's absmax).
    """
    return absmax_scale(weight.abs().amax(dim=1, keepdim=True), dtype or weight.dtype)


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x in float8 with the given scales.

    Args:
        x: values (any floating dtype).
        scale: scales broadcastable against x ([rows, 1] for rows of x).

    Returns:
        x / scale, computed in float32, clamped to [-448, 448] (so nothing overflows to NaN, whatever the
        scale) and rounded to the nearest float8_e4m3fn (ties to even), of x's shape.
    """
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [out, in] in FP8 with its per-channel scale.

    Returns:
        (float8_e4m3fn weight [out, in], scale [out, 1] in the weight's dtype).
    """
    scale = channel_scale(weight)
    return quantize(weight, scale), scale


def dequantize(
    quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The values float8 `quantized` stands for.

    Args:
        quantized: float8_e4m3fn values.
        scale: their scales, broadcastable against them.
        dtype: of the result.

    Returns:
        quantized * scale, formed in float32 (where it is exact for float32, bfloat16 and float16 scales)
        and rounded once to `dtype`.
    """
    return (quantized.float() * scale.float()).to(dtype)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8 of activations x [..., features].

    Returns:
        (float8_e4m3fn x [..., features], float32 scale [..., 1]).
    """
    scale = absmax_scale(x.abs().amax(dim=-1, keepdim=True), torch.float32)
    return quantize(x, scale), scale


def scaled_matmul(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The product of FP8 tokens and an FP8 weight, each with its scales: (x * x_scale) @ (weight *
    weight_scale).T.

    On a CUDA device of compute capability 8.9 or more, with `in` and `out` multiples of 16, torch's FP8
    matrix product `torch._scaled_mm` (float32 accumulation, row-wise scales, bfloat16 output); elsewhere
    `scaled_matmul_reference`, which computes the same in float32.

    Args:
        x: float8_e4m3fn tokens [tokens, in].
        x_scale: float32 [tokens, 1].
        weight: float8_e4m3fn [out, in].
        weight_scale: [out, 1].
        dtype: of the result.

    Returns:
        [tokens, out] in `dtype`.
    """
    if _has_fp8_matmul(x, weight):
        out = torch._scaled_mm(
            x,
            weight.t(),
            scale_a=x_scale.float().contiguous(),
            scale_b=weight_scale.float().t().contiguous(),
            out_dtype=torch.bfloat16,
        )
        return out.to(dtype)
    return scaled_matmul_reference(x, x_scale, weight, weight_scale, dtype)


def scaled_matmul_reference(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`scaled_matmul` in float32 on any device (same arguments and result): the FP8 values are exact in
    float32, their products are accumulated in float32 and scaled by both scales, as the GPU kernel does."""
    product = x.float() @ weight.float().t()  # [tokens, out]
    return (product * x_scale.float() * weight_scale.float().t()).to(dtype)


def _has_fp8_matmul(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `torch._scaled_mm` multiplies these operands: a CUDA device with FP8 matrix cores and widths
    it accepts."""
    if x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) < _SCALED_MM_CAPABILITY:
        return False
    return weight.shape[0] % _SCALED_MM_ALIGNMENT == 0 and weight.shape[1] % _SCALED_MM_ALIGNMENT == 0
