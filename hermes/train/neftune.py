"""NEFTune: uniform noise on the input embeddings of training forward passes.

noise = U(-1, 1) * alpha / sqrt(L * d), with d the model width and L the length of the token's OWN sample.
Common implementations use the padded or packed row length, which shrinks the noise of every sample in a
packed row; here each sample gets the scale of its own length. Under sequence parallelism each rank's
embeddings are one chunk of the sequence; the scale is still that of each token's whole sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def neftune_scale(cu_seqlens: torch.Tensor, batch: int, seq: int, dim: int, alpha: float) -> torch.Tensor:
    """Per-token noise bound alpha / sqrt(L * d), [batch, seq], L the length of the token's segment."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    per_token = torch.repeat_interleave(lengths, lengths).view(batch, seq)
    return alpha / torch.sqrt(per_token.float() * dim)


@contextmanager
def neftune(
    model: nn.Module, alpha: float, cu_seqlens: torch.Tensor, sequence_shard: tuple[int, int] = (0, 1)
) -> Iterator[None]:
    """Within this block, every forward of `model.tok_embeddings` adds NEFTune noise for packed rows
    delimited by `cu_seqlens` (a forward hook, so it also works when the model is sharded). alpha <= 0 is off.

    Args:
        sequence_shard: (index, count) when the embeddings come out split on the sequence dimension into
            `count` equal chunks (sequence parallelism: the tensor-parallel rank and degree); this rank
            holds chunk `index`.
    """
    if alpha <= 0:
        yield
        return
    index, count = sequence_shard

    def add_noise(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        batch, local_seq, dim = output.shape
        seq = local_seq * count
        if batch * seq != int(cu_seqlens[-1]):
            raise ValueError(
                f"NEFTune got embeddings of {batch} x {local_seq} tokens per rank, {count} sequence chunk(s), "
                f"but cu_seqlens covers {int(cu_seqlens[-1])} tokens; the sequence length must divide by the "
                "tensor-parallel degree"
            )
        scale = neftune_scale(cu_seqlens.to(output.device), batch, seq, dim, alpha)
        local_scale = scale.chunk(count, dim=1)[index].to(output.dtype)
        return output + torch.empty_like(output).uniform_(-1, 1) * local_scale[..., None]

    handle = model.tok_embeddings.register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()
