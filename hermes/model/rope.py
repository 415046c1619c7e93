"""Rotary position embeddings: plain, linearly scaled, or with Llama 3.1 frequency scaling.

hermes rotates halves of each head, (i, i + head_dim/2), as Hugging Face does; Meta's interleaved-pair
checkpoints are permuted on load (see hermes.model.hf).
"""

from __future__ import annotations

import math

import torch

from hermes.model.config import AnyRopeScaling, LinearRopeScaling


def rope_frequencies(
    head_dim: int, theta: float, scaling: AnyRopeScaling | None, device=None
) -> torch.Tensor:
    """Inverse frequencies f_i = theta^(-2i/d), i < d/2, scaled (float32).

    No scaling keeps f. Linear scaling divides every f by its factor. Llama 3.1 scaling: wavelengths
    w = 2*pi/f shorter than original_context / high_freq_factor keep f; longer than
    original_context / low_freq_factor get f / factor; in between, f is smoothly interpolated.
    """
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    if scaling is None:
        return freqs.float()
    if isinstance(scaling, LinearRopeScaling):
        return (freqs / scaling.factor).float()
    wavelen = 2 * math.pi / freqs
    context = scaling.original_max_position_embeddings
    low_freq_wavelen = context / scaling.low_freq_factor
    high_freq_wavelen = context / scaling.high_freq_factor
    smooth = (context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scaling.factor, smoothed)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled).float()


def rope_cos_sin(position_ids: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each [batch, seq, head_dim] (halves repeated), float32."""
    angles = position_ids.float()[..., None] * freqs  # [batch, seq, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, seq, heads, head_dim] by cos/sin [batch, seq, head_dim]; computed in float32."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x32 * cos + rotated * sin).to(x.dtype)
