"""The Trainer a recipe drives: everything around the step body that SFT and DPO share.

A recipe reads, in order (hermes/train/sft.py):

    trainer = Trainer(config, env, model, loader)       # optimizer, schedule, checkpointer; resumes
    for batch in trainer.batches():                      # until max_steps, the epochs' end or SIGTERM
        sums = step(model, batch, trainer.micro_batches(batch))   # forward, loss, backward
        trainer.step(batch, sums)                        # reduce, guard, clip, update, log
        if trainer.validation_due:                       # train.eval_every steps and every epoch end
            trainer.validate(validation_loader, sums)    # val_loss, logged as its own record
        if trainer.epoch_ended:
            export_epoch(...)                            # epochs/epoch-K (train.export_every_epoch)
        # back in trainer.batches(): the step's checkpoint, when one is due
    if trainer.finish():                                 # False when preempted: no final export
        export(...)

The Trainer owns resume, the iteration over steps, the micro-batches (gradient-sync policy, the compute
device, the parallel layer's loss context), the reduction of the step's metric sums over the loss mesh,
the non-finite-loss guard, clipping, optimizer and schedule, the metrics log and progress bar, the
profiles asked for (hermes.train.profiling), checkpoints, preemption, the end-of-run plots, and the
validation loss the recipe asks for (`validate`). A step body returns per-rank sums that add up, over the
loss mesh, to the global values (a local loss sum divided by the
global labelled-token count: FSDP does not average gradients, see hermes.parallel.fsdp).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from hermes.config import Config, ConfigError
from hermes.data.loader import PackedLoader, StepBatch
from hermes.data.packing import PackedBatch
from hermes.parallel.checkpoint import Checkpointer, complete_checkpoints, latest_checkpoint
from hermes.parallel.fsdp import sync_gradients_after
from hermes.parallel.tensor_parallel import loss_context
from hermes.train.build import Environment, write_resolved_config
from hermes.train.metrics import H100_BF16_PEAK_FLOPS, MetricsLog, device_memory, training_flops
from hermes.train.optim import apply_hyperparameters, build_optimizer, build_scheduler, clip_gradients
from hermes.train.profiling import StepProfiler

ValidationSums = Callable[[nn.Module, StepBatch, Iterator[PackedBatch]], dict[str, torch.Tensor]]
"""A recipe's validation body: this rank's sums over the micro-batches of a batch, without backward."""


def labelled_tokens(batch: StepBatch) -> int:
    """The labelled-token count of a global batch: what SFT's losses are divided by."""
    return batch.global_labelled_tokens


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training stops rather than corrupting the weights."""


class _Preemption:
    """Remembers a SIGTERM so the trainer can checkpoint at the next step boundary and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def micro_batches(model: nn.Module, batch: StepBatch, device: torch.device) -> Iterator[PackedBatch]:
    """This rank's micro-batches of `batch` on `device`, each yielded with the gradient sync of its
    backward set up and inside the parallel layer's loss context (the loop body runs inside it)."""
    last = len(batch.micro_batches) - 1
    for index, micro in enumerate(batch.micro_batches):
        sync_gradients_after(model, last_micro_batch=index == last)
        with loss_context(model):
            yield micro.to(device)


