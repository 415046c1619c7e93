"""Profiles of chosen steps on request: a torch profiler trace (`logging.profile_steps`) and, on CUDA, a
snapshot of the caching allocator's history (`logging.memory_snapshot_step`).

Files, one per rank:

- RUN_DIR/profile/step-N-rank-R.json: the Chrome trace of step N (forward, backward, collectives and the
  optimizer update), with input shapes; open it in Perfetto (ui.perfetto.dev) or chrome://tracing.
- RUN_DIR/profile/memory-step-N-rank-R.pickle: every allocation and free from the run's first step through
  step N, with stack traces (`torch.cuda.memory._dump_snapshot`); drag it onto pytorch.org/memory_viz.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

MEMORY_HISTORY_ENTRIES = 200_000
"""Allocator events the CUDA memory history keeps (the oldest are dropped beyond it)."""


class StepProfiler:
    """Starts and stops the requested recordings around steps (`begin` before a step's forward, `end` after
    its update).

    Args:
        directory: where the files go (RUN_DIR/profile).
        rank: this process's global rank, part of each file name.
        steps: the 1-based steps to trace.
        memory_snapshot_step: dump the CUDA allocator history after this step (0 = none); ignored, with a
            note from rank 0, when the run is not on CUDA.
    """

    def __init__(self, directory: Path, rank: int, steps: list[int], memory_snapshot_step: int) -> None:
        self.directory, self.rank = directory, rank
        self.steps = set(steps)
        self.memory_snapshot_step = memory_snapshot_step
        self._profile: profile | None = None
        if memory_snapshot_step and not torch.cuda.is_available():
            if rank == 0:
                print(
                    f"logging.memory_snapshot_step = {memory_snapshot_step} records CUDA allocations; this "
                    "run is not on CUDA, so no memory snapshot is written",
                    flush=True,
                )
            self.memory_snapshot_step = 0
        if self.memory_snapshot_step:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        if self.steps or self.memory_snapshot_step:
            directory.mkdir(parents=True, exist_ok=True)

    def begin(self, step: int) -> None:
        """Start tracing when `step` is one of the traced steps."""
        if step in self.steps:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            self._profile = profile(activities=activities, record_shapes=True)
            self._profile.__enter__()

    def end(self, step: int) -> list[Path]:
        """Stop the trace of `step` and write it; dump the memory history after its step. Returns the files
        written."""
        written = []
        if self._profile is not None:
            self._profile.__exit__(None, None, None)
            trace = self.directory / f"step-{step}-rank-{self.rank}.json"
            self._profile.export_chrome_trace(str(trace))
            self._profile = None
            written.append(trace)
        if self.memory_snapshot_step and step == self.memory_snapshot_step:
            snapshot = self.directory / f"memory-step-{step}-rank-{self.rank}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.memory_snapshot_step = 0
            written.append(snapshot)
        return written
