"""The attention seam: causal attention over packed rows, where each row may hold several samples.

Every backend takes q [batch, seq, heads, head_dim] and k, v [batch, seq, kv_heads, head_dim] (grouped-query
attention: kv_heads divides heads) plus, for packed rows, `cu_seqlens`: int32 cumulative sample offsets into
the flattened batch*seq tokens (0, ..., batch*seq), with a boundary at every row start. Tokens attend only to
earlier tokens of their own sample. Backends differ in speed and in the devices and dtypes they take, never
in result:

- "flash": flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16, `pip install hermes[gpu]`).
- "varlen": torch's own `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16, torch >= 2.10).
- "flex": torch's `flex_attention` with a document-causal block mask (compiled on CUDA; forward only on CPU).
- "reference": torch SDPA with a block-diagonal causal mask; any device, dtype and autograd.
- "auto": the first of flash, varlen, flex that fits the device and dtype, else reference.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "varlen", "flex", "reference")


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


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[2:])  # [batch * seq, heads, head_dim]


def flash_attention(q, k, v, cu_seqlens, max_seqlen):
    from flash_attn import flash_attn_varlen_func

    out = flash_attn_varlen_func(
        _flat(q), _flat(k), _flat(v), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True
    )
    return out.view_as(q)


@functools.cache
def _varlen_causal_kwargs() -> dict:
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    # torch 2.10 / 2.11 take is_causal; later releases express causality as a (-1, 0) window.
    return {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}


def torch_varlen_attention(q, k, v, cu_seqlens, max_seqlen):
    from torch.nn.attention.varlen import varlen_attn

    kwargs = dict(_varlen_causal_kwargs())
    if "enable_gqa" in inspect.signature(varlen_attn).parameters:
        kwargs["enable_gqa"] = True
    else:
        group = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    out = varlen_attn(_flat(q), _flat(k), _flat(v), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
    return out.view_as(q)


class _BlockMaskCache:
    """One block mask per forward pass: every layer sees the same cu_seqlens tensor."""

    def __init__(self) -> None:
        self.key: torch.Tensor | None = None
        self.mask = None

    def get(self, cu_seqlens: torch.Tensor, batch: int, seq: int):
        from torch.nn.attention.flex_attention import create_block_mask

        if self.key is not cu_seqlens:
            seg = segment_ids(cu_seqlens, batch, seq)

            def document_causal(b, h, q_idx, kv_idx):
                return (seg[b, q_idx] == seg[b, kv_idx]) & (kv_idx <= q_idx)

            self.mask = create_block_mask(document_causal, batch, None, seq, seq, device=cu_seqlens.device)
            self.key = cu_seqlens
        return self.mask


_block_masks = _BlockMaskCache()


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_packed(q, k, v, cu_seqlens, max_seqlen):
    from torch.nn.attention.flex_attention import flex_attention

    batch, seq = q.shape[:2]
    mask = _block_masks.get(cu_seqlens, batch, seq)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


def _packed_reference(q, k, v, cu_seqlens, max_seqlen):
    return reference_attention(q, k, v, cu_seqlens)


_IMPLEMENTATIONS = {
    "flash": flash_attention,
    "varlen": torch_varlen_attention,
    "flex": flex_attention_packed,
    "reference": _packed_reference,
}


@functools.cache
def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def _has_torch_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def available_backends(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Packed backends that can run (forward and backward) on this device and dtype, fastest first."""
    device = torch.device(device)
    names = []
    if device.type == "cuda":
        half = dtype in (torch.float16, torch.bfloat16)
        if half and _has_flash_attn():
            names.append("flash")
        if half and _has_torch_varlen():
            names.append("varlen")
        names.append("flex")
    names.append("reference")
    return names


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
        max_seqlen: the longest sample (fused varlen kernels need it; computed when None).
        backend: one of BACKENDS.

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
    if backend == "auto":
        backend = available_backends(q.device, q.dtype)[0]
    if max_seqlen is None and backend in ("flash", "varlen"):
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return _IMPLEMENTATIONS[backend](q, k, v, cu_seqlens, max_seqlen)
