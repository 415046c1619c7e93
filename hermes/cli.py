"""How an entry point meets a user's mistake: one clear message from rank 0 and exit status 1, instead of
a traceback from every rank inside torchrun's report. `HERMES_DEBUG=1` lets the traceback through."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hermes.config import ConfigError
from hermes.data.records import RecordError
from hermes.data.template_chat import ChatTemplateError
from hermes.data.tokenizer import TokenizerFileError
from hermes.parallel.checkpoint import CheckpointIntegrityError, CheckpointSaveError
from hermes.parallel.safe_dcp import CheckpointSecurityError
from hermes.train.run_lock import RunDirectoryBusyError
from hermes.train.trainer import NonFiniteLossError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    RecordError,
    TokenizerFileError,
    ChatTemplateError,
    CheckpointSecurityError,
    NonFiniteLossError,
    RunDirectoryBusyError,
    CheckpointIntegrityError,
    CheckpointSaveError,
    OSError,
    ValueError,
)
"""What bad configuration, data, checkpoints or meshes raise; their messages name the problem and the fix."""


def with_default_config(argv: Sequence[str], default: Path) -> list[str]:
    """`argv` with `--config default` in front unless it names a --config itself."""
    argv = list(argv)
    return argv if "--config" in argv else ["--config", str(default), *argv]


def run_cli(main: Callable[[list[str]], Any], argv: Sequence[str]) -> None:
    """Run `main(argv)`; a user error prints `error: <message>` once (on rank 0) and exits 1."""
    try:
        main(list(argv))
    except USER_ERRORS as error:
        if os.environ.get("HERMES_DEBUG") == "1":
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}\n(HERMES_DEBUG=1 shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(1)
