"""Direct preference optimisation through a LoRA adapter, in reading order: configuration -> data ->
model -> trainer -> step -> export. The reference model is the same weights with the adapter switched off
(no second copy), and NEFTune noise goes into the policy's training forward passes only.

Validation (data.validation, data.validation_fraction: held-out pairs) runs every train.eval_every steps
and at every epoch end: the DPO loss, rewards and accuracies of the validation pairs, means over all of
them (`val_loss`, `val_rewards/accuracies`, ...). With train.export_every_epoch each epoch writes its
adapter and merged model (hermes.parallel.export.export_epoch).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from hermes.config import ConfigError, DPOConfig, DpoConfig, parse_args
from hermes.data.loader import StepBatch
from hermes.data.packing import PackedBatch
from hermes.model.lora import adapter_disabled
from hermes.parallel.build import build_model
from hermes.parallel.export import export_adapter, export_epoch, export_fp8
from hermes.train import build
from hermes.train.epoch_evaluation import EpochEvaluation
from hermes.train.losses import dpo_loss, segment_sums
from hermes.train.neftune import neftune
from hermes.train.showcase import report_dpo
from hermes.train.trainer import Trainer

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
    logprobs = model(micro.tokens, micro.packing, labels=micro.labels)
    segments = torch.tensor(micro.sample_segments, dtype=torch.long, device=logprobs.device)
    return segment_sums(logprobs, micro.cu_seqlens).index_select(0, segments)


def dpo_step(
    model: nn.Module,
    batch: StepBatch,
    micro_batches: Iterable[PackedBatch],
    config: DpoConfig,
    sequence_shard: tuple[int, int] = (0, 1),
) -> dict[str, torch.Tensor]:
    """Forward and backward of this rank's pairs (samples come in (chosen, rejected) order); returns
    per-pair metric sums divided by the global pair count, so the sum over ranks is the global mean.
    `sequence_shard` is (tensor-parallel rank, degree) under sequence parallelism (for NEFTune)."""
    global_pairs = len(batch.global_sample_lengths) // 2
    totals = dict.fromkeys(DPO_METRICS, torch.zeros(()))
    for micro in micro_batches:
        with torch.no_grad(), adapter_disabled(model), _eval_mode(model):
            reference = sequence_logprobs(model, micro)  # the same weights with the adapter off
        with neftune(model, config.neftune_alpha, micro.cu_seqlens, sequence_shard):
            policy = sequence_logprobs(model, micro)
        pairs = policy.numel() // 2
        if pairs == 0:  # an all-padding micro-batch: a zero loss still runs the backward collectives
            (policy.sum() * 0.0).backward()
            continue
        loss, metrics = dpo_loss(
            policy[0::2], policy[1::2], reference[0::2], reference[1::2], config.beta, config.label_smoothing
        )
        share = pairs / global_pairs
        (loss * share).backward()
        for key, value in {"loss": loss.detach(), **metrics}.items():
            totals[key] = totals[key].to(value.device) + value * share
    return totals


@torch.no_grad()
def dpo_validation(
    model: nn.Module, batch: StepBatch, micro_batches: Iterable[PackedBatch], config: DpoConfig
) -> dict[str, torch.Tensor]:
    """This rank's sums over its pairs of `batch` of the DPO loss and metrics (no backward, no NEFTune; the
    Trainer has put the model in eval mode): `Trainer.validate` divides them by the global pair count."""
    totals = dict.fromkeys(DPO_METRICS, torch.zeros(()))
    for micro in micro_batches:
        with adapter_disabled(model):
            reference = sequence_logprobs(model, micro)
        policy = sequence_logprobs(model, micro)
        pairs = policy.numel() // 2
        if pairs == 0:
            continue
        loss, metrics = dpo_loss(
            policy[0::2], policy[1::2], reference[0::2], reference[1::2], config.beta, config.label_smoothing
        )
        for key, value in {"loss": loss, **metrics}.items():
            totals[key] = totals[key].to(value.device) + value * pairs
    return totals


def pairs(batch: StepBatch) -> int:
    """The global batch's pair count: what DPO's metrics are means over."""
    return len(batch.global_sample_lengths) // 2


def main(argv: list[str] | None = None) -> DPOConfig:
    """Run DPO as configured by `argv` (`[--config FILE] [--section.key value ...]`)."""
    config = parse_args(sys.argv[1:] if argv is None else argv, DPOConfig)
    if config.logging.showcase_prompts:
        raise ConfigError(
            "logging.showcase_prompts answers held-out SFT prompts; a DPO run ends with its reward summary "
            "instead (RUN_DIR/showcase.json): set --logging.showcase_prompts 0"
        )
    if not config.lora.rank:
        raise ConfigError(
            "DPO trains a LoRA adapter (the reference is the model with it off): set lora.rank > 0"
        )
    env = build.environment(config)
    epoch_evaluation = EpochEvaluation(config, env.device)  # train.epoch_tasks, checked now
    dataset = build.preference_dataset(config, env)
    loader = build.loader(config, env, dataset, group_size=2)
    validation = build.preference_validation_dataset(config, env)
    validation_loader = (
        build.loader(config, env, validation, group_size=2) if validation is not None else None
    )
    model = build_model(config, env.meshes, env.device, lora=config.lora)
    trainer = Trainer(config, env, model, loader, trainable_only_checkpoints=True, reference_forward=True)
    sequence_shard = (env.meshes.tp.get_local_rank(), env.dims.tp)

    def validation_sums(model: nn.Module, batch: StepBatch, micro_batches: Iterable[PackedBatch]) -> dict:
        return dpo_validation(model, batch, micro_batches, config.dpo)

    for batch in trainer.batches():
        trainer.step(batch, dpo_step(model, batch, trainer.micro_batches(batch), config.dpo, sequence_shard))
        if validation_loader is not None and trainer.validation_due:
            trainer.validate(validation_loader, validation_sums, per=pairs)
        if trainer.epoch_ended:
            epoch_evaluation.after_export(export_epoch(config, env.chat, model, trainer.epoch))
    if trainer.finish():
        export_adapter(config, env.chat, model)
        export_fp8(config, env.chat, model)
        report_dpo(config.run_dir)  # rank 0: first vs last steps' accuracies and margins
    build.finish(env)
    return config
