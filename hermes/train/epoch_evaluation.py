"""lm-eval on each epoch's export during the run (train.epoch_tasks): the Trainer-side counterpart of
`python -m hermes.select --run`, which evaluates the same exports after the run.

Rank 0 evaluates (`hermes.select.evaluate_epoch`, on this rank's device) while the other ranks wait at a
barrier of a gloo group of their own whose timeout (`WAIT`) covers a long evaluation, so the training
process group's shorter collective timeout (NCCL's 10 minutes) never fires. Training then goes on; the
random streams are those of a run without the evaluation.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from hermes.config import Config, ConfigError
from hermes.select import SelectionError, check_tasks, evaluate_epoch, load_scores

WAIT = timedelta(hours=12)
"""How long the other ranks wait for rank 0's evaluation of one epoch."""


class EpochEvaluation:
    """Evaluates epoch exports on train.epoch_tasks. The tasks are checked when it is built, before any
    training: a missing lm-eval or an unknown task name stops the run at once.

    Raises:
        ConfigError: train.epoch_tasks without train.export_every_epoch, or a task lm-eval does not know.
        ImportError: lm-eval is not installed.
    """

    def __init__(self, config: Config, device: torch.device) -> None:
        train = config.train
        self.tasks, self.include = list(train.epoch_tasks), train.epoch_tasks_include or None
        self.device = device
        self._group = None
        if not self.tasks:
            return
        if not train.export_every_epoch:
            raise ConfigError(
                "train.epoch_tasks evaluates the epoch exports: set --train.export_every_epoch true with it"
            )
        if dist.get_rank() == 0:
            try:
                check_tasks(self.tasks, self.include)
            except SelectionError as error:
                raise ConfigError(f"train.epoch_tasks / train.epoch_tasks_include: {error}") from None
        self._group = dist.new_group(backend="gloo", timeout=WAIT)

    def after_export(self, model_dir: Path | None) -> Path | None:
        """Evaluate the export in `model_dir` (RUN_DIR/epochs/epoch-K/hf) into epochs/epoch-K/lm_eval.json
        and print its scores; returns the file on rank 0. Nothing when no tasks are set. Collective."""
        if not self.tasks or model_dir is None:
            return None
        written = None
        if dist.get_rank() == 0:
            device = str(self.device) if self.device.type == "cuda" else "cpu"
            written = evaluate_epoch(
                model_dir,
                self.tasks,
                model_dir.parent / "lm_eval.json",
                include_path=self.include,
                device=device,
            )
            scores = ", ".join(f"{task} {values[0]:.4f}" for task, values in load_scores([written]).items())
            print(f"lm-eval on {model_dir}: {scores} ({written})", flush=True)
        dist.barrier(group=self._group)
        return written
