"""Reading DCP checkpoints without letting their pickles run code.

torch.distributed.checkpoint keeps two pickles in a checkpoint: `.metadata` (read with plain `pickle.load`)
and the non-tensor entries of the `.distcp` files, such as the optimizer's hyperparameters (read with
`torch.load(weights_only=False)`). A pickle can name any function to call, so whoever can write into a run
directory could run code in every process that resumes from it or generates with it. Here `.metadata` is
read by an unpickler that knows only the objects DCP metadata is made of, and the non-tensor entries by
`torch.load(weights_only=True)`; anything else raises `CheckpointSecurityError` before it is built. (DCP
already reads the tensor data with `weights_only=True`.)

The DCP metadata classes, `torch.Size` and the tensor dtypes, layouts and memory formats are handed to the
unpickler as they are; the layout and path rebuilders it asks for are replaced by this module's own
functions, so a hostile file can at most set attributes on DCP's classes (pickle's BUILD), with values that
are themselves only these objects, none of which runs anything.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path, PosixPath
from typing import IO, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem

METADATA_FILE = ".metadata"


class CheckpointSecurityError(pickle.UnpicklingError):
    """A checkpoint file holds a pickle that asks for more than plain checkpoint data, and would run code."""


_LAYOUTS = {str(layout): layout for layout in vars(torch).values() if isinstance(layout, torch.layout)}


def _layout(name: str) -> torch.layout:
    """`torch.serialization._get_layout`, which rebuilds a pickled layout ('torch.strided'), from a table
    of this module's: the torch function's cache would be open to the pickle."""
    return _LAYOUTS[name]


def _posix_path(*parts: str) -> PosixPath:
    """The checkpoint directory DCP records (`StorageMeta.checkpoint_id`), built without handing the
    unpickler pathlib's class."""
    return PosixPath(*parts)


_METADATA_CLASSES = (
    Metadata,
    TensorStorageMetadata,
    ChunkStorageMetadata,
    BytesStorageMetadata,
    TensorProperties,
    MetadataIndex,
    StorageMeta,
    _MEM_FORMAT_ENCODING,  # TensorProperties pickles its memory format as this enum
)
# Every global a DCP `.metadata` pickle may name, keyed (module, name) exactly as the pickle names it.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{("torch.distributed.checkpoint.metadata", cls.__name__): cls for cls in _METADATA_CLASSES},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,  # where each item's bytes are
    ("torch", "Size"): torch.Size,  # tensor and chunk shapes, chunk offsets
    # Values, not callables: a dtype pickles as the global torch.float32, and so on.
    **{
        ("torch", name): value
        for name, value in vars(torch).items()
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format))
    },
    ("torch.serialization", "_get_layout"): _layout,
    ("pathlib", "PosixPath"): _posix_path,
    ("pathlib._local", "PosixPath"): _posix_path,  # as Python 3.13 names it
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any global outside `_ALLOWED_GLOBALS` is refused, never imported."""

    def __init__(self, file: IO[bytes], path: str | os.PathLike) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[module, name]
        except KeyError:
            raise CheckpointSecurityError(
                f"{self._path} was not loaded: its pickle asks for {module}.{name}, which DCP checkpoint "
                "metadata never holds, and unpickling it could run code. Only load checkpoints written by "
                "runs you trust; delete or replace this one."
            ) from None


class SafeFileSystemReader(FileSystemReader):
    """DCP's `FileSystemReader`, with `.metadata` unpickled under the allow-list. A refusal is raised and
    also kept in `refusal`, because `dcp.load` of newer torch (2.11, 2.13) catches it and goes on to look
    for rank-local metadata, reporting only that it found none."""

    refusal: CheckpointSecurityError | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # As FileSystemReader.read_metadata does: `rank` names a rank's own __<rank>.metadata, which newer
        # dcp.load reads when the global one fails (torch 2.6 passes no arguments).
        rank = kwargs.get("rank")
        path = self.fs.concat_path(self.path, METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}")
        with self.fs.create_stream(path, "rb") as file:
            try:
                metadata = _MetadataUnpickler(file, path).load()
            except CheckpointSecurityError as err:
                self.refusal = err
                raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's `DefaultLoadPlanner`, reading the non-tensor entries with `torch.load(weights_only=True)`
    (plain values: numbers, strings, tuples, lists, dicts). A refusal is raised and kept in `refusal`."""

    refusal: CheckpointSecurityError | None = None

    def __init__(self, checkpoint: str | os.PathLike) -> None:
        super().__init__()
        self._checkpoint = Path(checkpoint)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            file = self._checkpoint / self.metadata.storage_data[read_item.storage_index].relative_path
            self.refusal = CheckpointSecurityError(
                f"{file} was not loaded: its entry {read_item.dest_index.fqn} is a pickle that asks for more "
                "than plain values (torch.load(weights_only=True) refused it), and unpickling it could run "
                "code. Only load checkpoints written by runs you trust; delete or replace this one."
            )
            raise self.refusal from err
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def load_state(state: dict[str, Any], checkpoint: str | os.PathLike) -> None:
    """`dcp.load(state, checkpoint_id=checkpoint)`, in place, with every pickle read as above.

    Raises:
        CheckpointSecurityError: a pickle of the checkpoint was refused (the error itself, rather than the
            CheckpointException DCP wraps it in).
    """
    reader = SafeFileSystemReader(checkpoint)
    planner = SafeLoadPlanner(checkpoint)
    try:
        dcp.load(state, storage_reader=reader, planner=planner)
    except CheckpointException:
        refusal = reader.refusal or planner.refusal
        if refusal is None:
            raise
        raise refusal from refusal.__cause__
