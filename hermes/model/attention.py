"""The attention seam: causal attention over packed rows, where each row may hold several samples.

Every backend takes q [batch, seq, heads, head_dim] and k, v [batch, seq, kv_heads, head_dim] (grouped-query
attention: kv_heads divides heads) plus, for packed rows, `cu_seqlens`: int32 cumulative sample offsets into
the flattened batch*seq tokens (0, ..., batch*seq), with a boundary at every row start. Tokens attend only to
earlier tokens of their own sample. Backends differ in speed and in the devices and dtypes they take, never
in result:

- "flash": flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16, `pip install hermes[gpu]`).
- "varlen": torch's own `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16, torch >= 2.10).
- "flex": torch's `flex_attention` with a document-causal block mask (compiled on CUDA; forward only on CPU).
- "segments": torch SDPA run on each sample alone (a Python loop over samples): any device, dtype and
  autograd, and only each sample's own query-key pairs are computed; the CPU path.
- "reference": torch SDPA with a block-diagonal causal mask over each whole row; any device, dtype and
  autograd; the definition the others are tested against.
- "auto": the first of flash, varlen, flex that fits a CUDA device and dtype, else segments.

Incremental decoding (generation) goes through `masked_attention` instead: the new queries attend to the keys
and values kept in a `KVCache`, with an explicit boolean mask (`cache_attention_mask`) that is causal from the
cache offset and hides the left padding of shorter prompts in a batch.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "varlen", "flex", "segments", "reference")


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
    return masked_attention(q, k, v, document_causal_mask(cu_seqlens, batch, seq))


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention with an explicit mask (torch SDPA): any device, dtype and autograd.

    Args:
        q: [batch, q_len, heads, head_dim].
        k, v: [batch, k_len, kv_heads, head_dim].
        mask: boolean, broadcastable to [batch, heads, q_len, k_len]; True where the query may attend to the
            key. Every query must be allowed at least one key.

    Returns:
        [batch, q_len, heads, head_dim].
    """
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


def per_sample_attention(q, k, v, cu_seqlens, max_seqlen):
    """Causal SDPA over each sample of the flattened tokens on its own: work grows with the sum of the
    squared sample lengths, not with the squared row length (a dense mask's cost)."""
    batch, seq = q.shape[:2]
    flat = [x.reshape(1, batch * seq, *x.shape[2:]).transpose(1, 2) for x in (q, k, v)]
    bounds = cu_seqlens.tolist()
    pieces = [
        F.scaled_dot_product_attention(*(x[:, :, start:end] for x in flat), is_causal=True, enable_gqa=True)
        for start, end in itertools.pairwise(bounds)
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).reshape(q.shape)


_IMPLEMENTATIONS = {
    "flash": flash_attention,
    "varlen": torch_varlen_attention,
    "flex": flex_attention_packed,
    "segments": per_sample_attention,
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
    names += ["segments", "reference"]
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


# Incremental decoding ------------------------------------------------------------------------------------


def cache_attention_mask(padding: torch.Tensor, start: int, seq: int) -> torch.Tensor:
    """Boolean [batch, 1, seq, start + seq] mask of `seq` new queries at cache positions start, start+1, ...

    A query attends to the keys at or before its own position that are not left padding (row b's first
    `padding[b]` positions). A padding query attends to itself alone, so that no row is fully masked (a fully
    masked row would make NaN, and NaN in a padding position's value would leak through a zero weight).

    Args:
        padding: [batch] int, the number of left-padding positions of each row.
        start: the cache position of the first new query (the number of positions already cached).
        seq: the number of new queries.
    """
    keys = torch.arange(start + seq, device=padding.device)  # [k_len]
    queries = keys[start:, None]  # [seq, 1]
    real_key = keys[None, :] >= padding[:, None]  # [batch, k_len]
    allowed = (keys[None, :] <= queries)[None] & real_key[:, None, :]  # [batch, seq, k_len]
    allowed |= keys[None, :] == queries  # the diagonal, for padding queries
    return allowed[:, None]


@dataclass(eq=False)
class KVCache:
    """Keys and values of the positions already processed, per layer, for incremental decoding.

    Filled by a forward pass that is given the cache: each layer stores the keys and values of the new
    positions at [length, length + seq) and attends over [0, length + seq); `length` then advances by seq.
    Build one with `Llama.new_cache` (or `KVCache.empty`).

    Attributes:
        keys, values: per layer, [batch, max_len, kv_heads, head_dim].
        padding: [batch] int64, left-padding positions of each row (never attended to).
        length: positions filled so far.
        mask: the attention mask of the step in progress (set by `begin`, see `cache_attention_mask`).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    padding: torch.Tensor
    length: int = 0
    mask: torch.Tensor | None = None

    @classmethod
    def empty(
        cls,
        layers: int,
        batch: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        padding: Sequence[int] | torch.Tensor | None = None,
    ) -> KVCache:
        """An empty cache of `max_len` positions; `padding` gives each row's left padding (default none).

        Raises:
            ValueError: `padding` does not have one entry per row, or an entry outside [0, max_len].
        """
        shape = (batch, max_len, kv_heads, head_dim)
        pad = torch.as_tensor([0] * batch if padding is None else padding, dtype=torch.long, device=device)
        if pad.shape != (batch,) or bool(((pad < 0) | (pad > max_len)).any()):
            raise ValueError(
                f"padding must give a left-padding length in [0, {max_len}] for each of the {batch} rows, "
                f"got {pad.tolist()}"
            )
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
            padding=pad,
        )

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[1]

    def positions(self, seq: int) -> torch.Tensor:
        """RoPE position ids [batch, seq] of the next `seq` positions, counted from each row's first real
        token (0 on padding)."""
        cache_positions = torch.arange(self.length, self.length + seq, device=self.padding.device)
        return (cache_positions[None, :] - self.padding[:, None]).clamp(min=0)

    def begin(self, seq: int) -> None:
        """Prepare a forward pass over `seq` new positions: the mask every layer uses.

        Raises:
            ValueError: the cache has no room for `seq` more positions.
        """
        if self.length + seq > self.max_len:
            raise ValueError(
                f"the KV cache holds {self.max_len} positions and {self.length} are used; {seq} more do not "
                "fit: build the cache with a larger max_len"
            )
        self.mask = cache_attention_mask(self.padding, self.length, seq)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' k, v [batch, seq, kv_heads, head_dim] of `layer`; return the layer's
        keys and values [batch, length + seq, kv_heads, head_dim] over every position so far."""
        end = self.length + k.shape[1]
        self.keys[layer][:, self.length : end] = k
        self.values[layer][:, self.length : end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def end(self, seq: int) -> None:
        """Finish the forward pass: the `seq` new positions are now cached."""
        self.length += seq
        self.mask = None
