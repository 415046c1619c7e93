"""The validation split: data.validation's records, and a deterministic fraction of data.train's held out of
training (data.validation_fraction).

A data.train record is held out when a hash of its position (the file's place in data.train and the line or
row in that file) falls below the fraction, so the split depends on nothing the cache key does not hold
(the files' contents and order), never on a path, the number of workers or the seed. The training split
drops exactly the records the validation split keeps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

Split = Literal["train", "validation"]
Selection = Literal["all", "kept", "held_out"]
"""Which records of a file a split reads: every one, those not held out, or those held out."""


def held_out(file_index: int, position: str, fraction: float) -> bool:
    """Whether the record at `position` ("12" or "row 12") of data.train's file `file_index` is held out."""
    digest = hashlib.sha256(f"{file_index}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_files(
    train: list[Path], validation: list[Path], fraction: float, split: Split
) -> list[tuple[Path, Selection]]:
    """The files a split reads, each with the records it takes from it.

    Raises:
        ValueError: a file that is both in data.train and data.validation.
    """
    both = sorted(set(map(str, train)) & set(map(str, validation)))
    if both:
        raise ValueError(
            f"{', '.join(both)} in both data.train and data.validation; hold records out of data.train with "
            "data.validation_fraction instead"
        )
    if split == "train":
        return [(path, "kept" if fraction else "all") for path in train]
    held = [(path, "held_out") for path in train] if fraction else []
    return held + [(path, "all") for path in validation]


def select_records(
    records: Iterable[tuple[str, dict]], path: str, file_index: int, selection: Selection, fraction: float
) -> Iterator[tuple[str, dict]]:
    """The (source, record) pairs of one shard of `path` (sources "<path>:<position>") that `selection` takes."""
    for source, record in records:
        if selection == "all" or held_out(file_index, source[len(path) + 1 :], fraction) == (
            selection == "held_out"
        ):
            yield source, record
