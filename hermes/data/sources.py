"""Where training records come from: the entries of `data.train` resolved to data files, and each file cut
into shards of consecutive records, read but not yet decoded, small enough to send to a worker process.

Accepted forms (ACCEPTED_FORMS):

- JSONL, one JSON object per line: `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (the last needs zstandard);
- Parquet, `.parquet`, and Arrow, `.arrow` (an IPC stream or file, as `datasets` writes them), both read
  through pyarrow; only the columns records.py reads are loaded;
- a directory written by `datasets`' `save_to_disk`: a Dataset (its state.json lists its Arrow files) or a
  DatasetDict (dataset_dict.json; its `train` split is read);
- any other directory, such as a dataset repository: the data files of the forms above under it, in path
  order, hidden ones (`.git/`, `.cache/`) left out; when some of their paths name the train split
  (`data/train-00000-of-00002.parquet`, `train/part.jsonl`, `chat_train.jsonl`), only those, so that a
  repository's test split is never trained on.

pyarrow and zstandard come with the `data` extra (`pip install -e '.[data]'`); a file that needs one that
is not installed is an error saying so.

Arrow rows become the dicts `to_pylist` gives, with every None of a struct field dropped. One Arrow schema
holds every row of a file, so a key that only some records have (an assistant turn's `tool_calls`, `tools`,
one tool's parameter) is null in all the others; dropping it gives back the record as written, which
records.py then parses exactly as the JSONL line it came from. (A JSON null cannot be told from a missing
key in Arrow; records.py reads both alike.) A struct keeps one key order for every row, the schema's: tool
schemas whose keys come in different orders keep their order only as a JSON string column, which is how
function-calling datasets usually ship them.
"""

from __future__ import annotations

import gzip
import importlib
import io
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
ARROW_SUFFIXES = (".parquet", ".arrow")
ACCEPTED_FORMS = (
    "JSONL files (.jsonl, .jsonl.gz, .jsonl.zst), Parquet (.parquet) or Arrow (.arrow) files, a directory "
    "written by datasets' save_to_disk, or a directory holding such files (a dataset repository: "
    "data/*.parquet, ...)"
)
DATA_EXTRA = "pip install -e '.[data]'"

_TRAIN_SPLIT = re.compile(r"(?:^|[/_.\-])train(?:[/_.\-]|$)")
"""A relative path that names the train split (the Hugging Face convention for split files)."""


@dataclass(frozen=True)
class JsonlShard:
    """Consecutive lines of a JSONL file, undecoded."""

    path: str
    first_line: int
    """Line number (1-based) of lines[0] in the file."""
    lines: list[bytes]


@dataclass(frozen=True)
class ArrowShard:
    """Consecutive rows of a Parquet or Arrow file, as an Arrow IPC stream holding just those rows (a sliced
    table would pickle the whole buffers it is a view of)."""

    path: str
    first_row: int
    """Index (0-based, as `datasets` indexes rows) of the first row in the file."""
    stream: bytes

    def rows(self) -> list[dict[str, Any]]:
        """The rows as dicts, without the None of struct fields (see the module docstring)."""
        pa = _require("pyarrow", self.path)
        table = pa.ipc.open_stream(self.stream).read_all()
        return [_without_nulls(row) for row in table.to_pylist()]


Shard = JsonlShard | ArrowShard


def data_files(entries: Iterable[str | os.PathLike]) -> list[Path]:
    """The data files of `data.train` entries, in order (see the module docstring for what an entry may be).

    Raises:
        FileNotFoundError: an entry that does not exist, or a directory with no data file in it.
        ValueError: a file of another form, or a saved DatasetDict without a train split.
    """
    files: list[Path] = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            files += _directory_files(path)
        elif not path.is_file():
            raise FileNotFoundError(f"Training data {path} not found; set data.train to {ACCEPTED_FORMS}")
        elif _is_data_file(path):
            files.append(path)
        else:
            raise ValueError(f"Training data {path}: unknown file type; data.train accepts {ACCEPTED_FORMS}")
    return files


def read_shards(files: Iterable[Path], size: int, columns: Iterable[str]) -> Iterator[Shard]:
    """Stream the records of `files`, in order, as shards of `size` records (the last of a file shorter).

    Args:
        files: data files (`data_files`).
        size: records (JSONL lines, blank ones included, or rows) per shard.
        columns: the columns to read from Parquet and Arrow files (all when a file has none of them, so
            that parsing names what is missing).
    """
    wanted = tuple(columns)
    for path in files:
        yield from _jsonl_shards(path, size) if _is_jsonl(path) else _arrow_shards(path, size, wanted)


def _is_jsonl(path: Path) -> bool:
    return path.name.lower().endswith(JSONL_SUFFIXES)


def _is_data_file(path: Path) -> bool:
    return _is_jsonl(path) or path.name.lower().endswith(ARROW_SUFFIXES)


