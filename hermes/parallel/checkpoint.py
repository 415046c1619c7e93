"""Distributed checkpoints (torch.distributed.checkpoint): the checkpointer a run saves and resumes with,
and the model-only load that generation and evaluation use.

A checkpoint is written to `step-N.partial/` and renamed to `step-N/` by rank 0 once every rank has
finished and the trainer state and a COMPLETE marker are written, so a directory named `step-N` is always
whole. Anything else in the checkpoints folder (a partial write left by a killed run, a step directory
without its marker) is never loaded: it is reported and skipped. DCP stores each tensor's global shape, so
a checkpoint written by N processes loads on M (another world size or mesh). Every DCP read goes through
hermes.parallel.safe_dcp, so no checkpoint file can run code.

With asynchronous saving, DCP copies the state to CPU memory and writes it in a background thread while
training goes on; the checkpoint is published (marker, rename, pruning) when the next save starts or the
run ends. A crash before that leaves only a `.partial` folder, and the previous checkpoint stays the
newest complete one.

Integrity: the COMPLETE marker lists the SHA-256 of every file of the checkpoint (the ranks hash the files
in turns, in parallel). Resuming verifies them the same way; a checkpoint whose bytes changed, or a file
that is missing or truncated, is named in a warning and skipped for the previous complete one. A save
that fails (a full disk, a read-only folder) removes its partial folder and says the path and the OS
error.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import re
import shutil
import warnings
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from hermes.parallel.safe_dcp import SafeFileSystemReader, load_state

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class Stateful(Protocol):
    """What the checkpointer saves beside model and optimizer (the schedule, the loader's position)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _options(trainable_only: bool) -> StateDictOptions:
    """Without frozen parameters the model's state is partial by design, so loading it is not strict;
    `dcp.load` still fails on any trainable tensor the checkpoint lacks."""
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete `step-N` directories, oldest first. Incomplete ones are reported."""
    if not directory.is_dir():
        return []
    complete: list[tuple[int, Path]] = []
    for path in directory.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / COMPLETE_MARKER).is_file():
            complete.append((int(match.group(1)), path))
        elif path.is_dir():
            warnings.warn(
                f"Ignoring incomplete checkpoint {path} (no {COMPLETE_MARKER} marker)", stacklevel=2
            )
    return sorted(complete)


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete `step-N` directory, or None."""
    complete = complete_checkpoints(directory)
    return complete[-1][1] if complete else None


class Checkpointer:
    """Saves and resumes a run: model, optimizer, the registered trainer state and every rank's RNG.

    Args:
        directory: the run's checkpoints folder.
        model: the (sharded) model.
        optimizer: its optimizer.
        stateful: name -> object with state_dict / load_state_dict (the schedule, the loader), saved as
            JSON in trainer.json.
        trainable_only: leave frozen parameters out (a LoRA run's base model, read from its own files).
        keep: how many of the newest checkpoints to keep (0 = all); epoch-end checkpoints are always kept.
        async_save: write in the background (module docstring).
    """

    def __init__(
        self,
        directory: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        stateful: Mapping[str, Stateful],
        *,
        trainable_only: bool = False,
        keep: int = 0,
        async_save: bool = False,
    ) -> None:
        self.directory = directory
        self.model, self.optimizer = model, optimizer
        self.stateful = dict(stateful)
        self.trainable_only, self.keep, self.async_save = trainable_only, keep, async_save
        self._pending: tuple[Future, Path, dict[str, Any]] | None = None
        self.resumed_from: Path | None = None
        """The checkpoint `resume` loaded (None: none)."""
        self.resumed_state: dict[str, Any] = {}
        """Its trainer.json."""
        self.recorded: dict[str, Any] = {}
        """JSON-able facts written into every checkpoint's trainer.json (what the run's meaning is)."""

    def resume(self) -> int:
        """Load the newest complete checkpoint, if any, into model, optimizer, trainer state and this rank's
        RNG (resharding to the current mesh). Returns its step (0 when there is none). Collective."""
        path = self._newest_intact()
        self.resumed_from = path
        self.resumed_state: dict[str, Any] = {}
        if path is None:
            return 0
        options = _options(self.trainable_only)
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=options)
        state = {"model": model_state, "optim": optim_state}
        load_state(state, path)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=options,
        )
        rng_file = path / "rng" / f"rank-{dist.get_rank()}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        trainer = json.loads((path / TRAINER_STATE).read_text())
        self.resumed_state = trainer
        for name, target in self.stateful.items():
            target.load_state_dict(trainer[name])
        if dist.get_rank() == 0:
            print(f"Resuming from {path} (step {trainer['step']})", flush=True)
        return trainer["step"]

    def _newest_intact(self) -> Path | None:
        """The newest complete checkpoint whose files match their checksums; damaged ones are named in a
        warning and skipped. Collective (the ranks verify the files in turns).

        Raises:
            CheckpointIntegrityError: every complete checkpoint is damaged.
        """
        complete = complete_checkpoints(self.directory)
        damaged = []
        for _, path in reversed(complete):
            problem = _verify(path)
            if problem is None:
                return path
            damaged.append(path)
            if dist.get_rank() == 0:
                warnings.warn(
                    f"Checkpoint {path} is damaged ({problem}); skipping it for the previous complete one",
                    stacklevel=3,
                )
        if damaged:
            raise CheckpointIntegrityError(
                f"every checkpoint in {self.directory} is damaged ({', '.join(p.name for p in damaged)}); "
                "move them aside to start the run over"
            )
        return None

    def save(self, step: int, *, epoch_end: bool = False) -> None:
        """Write `step-<step>` (in the background with async_save), publish it, then keep only the
        configured number of checkpoints. Collective: every rank calls it."""
        self.wait()
        final = self.directory / f"step-{step}"
        partial = self.directory / f"step-{step}.partial"
        rank = dist.get_rank()
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        dist.barrier()
        model_state, optim_state = get_state_dict(
            self.model, self.optimizer, options=_options(self.trainable_only)
        )
        trainer = {
            "step": step,
            "epoch_end": epoch_end,
            **self.recorded,
            **{name: target.state_dict() for name, target in self.stateful.items()},
        }
        state = {"model": model_state, "optim": optim_state}
        try:
            rng_dir = partial / "rng"
            rng_dir.mkdir(exist_ok=True)
            torch.save(_rng_state(), rng_dir / f"rank-{rank}.pt")
            if self.async_save:
                self._pending = (dcp.async_save(state, checkpoint_id=str(partial)), final, trainer)
            else:
                dcp.save(state, checkpoint_id=str(partial))
                self._publish(final, trainer)
        except (Exception, CheckpointException) as error:  # DCP's exception is a BaseException
            raise _save_failed(partial, error) from error

    def wait(self) -> None:
        """Finish and publish a background save, if one is running. Collective."""
        if self._pending is None:
            return
        future, final, trainer = self._pending
        self._pending = None
        try:
            future.result()
            self._publish(final, trainer)
        except (Exception, CheckpointException) as error:  # DCP's exception is a BaseException
            raise _save_failed(final.with_name(final.name + ".partial"), error) from error

    def _publish(self, final: Path, trainer: dict[str, Any]) -> None:
        partial = final.with_name(final.name + ".partial")
        dist.barrier()
        if dist.get_rank() == 0:
            (partial / TRAINER_STATE).write_text(json.dumps(trainer, indent=1))
        checksums = _checksums(partial)
        if dist.get_rank() == 0:
            (partial / COMPLETE_MARKER).write_text(
                json.dumps({"sha256": checksums}, indent=1, sort_keys=True)
            )
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            self._prune()
        dist.barrier()

    def _prune(self) -> None:
        """Delete all but the newest `keep` complete checkpoints, sparing epoch-end ones."""
        if not self.keep:
            return
        complete = complete_checkpoints(self.directory)
        for _, path in complete[: -self.keep]:
            if not json.loads((path / TRAINER_STATE).read_text()).get("epoch_end"):
                shutil.rmtree(path)


