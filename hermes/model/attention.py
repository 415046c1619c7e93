"""The attention seam: causal attention over packed rows, where each row may hold several samples.

Every backend takes q [batch, seq, heads, head_dim] and k, v [batch, seq, kv_heads, head_dim] (grouped-query
attention: kv_heads divides heads) plus, for packed rows, `cu_seqlens`: int32 cumulative sample offsets into
the flattened batch*seq tokens (0, ..., batch*seq), with a boundary at every row start. Tokens attend only to
earlier tokens of their own sample. Backends differ in speed, never in result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "reference")


def segment_ids(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Index of the sample each token belongs to, [batch, seq], from cumulative offsets."""
    positions = torch.arange(batch * seq, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, positions, right=True).view(batch, seq)


def document_causal_mask(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Boolean [batch, 1, seq, seq] mask: True where query i may attend to key j (same sample, j <= i)."""
    seg = segment_ids(cu_seqlens, batch, seq)
    same_sample = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=seg.device).tril()
    return (same_sample & causal)[:, None]


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """Packed causal attention on any device: torch SDPA with a block-diagonal causal mask."""
    batch, seq = q.shape[:2]
    mask = document_causal_mask(cu_seqlens, batch, seq)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True
    )
    return out.transpose(1, 2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal (grouped-query) attention; packed when `cu_seqlens` is given.

    Args:
        q: [batch, seq, heads, head_dim].
        k, v: [batch, seq, kv_heads, head_dim].
        cu_seqlens: int32 [n_samples + 1] offsets into the flattened batch*seq tokens, or None when each
            row is one sample.
        max_seqlen: the longest sample (used by fused varlen kernels).
        backend: one of BACKENDS; "auto" picks the fastest available for the device.

    Returns:
        [batch, seq, heads, head_dim].
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        return out.transpose(1, 2)
    return reference_attention(q, k, v, cu_seqlens)