def _directory_files(directory: Path) -> list[Path]:
    """The data files of a directory: a saved Dataset's or DatasetDict's, or those under it."""
    splits_file, state_file = directory / "dataset_dict.json", directory / "state.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text())["splits"]
        if "train" not in splits:
            raise ValueError(
                f"Training data {directory} is a saved DatasetDict with splits {', '.join(splits)} and no "
                "train split; set data.train to the split's directory"
            )
        return _directory_files(directory / "train")
    if state_file.is_file():
        return [directory / entry["filename"] for entry in json.loads(state_file.read_text())["_data_files"]]
    found = sorted(
        path
        for path in directory.rglob("*")
        if _is_data_file(path)
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )
    if not found:
        raise FileNotFoundError(
            f"Training data directory {directory} holds no data file; set data.train to {ACCEPTED_FORMS}"
        )
    train = [path for path in found if _TRAIN_SPLIT.search(path.relative_to(directory).as_posix().lower())]
    return train or found


def _require(module: str, path: str | Path) -> ModuleType:
    """Import an optional dependency, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"reading {path} needs {module}; install it with {DATA_EXTRA}") from None


def _open_jsonl(path: Path) -> IO[bytes]:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(_require("zstandard", path), path), buffer_size=1 << 20)
    return open(path, "rb")


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame. (zstandard's own stream reader hands out
    what a cut-short last frame holds and ends without an error; this raises EOFError.)"""

    def __init__(self, zstandard: ModuleType, path: Path) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        # `zstd --long` writes windows above the 8 MiB that zstandard accepts by default.
        self._decompressor = zstandard.ZstdDecompressor(max_window_size=1 << 31)
        self._frame = self._decompressor.decompressobj()
        self._frame_open = False
        self._out, self._at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._at == len(self._out):
            data = self._file.read(1 << 20)
            if not data:
                if self._frame_open:
                    raise EOFError("the file ends inside a zstd frame: it was cut short")
                return 0
            self._out, self._at = self._decompress(data), 0
        size = min(len(buffer), len(self._out) - self._at)
        buffer[:size] = self._out[self._at : self._at + size]
        self._at += size
        return size

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            out.append(self._frame.decompress(data))
            self._frame_open = not self._frame.eof
            if self._frame_open:
                break
            data = self._frame.unused_data  # the next frame's start
            self._frame = self._decompressor.decompressobj()
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def _jsonl_shards(path: Path, size: int) -> Iterator[JsonlShard]:
    damaged: tuple[type[Exception], ...] = (OSError, EOFError)  # what gzip raises on damaged data
    if path.name.lower().endswith(".zst"):
        damaged += (_require("zstandard", path).ZstdError,)
    with _open_jsonl(path) as stream:
        first = 1
        try:
            for lines in iter(lambda: list(itertools.islice(stream, size)), []):
                yield JsonlShard(str(path), first, lines)
                first += len(lines)
        except damaged as error:
            raise ValueError(f"{path}: cannot be read after line {first - 1} ({error})") from None


def _arrow_shards(path: Path, size: int, columns: tuple[str, ...]) -> Iterator[ArrowShard]:
    pa = _require("pyarrow", path)
    first = 0
    for table in _rebatch(pa, _arrow_batches(pa, path, columns), size):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        yield ArrowShard(str(path), first, sink.getvalue().to_pybytes())
        first += table.num_rows


def _arrow_batches(pa: ModuleType, path: Path, columns: tuple[str, ...]) -> Iterator[Any]:
    """The record batches of a Parquet or Arrow file, reduced to `columns` when it has any of them."""
    if path.name.lower().endswith(".parquet"):
        parquet = _require("pyarrow.parquet", path).ParquetFile(path)
        present = [name for name in parquet.schema_arrow.names if name in columns]
        yield from parquet.iter_batches(columns=present or None)
        return
    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:  # not the file format: the stream format `datasets` writes
        source.seek(0)
        batches = iter(pa.ipc.open_stream(source))
    for batch in batches:
        present = [name for name in batch.schema.names if name in columns]
        yield batch.select(present) if present else batch


def _rebatch(pa: ModuleType, batches: Iterator[Any], size: int) -> Iterator[Any]:
    """Arrow tables of exactly `size` rows (the last one shorter), cut from `batches` without copying."""
    pending, rows = [], 0
    for batch in batches:
        while batch.num_rows:
            take = min(size - rows, batch.num_rows)
            pending.append(batch.slice(0, take))
            rows, batch = rows + take, batch.slice(take)
            if rows == size:
                yield pa.Table.from_batches(pending)
                pending, rows = [], 0
    if rows:
        yield pa.Table.from_batches(pending)


def _without_nulls(value: Any) -> Any:
    """`value` with the None-valued keys of its dicts (at any depth) left out."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value