class CheckpointIntegrityError(ValueError):
    """No complete checkpoint of a run matches its checksums."""


_NEARLY_FULL = 1 << 20
"""Free bytes under which a failed write is put down to a full disk."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the message names the folder and the OS error."""


def _save_failed(partial: Path, error: BaseException) -> CheckpointSaveError:
    """The error of a failed save, naming the folder and the OS error found among its causes (DCP wraps
    each rank's failure), after removing the partial folder."""
    cause = _os_error(error)
    # torch's writers may swallow the OS error ("unexpected pos ..."): an exhausted disk still shows.
    full = cause is not None and cause.errno == errno.ENOSPC
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(partial.parent).free < _NEARLY_FULL
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    if full:
        what = "the disk is full (ENOSPC): free space there, or set train.keep_checkpoints lower"
    elif cause is not None and cause.errno == errno.EROFS:
        what = "the file system is read-only (EROFS): give the run a writable --run.dir"
    elif cause is not None:
        what = f"{errno.errorcode.get(cause.errno, cause.errno)}: {cause.strerror}"
    else:
        what = f"{type(error).__name__}: {error}"
    return CheckpointSaveError(f"saving checkpoint {partial} failed: {what}; the partial folder was removed")


def _os_error(error: BaseException | None, seen: set[int] | None = None) -> OSError | None:
    """The first OSError with an errno in `error`, its causes, or (for DCP's CheckpointException) the
    per-rank failures it carries."""
    seen = set() if seen is None else seen
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error
        for failure in getattr(error, "failures", {}).values():
            found = _os_error(failure if isinstance(failure, BaseException) else None, seen)
            if found is not None:
                return found
        error = error.__cause__ or error.__context__
    return None


