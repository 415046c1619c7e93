"""Supervised fine-tuning: the step (cross-entropy over assistant tokens, normalised over the global batch)
and `main`, which wires configuration, data, model, parallelism and the shared loop together."""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.distributed.tensor.parallel import loss_parallel

from hermes.config import Config, parse_args
from hermes.data.loader import StepBatch
from hermes.parallel.fsdp import sync_gradients_after
from hermes.train import build
from hermes.train.loop import TrainState, run
from hermes.train.losses import sft_loss


def sft_step(model: nn.Module, batch: StepBatch, dp_size: int) -> dict[str, torch.Tensor]:
    """Forward + backward over this rank's micro-batches.

    Each micro-batch's loss is its summed negative log-likelihood over the global batch's labelled-token
    count; summed over micro-batches and ranks that is the step's mean token loss. FSDP averages gradients
    over the data-parallel ranks, so the backward pass scales by dp_size to get the gradient of that sum.
    """
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    last = len(batch.micro_batches) - 1
    for i, micro in enumerate(batch.micro_batches):
        sync_gradients_after(model, last_micro_batch=i == last)
        micro = micro.to(device)
        with loss_parallel():  # a vocabulary-sharded output head's softmax, forward and backward
            logprobs = model(
                micro.tokens,
                position_ids=micro.position_ids,
                cu_seqlens=micro.cu_seqlens,
                max_seqlen=micro.max_seqlen,
                labels=micro.labels,
            )
            loss = sft_loss(logprobs, batch.global_labelled_tokens)
            (loss * dp_size).backward()
        total += loss.detach()
    return {"loss": total}


def main(argv: list[str] | None = None) -> Config:
    """Run SFT as configured by `argv` (`[--config FILE] [--section.key value ...]`)."""
    config = parse_args(sys.argv[1:] if argv is None else argv)
    env = build.environment(config)
    dataset = build.sft_dataset(config, env)
    loader = build.loader(config, env, dataset)
    model = build.model(config, env)
    optimizer, scheduler, total_steps = build.optimization(config, model, loader)
    build.write_resolved_config(config)
    state = TrainState(model, optimizer, scheduler, loader, total_steps)
    dp_size = env.dims.dp_size
    run(
        config,
        state,
        lambda m, batch: sft_step(m, batch, dp_size),
        flops_fn=build.flops_counter(model.config),
        tp=env.dims.tp,
    )
    build.export(config, env, model)
    build.finish()
    return config
