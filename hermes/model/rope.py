"""Rotary position embeddings: plain, linearly scaled, or with Llama 3.1 frequency scaling.

hermes rotates halves of each head, (i, i + head_dim/2), as Hugging Face does; Meta's interleaved-pair
checkpoints are permuted on load (see hermes.model.hf). Rotating halves, x*cos + rotate_half(x)*sin with
rotate_half(x) = (-x2, x1), is computed as x*cos + roll(x, head_dim/2)*sin', where sin' is sin with its
first half negated: roll(x) = (x2, x1) costs one copy in forward and one in backward, where slicing and
concatenating the halves cost a negation, a concatenation and two zero-filled slice gradients.
`rope_cos_sin` returns that signed sin, and `RopeCache` keeps both tables for every position below a bound.
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
    """cos and signed sin of position * frequency, each [*position_ids.shape, head_dim], float32: cos with
    its halves repeated, sin as (-sin, sin), the form `apply_rope` takes."""
    angles = position_ids.float()[..., None] * freqs  # [..., head_dim/2]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the halves of x [batch, seq, heads, head_dim] by the tables of `rope_cos_sin`, cos and signed
    sin [batch, seq, head_dim]; computed in float32, returned in x's dtype."""
    x32 = x.float()
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.addcmul(x32 * cos, x32.roll(x.shape[-1] // 2, dims=-1), sin).to(x.dtype)


class RopeCache:
    """The `rope_cos_sin` tables of positions 0, 1, ..., n - 1 for one model, built once per device and
    indexed by each forward's position ids, so packed rows (positions restarting at every sample) and
    decoding (positions past the prompt) read the same rows.

    A table grows to the next power of two above the largest position asked for. It is plain state, not a
    buffer: no state dict, sharding or `to_empty` touches it, and it is built outside autograd.
    """

    def __init__(self, head_dim: int, theta: float, scaling: AnyRopeScaling | None) -> None:
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(
        self, position_ids: torch.Tensor, bound: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin of each position, [*position_ids.shape, head_dim] float32.

        Args:
            position_ids: int64 positions on the device the tables are wanted on.
            bound: a number every position is known to be below; when None it is read from the positions
                (which waits for an accelerator to compute them).
        """
        if bound is None:
            bound = int(position_ids.max()) + 1 if position_ids.numel() else 1
        cos, sin = self.tables(position_ids.device, bound)
        return cos[position_ids], sin[position_ids]

    def tables(self, device: torch.device, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached tables of `device`, [n, head_dim] each with n >= bound, built or grown as needed."""
        tables = self._tables.get(device)
        if tables is None or tables[0].shape[0] < bound:
            length = 1 << max(bound - 1, 0).bit_length()
            with torch.no_grad():
                freqs = rope_frequencies(self.head_dim, self.theta, self.scaling, device=device)
                tables = rope_cos_sin(torch.arange(length, device=device), freqs)
            self._tables[device] = tables
        return tables
