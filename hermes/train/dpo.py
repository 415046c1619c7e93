"""Direct preference optimisation through a LoRA adapter: the reference model is the same weights with the
adapter switched off (no second copy), and NEFTune noise goes into the policy's training forward passes only.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor.parallel import loss_parallel

from hermes.config import Config, parse_args
from hermes.data.loader import StepBatch
from hermes.data.packing import PackedBatch
from hermes.model.lora import adapter_disabled
from hermes.parallel.fsdp import sync_gradients_after
from hermes.train import build
from hermes.train.loop import TrainState, run
from hermes.train.losses import dpo_loss, segment_sums
from hermes.train.neftune import neftune

DPO_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
"""What a DPO step logs: each the mean over the global batch's pairs."""


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    model.eval()
    try:
        yield
    finally:
        model.train()


def sequence_logprobs(model: nn.Module, micro: PackedBatch) -> torch.Tensor:
    """Summed response log-probability of every packed sample, in order (prompt tokens carry no label)."""
    logprobs = model(
        micro.tokens,
        position_ids=micro.position_ids,
        cu_seqlens=micro.cu_seqlens,
        max_seqlen=micro.max_seqlen,
        labels=micro.labels,
    )
    segments = torch.tensor(micro.sample_segments, dtype=torch.long, device=logprobs.device)
    return segment_sums(logprobs, micro.cu_seqlens).index_select(0, segments)


def dpo_step(
    model: nn.Module,
    batch: StepBatch,
    dp_size: int,
    beta: float,
    label_smoothing: float,
    neftune_alpha: float,
    sequence_shard: tuple[int, int] = (0, 1),
) -> dict[str, torch.Tensor]:
    """Forward + backward of this rank's pairs; returns per-pair metric sums divided by the global pair count
    (so the sum over ranks is the global mean). Samples come in (chosen, rejected) order.
    `sequence_shard` is (tensor-parallel rank, degree) under sequence parallelism (for NEFTune)."""
    device = next(model.parameters()).device
    global_pairs = len(batch.global_sample_lengths) // 2
    totals = {key: torch.zeros((), device=device) for key in DPO_METRICS}
    last = len(batch.micro_batches) - 1
    for i, micro in enumerate(batch.micro_batches):
        sync_gradients_after(model, last_micro_batch=i == last)
        micro = micro.to(device)
        with loss_parallel():  # a vocabulary-sharded output head's softmax, forward and backward
            with torch.no_grad(), adapter_disabled(model), _eval_mode(model):
                reference = sequence_logprobs(model, micro)
            with neftune(model, neftune_alpha, micro.cu_seqlens, sequence_shard):
                policy = sequence_logprobs(model, micro)
            pairs = policy.numel() // 2
            if pairs == 0:  # an all-padding micro-batch: a zero loss still runs the backward collectives
                (policy.sum() * 0.0).backward()
                continue
            chosen, rejected = policy[0::2], policy[1::2]
            loss, metrics = dpo_loss(
                chosen, rejected, reference[0::2], reference[1::2], beta, label_smoothing
            )
            share = pairs / global_pairs
            (loss * share * dp_size).backward()
        for key, value in {"loss": loss.detach(), **metrics}.items():
            totals[key] += value * share
    return totals


def main(argv: list[str] | None = None) -> Config:
    """Run DPO as configured by `argv` (`[--config FILE] [--section.key value ...]`)."""
    config = parse_args(sys.argv[1:] if argv is None else argv)
    env = build.environment(config)
    dataset = build.preference_dataset(config, env)
    loader = build.loader(config, env, dataset, group_size=2)
    model = build.model(config, env, lora=config.lora)
    optimizer, scheduler, total_steps = build.optimization(config, model, loader)
    build.write_resolved_config(config)
    state = TrainState(model, optimizer, scheduler, loader, total_steps, trainable_only_checkpoints=True)
    d = config.dpo
    sequence_shard = (env.mesh["tp"].get_local_rank(), env.dims.tp)
    run(
        config,
        state,
        lambda m, b: dpo_step(
            m, b, env.dims.dp_size, d.beta, d.label_smoothing, d.neftune_alpha, sequence_shard
        ),
        tp=env.dims.tp,
    )
    build.export_adapter(config, env, model)
    build.finish()
    return config
