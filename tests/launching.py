"""Starting real multi-process runs of the launch scripts (torchrun, gloo on CPU) from tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from hermes.parallel.processes import run_on_processes

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def small_sft_data(path: Path, records: int = 80) -> Path:
    """The first `records` lines of the bundled SFT example."""
    from hermes.data.pipeline import bundled_example

    lines = bundled_example("sft.jsonl").read_text().splitlines()[:records]
    path.write_text("\n".join(lines) + "\n")
    return path


def debug_overrides(run_dir: Path, data: Path, cache: Path, steps: int) -> list[str]:
    """A few fast steps of the debug-size model on `data`, all of it trained on (no held-out split, so no
    validation and no showcase, which tests turn on themselves)."""
    return [
        "--run.dir", str(run_dir),
        "--model.preset", "debug",
        "--data.train", str(data),
        "--data.cache_dir", str(cache),
        "--data.seq_len", "256",
        "--data.validation_fraction", "0",
        "--logging.showcase_prompts", "0",
        "--train.global_batch", "4",
        "--train.micro_batch", "1",
        "--train.max_steps", str(steps),
        "--train.checkpoint_every", "2",
        "--train.keep_checkpoints", "0",
        "--train.export_hf", "false",
        "--optim.warmup_steps", "2",
        "--optim.lr", "3e-3",
        "--logging.progress", "false",
    ]  # fmt: skip


def torchrun_command(script: str, nproc: int, args: list[str]) -> list[str]:
    return [*TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), str(REPO / "launch" / script), *args]


def run_command(
    command: list[str], timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `command` from the repository root, one thread per process, with `env` added to the environment;
    fail with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def run_launch(
    script: str, nproc: int, args: list[str], timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return run_command(torchrun_command(script, nproc, args), timeout, env)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@contextmanager
def one_process_group(store: Path) -> Iterator[None]:
    """A one-process gloo group in this process (what the checkpointer needs), on a file store."""
    dist.init_process_group("gloo", store=dist.FileStore(str(store), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _gloo_worker(worker: Callable, *args) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


def start_gloo_processes(worker: Callable, world: int, *args) -> None:
    """Run `worker(rank, world, *args)` in `world` fresh processes joined in a gloo process group (a
    module-level function: the processes are spawned). Raises if any of them fails."""
    run_on_processes(_gloo_worker, world, worker, *args)
