"""Distributed checkpoints (torch.distributed.checkpoint) with atomic publication and resume.

A checkpoint is written to `step-N.partial/` and renamed to `step-N/` by rank 0 once every rank has
finished and the trainer state and a COMPLETE marker are written, so a directory named `step-N` is always
whole. Anything else in the checkpoints folder (a partial write left by a killed run, a step directory
without its marker) is never loaded: it is reported and skipped. DCP stores each tensor's global shape, so
a checkpoint written by N processes loads on M (another world size or mesh).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from hermes.parallel.safe_dcp import load_state

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _options(trainable_only: bool) -> StateDictOptions:
    """Without frozen parameters the model's state is partial by design, so loading it is not strict;
    `dcp.load` still fails on any trainable tensor the checkpoint lacks."""
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    trainable_only: bool = False,
) -> Path:
    """Write model, optimizer, trainer state (JSON-able: scheduler, loader, counters) and every rank's RNG
    to `directory/step-<step>`, atomically. With `trainable_only`, frozen parameters (a LoRA run's base
    model, which its own checkpoint already holds) are left out. Collective: every rank calls it."""
    final = directory / f"step-{step}"
    partial = directory / f"step-{step}.partial"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(trainable_only))
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(partial))
    rng_dir = partial / "rng"
    rng_dir.mkdir(exist_ok=True)
    torch.save(_rng_state(), rng_dir / f"rank-{rank}.pt")
    dist.barrier()
    if rank == 0:
        (partial / TRAINER_STATE).write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        (partial / COMPLETE_MARKER).touch()
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    dist.barrier()
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete `step-N` directory, or None. Incomplete ones are reported and skipped."""
    if not directory.is_dir():
        return None
    complete: list[tuple[int, Path]] = []
    for path in directory.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / COMPLETE_MARKER).is_file():
            complete.append((int(match.group(1)), path))
        elif path.is_dir():
            warnings.warn(
                f"Ignoring incomplete checkpoint {path} (no {COMPLETE_MARKER} marker)", stacklevel=2
            )
    return max(complete)[1] if complete else None


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool = False
) -> dict[str, Any]:
    """Load model and optimizer state in place (resharding to the current mesh) and this rank's RNG when
    the checkpoint has it; returns the trainer state. Collective: every rank calls it."""
    options = _options(trainable_only)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optim": optim_state}
    load_state(state, path)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options
    )
    rng_file = path / "rng" / f"rank-{dist.get_rank()}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((path / TRAINER_STATE).read_text())
