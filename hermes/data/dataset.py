"""A tokenized dataset held as flat numpy arrays (memory-mapped from the on-disk cache), so hundreds of
millions of tokens cost 8 bytes each and every rank on a node shares one page-cached copy."""

from __future__ import annotations

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
    def from_samples(cls, samples: list[Sample]) -> TokenizedDataset:
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in samples], out=offsets[1:])
        total = int(offsets[-1])
        tokens = np.fromiter(chain.from_iterable(s.tokens for s in samples), dtype=np.int32, count=total)
        labels = np.fromiter(chain.from_iterable(s.labels for s in samples), dtype=np.int32, count=total)
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
