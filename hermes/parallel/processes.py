"""Starting a local world of processes: a free port, and `fn` run on N spawned processes with the
environment torchrun gives its workers (for CPU tests, benchmarks and the memory planner's measurements)."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int, world: int, port: int, threads: int, fn: Callable[..., Any], args: tuple, out: str
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(threads)
    result = fn(*args)
    Path(out, f"{rank}.pkl").write_bytes(pickle.dumps(result))


def run_on_processes(fn: Callable[..., Any], processes: int, *args: Any, threads: int = 1) -> list[Any]:
    """`fn(*args)` on `processes` freshly spawned processes with `threads` torch threads each and the
    environment of a torchrun world (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which
    `hermes.parallel.mesh.init_distributed` joins. Returns each rank's return value, by rank (results
    pass back as pickles this call wrote itself). `fn` must be importable (spawn re-imports it); call this
    from under `if __name__ == "__main__":` in a script.

    Raises:
        torch.multiprocessing.ProcessRaisedException: a process raised.
    """
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _entry,
            args=(processes, free_port(), threads, fn, args, out),
            nprocs=processes,
            start_method="spawn",
        )
        return [pickle.loads(Path(out, f"{rank}.pkl").read_bytes()) for rank in range(processes)]
