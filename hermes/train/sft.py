"""Supervised fine-tuning, in reading order: configuration -> data -> model -> trainer -> step -> export.

The step: every labelled token's negative log-likelihood (assistant content and tool calls), summed on
this rank and divided by the labelled-token count of the whole global batch (all ranks, all micro-batches),
so the summed gradients over ranks are those of the global mean token loss. With `lora.rank > 0` only a
LoRA adapter trains (LoRA SFT) and the adapter is exported beside the merged model.

Validation (data.validation, data.validation_fraction) runs every train.eval_every steps and at every epoch
end: the same NLL over the validation data's labelled tokens, without backward, divided by their global
count (`Trainer.validate`). With train.export_every_epoch each epoch's model is exported for checkpoint
selection (hermes.select --run).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from torch import nn

from hermes.config import Config, parse_args
from hermes.data.loader import StepBatch
from hermes.data.packing import PackedBatch
from hermes.parallel.build import build_model
from hermes.parallel.export import export_adapter, export_epoch, export_fp8, export_model
from hermes.train import build
from hermes.train.epoch_evaluation import EpochEvaluation
from hermes.train.losses import sft_loss
from hermes.train.showcase import Showcase
from hermes.train.trainer import Trainer


def sft_step(
    model: nn.Module, batch: StepBatch, micro_batches: Iterable[PackedBatch]
) -> dict[str, torch.Tensor]:
    """Forward and backward over this rank's micro-batches of `batch`; returns this rank's loss sum."""
    total = torch.zeros(())
    for micro in micro_batches:
        logprobs = model(micro.tokens, micro.packing, labels=micro.labels)
        loss = sft_loss(logprobs, batch.global_labelled_tokens)  # this rank's sum / the global count
        loss.backward()
        total = total.to(loss.device) + loss.detach()
    return {"loss": total}


def sft_nll(
    model: nn.Module, batch: StepBatch, micro_batches: Iterable[PackedBatch]
) -> dict[str, torch.Tensor]:
    """This rank's summed negative log-likelihood over the labelled tokens of `batch` (no backward): the
    validation loss's sum (`Trainer.validate`)."""
    total = torch.zeros(())
    for micro in micro_batches:
        logprobs = model(micro.tokens, micro.packing, labels=micro.labels)
        total = total.to(logprobs.device) - logprobs.sum()
    return {"loss": total}


def main(argv: list[str] | None = None) -> Config:
    """Run SFT as configured by `argv` (`[--config FILE] [--section.key value ...]`)."""
    config = parse_args(sys.argv[1:] if argv is None else argv)
    env = build.environment(config)
    epoch_evaluation = EpochEvaluation(config, env.device)  # train.epoch_tasks, checked now
    showcase = Showcase(config, env)  # held-out prompts (logging.showcase_prompts)
    dataset = build.sft_dataset(config, env)
    loader = build.loader(config, env, dataset)
    validation = build.sft_validation_dataset(config, env)
    validation_loader = build.loader(config, env, validation) if validation is not None else None
    lora = config.lora if config.lora.rank else None
    model = build_model(config, env.meshes, env.device, lora=lora)
    trainer = Trainer(config, env, model, loader, trainable_only_checkpoints=lora is not None)
    showcase.start(model, trainer, validation_loader, sft_nll)  # step 0: validation loss, answers
    for batch in trainer.batches():
        trainer.step(batch, sft_step(model, batch, trainer.micro_batches(batch)))
        if validation_loader is not None and trainer.validation_due:
            trainer.validate(validation_loader, sft_nll)
        if trainer.epoch_ended:
            epoch_evaluation.after_export(export_epoch(config, env.chat, model, trainer.epoch))
    showcase.end(trainer)  # the last step's validation loss and answers
    if trainer.finish():
        if lora is not None:
            export_adapter(config, env.chat, model)
        else:
            export_model(config, env.chat, model)
        export_fp8(config, env.chat, model)
    showcase.report()
    build.finish(env)
    return config