class Trainer:
    """Optimizer, schedule, checkpoints, metrics and the step loop of one run (module docstring).

    Args:
        config: the run configuration (its [optim], [train] and [logging] sections, and run.dir).
        env: the processes, meshes and compute device.
        model: the parallelised model.
        loader: the packed-batch loader.
        trainable_only_checkpoints: leave frozen parameters out of checkpoints (a LoRA run).
        reference_forward: each step also runs one forward pass without backward over the same tokens
            (DPO's reference model): MFU counts its FLOPs, a third of a training pass's.
    """

    def __init__(
        self,
        config: Config,
        env: Environment,
        model: nn.Module,
        loader: PackedLoader,
        *,
        trainable_only_checkpoints: bool = False,
        reference_forward: bool = False,
    ) -> None:
        self.config, self.env, self.model, self.loader = config, env, model, loader
        self.device = env.device
        self.total_steps = loader.steps_per_epoch * config.train.epochs
        if config.train.max_steps:
            self.total_steps = min(self.total_steps, config.train.max_steps)
        self.optimizer = build_optimizer(model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, self.total_steps)
        self.checkpointer = Checkpointer(
            config.run_dir / "checkpoints",
            model,
            self.optimizer,
            {"scheduler": self.scheduler, "loader": loader},
            trainable_only=trainable_only_checkpoints,
            keep=config.train.keep_checkpoints,
            async_save=config.train.async_checkpoint,
        )
        check_storage(
            self.checkpointer.directory,
            checkpoint_bytes(model, config.optim.name, trainable_only_checkpoints),
        )
        self.completed_steps = self.checkpointer.resume()
        meaning = run_meaning(config, env.data_cache)
        if self.checkpointer.resumed_from is not None:
            changed = _accept_changes(
                self.checkpointer.resumed_state.get("meaning", meaning),
                meaning,
                config,
                self.checkpointer.resumed_from,
            )
            if any(key.startswith("optim.") for key in changed):
                apply_hyperparameters(self.optimizer, self.scheduler, config.optim)
        self.checkpointer.recorded = {"meaning": meaning}
        write_resolved_config(config)
        self._resumed_step = self.completed_steps if self.checkpointer.resumed_from is not None else None
        self._log = None
        if env.rank == 0:
            _drop_records_after(config.run_dir / "metrics.jsonl", self.completed_steps)
            self._log = MetricsLog(
                config.run_dir / "metrics.jsonl",
                self.total_steps,
                self.completed_steps,
                config.logging.wandb,
                dataclasses.asdict(config),
                config.logging.progress,
                config.run.name,
            )
        self._profiler = StepProfiler(
            config.run_dir / "profile",
            env.rank,
            config.logging.profile_steps,
            config.logging.memory_snapshot_step,
        )
        self._preemption = _Preemption()
        self._preempted = False
        self._checkpoint_due: tuple[int, bool] | None = None
        self._started = 0.0
        self._mfu = device_type_is_cuda()
        self._flops_scale = 4 / 3 if reference_forward else 1.0
        self.epoch = 0
        """The (1-based) epoch of the last step done; 0 before any."""
        self.epoch_ended = False
        """Whether the last step finished its epoch."""

    def batches(self) -> Iterator[StepBatch]:
        """The global batch of each remaining step, in training mode. A step's checkpoint is written when
        the recipe asks for the next batch, after its validation and epoch export: a run killed before
        they finish resumes from the previous checkpoint and does them again."""
        while self.completed_steps < self.total_steps and not self._preempted:
            self._profiler.begin(self.completed_steps + 1)
            self._started = time.perf_counter()
            self.model.train()
            yield self.loader.next_batch()
            self._save_due_checkpoint()

    def micro_batches(self, batch: StepBatch) -> Iterator[PackedBatch]:
        """This rank's micro-batches of `batch` (see `micro_batches`)."""
        return micro_batches(self.model, batch, self.device)

    def step(self, batch: StepBatch, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """Finish the step whose backward passes have run: reduce `sums` over the loss mesh, stop on a
        non-finite loss, clip, update, log, and mark a checkpoint due (see `batches`). Returns the logged
        record.

        Raises:
            NonFiniteLossError: the step's loss is NaN or infinite (before the update).
        """
        keys = sorted(sums)
        values = torch.stack([sums[k].detach().float().reshape(()) for k in keys]).to(self.device)
        dist.all_reduce(values, group=self.env.meshes.loss.get_group())
        metrics = dict(zip(keys, values.tolist()))
        stop = torch.tensor([float(self._preemption.requested)], device=self.device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        step = self.completed_steps + 1
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLossError(self._non_finite_message(metrics["loss"], step, batch.epoch))
        grad_norm = clip_gradients(self.model, self.config.train.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.completed_steps, self.epoch = step, batch.epoch
        elapsed = time.perf_counter() - self._started
        record = {
            "step": step,
            "epoch": batch.epoch,
            **metrics,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": batch.global_real_tokens,
            "tokens_per_s": batch.global_real_tokens / elapsed,
        }
        if self._mfu:
            flops = self._flops_scale * training_flops(self.model.config, batch.global_sample_lengths)
            record["mfu"] = flops / elapsed / (H100_BF16_PEAK_FLOPS * dist.get_world_size())
        record.update(device_memory())
        if self._log is not None:
            self._log.log(record)
        self._profiler.end(step)
        self._preempted = stop.item() > 0
        epoch_end = self.epoch_ended = self.loader.epoch_finished
        every = self.config.train.checkpoint_every
        if (every and step % every == 0) or epoch_end or self._preempted or step == self.total_steps:
            self._checkpoint_due = (step, epoch_end)  # written by `batches` or `finish`
        return record

    def _save_due_checkpoint(self) -> None:
        """Write the checkpoint the last step asked for, if any (collective)."""
        if self._checkpoint_due is None:
            return
        step, epoch_end = self._checkpoint_due
        self._checkpoint_due = None
        self.checkpointer.save(step, epoch_end=epoch_end)
        if self._preempted and self.env.rank == 0:
            print(
                f"SIGTERM received: checkpoint saved at step {step} of {self.total_steps}; run the same command "
                "again to resume from it",
                flush=True,
            )

    @property
    def validation_due(self) -> bool:
        """Whether the step just done ends an epoch or is a multiple of train.eval_every."""
        every = self.config.train.eval_every
        return self.epoch_ended or bool(every and self.completed_steps % every == 0)

    @torch.no_grad()
    def validate(
        self, loader: PackedLoader, sums: ValidationSums, per: Callable[[StepBatch], int] = labelled_tokens
    ) -> float:
        """Validation metrics over `loader`'s whole data (one pass over its first epoch's plan) under the
        current weights, without gradients and in eval mode (no dropout): each of the body's per-rank sums
        is added over all batches and the loss mesh and divided by the global count `per` gives each batch
        (labelled tokens, the training loss's normalisation, by default; pairs for DPO). Logged as one
        record {"step", "epoch", "val_<name>", ...}; returns the validation loss (`val_loss`). Collective.

        Args:
            loader: the validation data's loader (its position is reset: every call reads the same rows).
            sums: (model, batch, micro-batches) -> {name: this rank's sum over the batch}, with "loss"
                among the names (SFT: the summed NLL of the labelled tokens).
            per: the global count of the units the sums are over, for one batch.
        """
        self.model.eval()
        loader.epoch, loader.step_in_epoch = 1, 0
        totals: dict[str, torch.Tensor] = {}
        count = 0
        for _ in range(loader.steps_per_epoch):
            batch = loader.next_batch()
            for name, value in sums(self.model, batch, self.micro_batches(batch)).items():
                totals[name] = totals.get(name, 0) + value.to(self.device).float()
            count += per(batch)
        names = sorted(totals)
        values = torch.stack([totals[name].reshape(()) for name in names])
        dist.all_reduce(values, group=self.env.meshes.loss.get_group())
        metrics = {f"val_{name}": value / count for name, value in zip(names, values.tolist())}
        if self._log is not None:
            self._log.log({"step": self.completed_steps, "epoch": self.epoch, **metrics})
        return metrics["val_loss"]

    def _non_finite_message(self, loss: float, step: int, epoch: int) -> str:
        where = f"Loss is {loss} at step {step} (epoch {epoch}); stopping before the update."
        resumed = self.checkpointer.resumed_from
        if resumed is not None and step == self._resumed_step + 1:
            older = [
                path for number, path in complete_checkpoints(resumed.parent) if number < self._resumed_step
            ]
            previous = f"the previous one, {older[-1]}" if older else "a fresh start (there is no older one)"
            return (
                f"{where} It is the first step after resuming from {resumed}, whose weights may hold NaN or "
                f"infinite values: move {resumed} aside to resume from {previous}."
            )
        return (
            f"{where} Lower optim.lr, raise optim.warmup_steps or check the data; resume restarts from "
            f"{latest_checkpoint(self.checkpointer.directory) or 'scratch'}."
        )

    def finish(self) -> bool:
        """Wait for a background checkpoint, close the log, draw the plots of a completed run. Returns
        whether the run completed (False after a preemption: there is nothing to export yet)."""
        self._save_due_checkpoint()
        self.checkpointer.wait()
        self._preemption.restore()
        if self._log is not None:
            self._log.close()
        completed = self.completed_steps == self.total_steps
        if completed and self.env.rank == 0:
            _plot(self.config.run_dir)
        return completed


def device_type_is_cuda() -> bool:
    """MFU is reported on GPU only (a CPU has no meaningful peak)."""
    return torch.cuda.is_available()


def _plot(run_dir: Path) -> None:
    """Loss, learning rate, throughput (and DPO reward) plots into <run dir>/plots."""
    from hermes.plots import plot_run

    print(f"Plots: {', '.join(str(p) for p in plot_run(run_dir))}", flush=True)


def _drop_records_after(metrics: Path, step: int) -> None:
    """Forget the metrics of steps a killed run logged after its last checkpoint (they are redone), and a
    torn last line (a kill during its write), so each step appears once.

    Raises:
        ValueError: a line before the last is not JSON (the file was edited or damaged), naming it.
    """
    if not metrics.is_file():
        return
    lines = metrics.read_text().splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # torn by a kill while it was written
            raise ValueError(
                f"{metrics}:{number} is not a JSON record; repair or remove the line to resume"
            ) from None
        if record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    metrics.write_text("".join(kept))


TRANSIENT_KEYS = {
    "run": {"name", "dir", "allow_changes"},
    "model": {"attention_backend"},
    "data": {"cache_dir", "workers", "validation"},
    "train": {
        "micro_batch",
        "checkpoint_every",
        "keep_checkpoints",
        "async_checkpoint",
        "export_hf",
        "export_fp8",
        "eval_every",
        "export_every_epoch",
        "epoch_tasks",
        "epoch_tasks_include",
    },
    "parallel": "all",
    "logging": "all",
}
"""Keys a resume may change freely: where things go, how the work is split over processes and micro-
batches, what is logged, what is evaluated and exported on the way. Every other key (data.validation_fraction
too: it removes records from training) changes what the run computes."""


def run_meaning(config: Config, data_cache: Path | None) -> dict[str, object]:
    """`section.key` -> value for every key the run's result depends on, and the data's cache key."""
    meaning: dict[str, object] = {}
    for section, table in dataclasses.asdict(config).items():
        skipped = TRANSIENT_KEYS.get(section, set())
        if skipped == "all":
            continue
        meaning.update({f"{section}.{key}": value for key, value in table.items() if key not in skipped})
    meaning["data.cache_key"] = data_cache.name if data_cache is not None else None
    return meaning


def _accept_changes(
    recorded: dict[str, object], current: dict[str, object], config: Config, checkpoint: Path
) -> list[str]:
    """The keys whose values differ from what `checkpoint` was trained with, when run.allow_changes allows
    each of them (they are logged); returns them.

    Raises:
        ConfigError: a difference that run.allow_changes does not name (listing every difference).
    """
    changed = sorted(key for key in recorded.keys() | current.keys() if recorded.get(key) != current.get(key))
    if not changed:
        return []
    lines = [f"  {key}: {recorded.get(key)!r} -> {current.get(key)!r}" for key in changed]
    refused = [key for key in changed if key not in config.run.allow_changes]
    if refused:
        raise ConfigError(
            f"resuming from {checkpoint} with values other than it was trained with:\n"
            + "\n".join(lines)
            + f"\nResume with the values it was trained with, give the run another --run.dir, or pass "
            f"--run.allow_changes {','.join(changed)} to apply them"
        )
    if dist.get_rank() == 0:
        print(f"Resuming from {checkpoint} with changed values, as run.allow_changes asks:", flush=True)
        print("\n".join(lines), flush=True)
    return changed


def checkpoint_bytes(model: nn.Module, optimizer: str, trainable_only: bool) -> int:
    """About how many bytes one checkpoint takes: the saved parameters and the optimizer's states (two per
    trained parameter for AdamW, one for RMSProp), at their global sizes."""
    saved = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    trained = [p for p in model.parameters() if p.requires_grad]
    states = 2 if optimizer == "adamw" else 1
    return sum(p.numel() * p.element_size() for p in saved) + states * sum(p.numel() * 4 for p in trained)


def check_storage(directory: Path, needed: int) -> None:
    """Before any work: the checkpoints folder can be written and holds about one checkpoint more.

    Raises:
        OSError: naming the folder and the OS error, or the space needed and free.
    """
    if dist.get_rank() == 0:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
                pass
        except OSError as error:
            raise OSError(
                error.errno,
                f"the checkpoints folder {directory} cannot be written ({error.strerror}); give the run a "
                "writable --run.dir",
            ) from None
        free = shutil.disk_usage(directory).free
        if free < needed:
            raise OSError(
                errno.ENOSPC,
                f"{directory} has {free / 2**30:.2f} GiB free, but one checkpoint of this run takes about "
                f"{needed / 2**30:.2f} GiB; free space or give the run another --run.dir",
            )
    dist.barrier()
