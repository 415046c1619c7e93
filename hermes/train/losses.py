"""Losses: token cross-entropy normalised over the global batch, and per-sample log-probability sums."""

from __future__ import annotations

import torch


def sft_loss(label_logprobs: torch.Tensor, global_labelled_tokens: int) -> torch.Tensor:
    """Negative log-likelihood of this micro-batch's labelled tokens, divided by the labelled-token count
    of the WHOLE global batch (all micro-batches, all data-parallel ranks).

    Summing these over micro-batches and ranks gives the mean over every labelled token of the step, so
    neither gradient accumulation nor the world size changes the loss or its gradient, and a sample weighs
    the same whatever its packed row-mates hold.

    Args:
        label_logprobs: [batch, seq] log p(label), 0 where the label is ignored (Llama.forward(labels=...)).
        global_labelled_tokens: labelled tokens in the global batch (> 0).
    """
    if global_labelled_tokens <= 0:
        raise ValueError("The global batch has no labelled token; every sample in it is fully masked")
    return -label_logprobs.sum() / global_labelled_tokens


def segment_sums(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sum of `values` [batch, seq] over each segment of the flattened tokens delimited by `cu_seqlens`."""
    flat = values.reshape(-1)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=flat.device), lengths)
    return torch.zeros(lengths.numel(), dtype=flat.dtype, device=flat.device).index_add(0, segment, flat)
