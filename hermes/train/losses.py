"""Losses: token cross-entropy normalised over the global batch, per-sample log-probability sums, DPO."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO loss over summed response log-probabilities, one entry per pair.

    r_w = beta * (policy_chosen - ref_chosen), r_l = beta * (policy_rejected - ref_rejected);
    loss = mean(-(1 - eps) * logsigmoid(r_w - r_l) - eps * logsigmoid(r_l - r_w)), with eps the label
    smoothing (conservative DPO; 0 is the original loss).

    Returns:
        The mean loss and per-pair-mean metrics: rewards/chosen (r_w), rewards/rejected (r_l),
        rewards/margins (r_w - r_l), rewards/accuracies (fraction with r_w > r_l), logps/chosen,
        logps/rejected (all detached).
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    margin = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    metrics = {
        "rewards/chosen": chosen_rewards.detach().mean(),
        "rewards/rejected": rejected_rewards.detach().mean(),
        "rewards/margins": margin.detach().mean(),
        "rewards/accuracies": (margin.detach() > 0).float().mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }
    return losses.mean(), metrics
