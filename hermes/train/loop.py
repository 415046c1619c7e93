"""The loop SFT and DPO share: steps, gradient accumulation, clipping, checkpoints, resume, preemption,
metrics. What a step computes is the `StepFn` each recipe passes in."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hermes.config import Config
from hermes.data.loader import PackedLoader, StepBatch
from hermes.parallel.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from hermes.train.metrics import H100_BF16_PEAK_FLOPS, MetricsLog, device_memory
from hermes.train.optim import clip_gradients

StepFn = Callable[[nn.Module, StepBatch], dict[str, torch.Tensor]]
"""Runs forward + backward over a rank's micro-batches of one step and returns metric sums to all-reduce
over ranks (tensors; at least `loss`, already normalised so the sum over ranks is the step's loss)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training stops rather than corrupting the weights."""


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: PackedLoader
    total_steps: int
    trainable_only_checkpoints: bool = False
    """Leave frozen parameters out of checkpoints (LoRA: the base model is read from its own files)."""


class _Preemption:
    """Remembers a SIGTERM so the loop can checkpoint at the next step boundary and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def run(
    config: Config,
    state: TrainState,
    step_fn: StepFn,
    flops_fn: Callable[[StepBatch], float] | None = None,
    tp: int = 1,
) -> int:
    """Train until `state.total_steps`, resuming from the newest complete checkpoint of the run directory.

    Args:
        config: the run configuration.
        state: model, optimizer, scheduler, loader and the step count.
        step_fn: forward + backward of one step on this rank.
        flops_fn: FLOPs of a global batch, for MFU against H100_BF16_PEAK_FLOPS (None: no MFU).
        tp: tensor-parallel degree; the tp ranks of one data-parallel rank report the same sums.

    Returns:
        The number of optimizer steps taken in total (including those before a resume).
    """
    run_dir, rank = config.run_dir, dist.get_rank()
    checkpoints = run_dir / "checkpoints"
    start_step = 0
    resume_from = latest_checkpoint(checkpoints)
    if resume_from is not None:
        trainer = load_checkpoint(resume_from, state.model, state.optimizer, state.trainable_only_checkpoints)
        state.scheduler.load_state_dict(trainer["scheduler"])
        state.loader.load_state_dict(trainer["loader"])
        start_step = trainer["step"]
        if rank == 0:
            print(f"Resuming from {resume_from} (step {start_step})", flush=True)
            _drop_records_after(run_dir / "metrics.jsonl", start_step)
    log = None
    if rank == 0:
        log = MetricsLog(
            run_dir / "metrics.jsonl",
            state.total_steps,
            config.logging.wandb,
            dataclasses.asdict(config),
            config.logging.progress,
        )
    preemption = _Preemption()
    step = start_step
    try:
        while step < state.total_steps:
            started = time.perf_counter()
            batch = state.loader.next_batch()
            state.model.train()
            sums = step_fn(state.model, batch)
            keys = sorted(sums)
            reduced = torch.stack([sums[k].detach().float().reshape(()) for k in keys]).cpu()
            stop = torch.tensor([float(preemption.requested)])
            packed = torch.cat([reduced, stop]).to(next(state.model.parameters()).device)
            dist.all_reduce(packed)
            values = {k: v / tp for k, v in zip(keys, packed[:-1].tolist())}
            if not math.isfinite(values["loss"]):
                raise NonFiniteLossError(
                    f"Loss is {values['loss']} at step {step + 1} (epoch {batch.epoch}); stopping before the update. "
                    f"Lower optim.lr, raise optim.warmup_steps or check the data; resume restarts from "
                    f"{latest_checkpoint(checkpoints) or 'scratch'}."
                )
            grad_norm = clip_gradients(state.model, config.train.grad_clip)
            lr = state.scheduler.get_last_lr()[0]
            state.optimizer.step()
            state.scheduler.step()
            state.optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - started
            record = {
                "step": step,
                "epoch": batch.epoch,
                **values,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": batch.global_real_tokens,
                "tokens_per_s": batch.global_real_tokens / elapsed,
            }
            if flops_fn is not None:
                record["mfu"] = flops_fn(batch) / elapsed / (H100_BF16_PEAK_FLOPS * dist.get_world_size())
            record.update(device_memory())
            if log is not None:
                log.log(record)
            epoch_end = state.loader.epoch_finished
            every = config.train.checkpoint_every
            if (every and step % every == 0) or epoch_end or packed[-1] > 0 or step == state.total_steps:
                save_checkpoint(
                    checkpoints,
                    step,
                    state.model,
                    state.optimizer,
                    _trainer_state(state),
                    state.trainable_only_checkpoints,
                )
            if packed[-1] > 0:
                if rank == 0:
                    print(f"SIGTERM received: checkpoint saved at step {step}; exiting", flush=True)
                break
    finally:
        preemption.restore()
        if log is not None:
            log.close()
    if rank == 0 and step == state.total_steps:
        _plot(run_dir)
    return step


def _plot(run_dir: Path) -> None:
    """Loss, learning rate, throughput (and DPO reward) plots into <run dir>/plots, when matplotlib is there."""
    try:
        from hermes.plots import plot_run

        written = plot_run(run_dir)
    except ImportError as missing:
        print(f"No plots: {missing}", flush=True)
        return
    print(f"Plots: {', '.join(str(p) for p in written)}", flush=True)


def _drop_records_after(metrics: Path, step: int) -> None:
    """Forget the metrics of steps a killed run logged after its last checkpoint: they are redone."""
    if metrics.is_file():
        lines = metrics.read_text().splitlines(keepends=True)
        metrics.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))


def _trainer_state(state: TrainState) -> dict[str, Any]:
    return {"scheduler": state.scheduler.state_dict(), "loader": state.loader.state_dict()}