def _my_share(files: list[str]) -> list[str]:
    """This rank's turn of `files` (sorted the same on every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    return [name for index, name in enumerate(files) if index % world == rank]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _checksums(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under `directory` (but the marker), hashed by the ranks in turns. Collective."""
    files = sorted(
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and path.name != COMPLETE_MARKER
    )
    mine = {name: _file_sha256(directory / name) for name in _my_share(files)}
    gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {name: digest for part in gathered for name, digest in (part or {}).items()}


def _verify(path: Path) -> str | None:
    """What is wrong with a checkpoint's files against its marker's checksums (None: nothing; markers
    without checksums, from before they were written, are trusted). Collective."""
    try:
        expected = json.loads((path / COMPLETE_MARKER).read_text() or "{}").get("sha256", {})
    except json.JSONDecodeError:
        return f"its {COMPLETE_MARKER} marker is not valid JSON"
    problems = []
    for name in _my_share(sorted(expected)):
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif _file_sha256(file) != expected[name]:
            problems.append(f"{name} does not match its checksum")
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    found = [problem for part in gathered for problem in (part or [])]
    return "; ".join(found) if found else None


def checkpointed_model_names(checkpoint: Path, prefix: str = "model.") -> set[str]:
    """Names of the model tensors a checkpoint holds (read from its metadata, safely)."""
    metadata = SafeFileSystemReader(checkpoint).read_metadata()
    return {key[len(prefix) :] for key in metadata.state_dict_metadata if key.startswith(prefix)}


def load_model_only(checkpoint: Path, model: nn.Module, names: set[str]) -> None:
    """Load the tensors `names` of a checkpoint's model state into a plain (unsharded) model in one
    process, for generation and evaluation; the optimizer state is not read."""
    state = model.state_dict()
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_state({"model": {name: state[name] for name in names}}, checkpoint)
