"""One writer per run directory: an advisory file lock (`<run dir>/.lock`, fcntl.flock) that the writing
rank holds for the run's life. The holder's host, pid and start time are written into the file, so a
second run names who holds it; the lock dies with its process, so a lock file left by a killed run is
stale and is taken over (and said so)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

LOCK_FILE = ".lock"


class RunDirectoryBusyError(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """The lock of `run_dir`, taken by `acquire` and held until `release` or the process ends."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> str | None:
        """Take the lock. Returns a note when it takes over a stale lock (None otherwise).

        Raises:
            RunDirectoryBusyError: a live process holds it (named in the message).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            handle.close()
            raise RunDirectoryBusyError(
                f"{self.path.parent} is in use by another run ({holder}); wait for it to finish or stop it, "
                "or give this run another --run.dir"
            ) from None
        # A run that ends releases its lock with an empty file: anything written is a dead holder's.
        previous = _holder(handle) if self.path.stat().st_size else ""
        handle.seek(0)
        handle.truncate()
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        handle.write(json.dumps(record))
        handle.flush()
        self._file = handle
        return f"took over the stale lock of a run that is gone ({previous})" if previous else None

    def release(self) -> None:
        """Empty the file (the run ended cleanly) and let the lock go."""
        if self._file is not None:
            self._file.truncate(0)
            self._file.close()
            self._file = None


def _holder(handle: IO[str]) -> str:
    handle.seek(0)
    try:
        record = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        return "holder unknown"
    if not record:
        return "holder unknown"
    return f"host {record.get('host')}, pid {record.get('pid')}, since {record.get('since')}"
