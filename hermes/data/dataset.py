"""A tokenized dataset held as flat numpy arrays (memory-mapped from the on-disk cache), so hundreds of
millions of tokens cost 8 bytes each and every rank on a node shares one page-cached copy.

The cache is written shard by shard (`save_shard`, then `assemble_shards`), so that building it holds one
shard of samples at a time, never the dataset; the result is byte for byte what `TokenizedDataset.save`
writes for the same samples."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from itertools import chain
from pathlib import Path

import numpy as np

from hermes.data.sample import IGNORE_INDEX, Sample


class TokenizedDataset:
    """Samples stored back to back: sample i is tokens[offsets[i]:offsets[i+1]] (and labels likewise)."""

    def __init__(
        self, tokens: np.ndarray, labels: np.ndarray, offsets: np.ndarray, categories: list[str]
    ) -> None:
        if len(offsets) != len(categories) + 1 or offsets[-1] != len(tokens) or len(tokens) != len(labels):
            raise ValueError("Inconsistent tokenized dataset arrays (offsets, tokens, labels, categories)")
        self.tokens, self.labels, self.offsets, self.categories = tokens, labels, offsets, categories
        self.lengths = np.diff(offsets)
        trained = (labels != IGNORE_INDEX).astype(np.int64)
        starts = offsets[:-1]
        # Labelled tokens per sample, not counting the first (nothing predicts it); empty samples have none.
        per_sample = np.add.reduceat(trained, starts) if len(trained) else np.zeros(0, np.int64)
        self.trained_tokens = np.where(
            self.lengths > 0, per_sample - trained[np.minimum(starts, len(trained) - 1)], 0
        )

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> TokenizedDataset:
        offsets = _offsets(np.array([len(s) for s in samples], dtype=np.int64))
        tokens, labels = _flat(samples, int(offsets[-1]))
        return cls(tokens, labels, offsets, [s.category for s in samples])

    def __len__(self) -> int:
        return len(self.categories)

    def __getitem__(self, i: int) -> Sample:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return Sample(self.tokens[start:end].tolist(), self.labels[start:end].tolist(), self.categories[i])

    def save(self, directory: Path) -> None:
        """Write the arrays as .npy files plus categories.txt into `directory` (created)."""
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("tokens", "labels", "offsets"):
            np.save(directory / f"{name}.npy", getattr(self, name))
        (directory / "categories.txt").write_text("\n".join(self.categories))

    @classmethod
    def load(cls, directory: Path) -> TokenizedDataset:
        """Memory-map a dataset written by `save`."""
        arrays = [
            np.load(directory / f"{name}.npy", mmap_mode="r") for name in ("tokens", "labels", "offsets")
        ]
        categories = (directory / "categories.txt").read_text().split("\n") if len(arrays[2]) > 1 else []
        return cls(*arrays, categories)


ARRAYS = ("tokens", "labels")
"""The per-token arrays, in the order of a shard file's rows."""


def save_shard(path: Path, samples: Sequence[Sample]) -> np.ndarray:
    """Write the tokens and labels of `samples`, back to back, as one [2, tokens] int32 .npy file at `path`.

    Returns:
        The samples' lengths (int64).
    """
    lengths = np.array([len(s) for s in samples], dtype=np.int64)
    np.save(path, np.stack(_flat(samples, int(lengths.sum()))))
    return lengths


def assemble_shards(
    directory: Path,
    shards: Sequence[Path],
    lengths: Sequence[np.ndarray],
    categories: Sequence[str],
    select: np.ndarray | None = None,
) -> int:
    """Write the dataset of the samples in shard files into `directory` (created), in the layout of
    `TokenizedDataset.save`, reading one shard at a time.

    The arrays are written by appending each shard's part to the file (not through a memory map, whose
    dirty pages would stay resident until the whole array is written).

    Args:
        shards: `save_shard` files, in sample order.
        lengths: the sample lengths of each shard.
        categories: the category of every sample of every shard, in order.
        select: the samples to write, as sorted indices over all shards (an index repeated once per copy,
            as `Mixture.indices`); None = every sample once.

    Returns:
        The number of samples written.
    """
    every = np.concatenate(lengths) if len(lengths) else np.zeros(0, np.int64)
    select = np.arange(len(every)) if select is None else np.asarray(select, dtype=np.int64)
    offsets = _offsets(every[select])
    directory.mkdir(parents=True, exist_ok=True)
    header = {"descr": "<i4", "fortran_order": False, "shape": (int(offsets[-1]),)}
    with ExitStack() as files:
        out = [files.enter_context(open(directory / f"{name}.npy", "wb")) for name in ARRAYS]
        for file in out:
            np.lib.format.write_array_header_1_0(file, header)
        first = 0
        for path, shard_lengths in zip(shards, lengths):
            data = np.load(path)  # [2, shard tokens], int32
            lo, hi = np.searchsorted(select, [first, first + len(shard_lengths)])
            chosen = select[lo:hi] - first
            if not np.array_equal(chosen, np.arange(len(shard_lengths))):  # not every sample once, in order
                starts, sizes = _offsets(shard_lengths)[chosen], shard_lengths[chosen]
                # Token positions of the chosen samples in the shard, back to back (a copy again).
                positions = np.repeat(starts - (np.cumsum(sizes) - sizes), sizes) + np.arange(sizes.sum())
                data = data[:, positions]
            for row, file in enumerate(out):
                file.write(np.ascontiguousarray(data[row]).data)
            first += len(shard_lengths)
    np.save(directory / "offsets.npy", offsets)
    (directory / "categories.txt").write_text("\n".join(categories[i] for i in select))
    return len(select)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """[0, cumulative lengths...] (int64): sample i is [offsets[i], offsets[i + 1])."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _flat(samples: Sequence[Sample], total: int) -> tuple[np.ndarray, np.ndarray]:
    """The tokens and the labels of `samples` (`total` tokens in all), back to back, as int32 arrays."""
    tokens = np.fromiter(chain.from_iterable(s.tokens for s in samples), dtype=np.int32, count=total)
    labels = np.fromiter(chain.from_iterable(s.labels for s in samples), dtype=np.int32, count=total)
    return tokens, labels
