"""The unit every data stage passes on: one tokenized conversation and its per-token labels."""

from __future__ import annotations

from dataclasses import dataclass

from hermes.model.inputs import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "Sample"]


@dataclass(frozen=True)
class Sample:
    """One tokenized sample.

    `labels[t]` is `tokens[t]` where token t is trained on and IGNORE_INDEX elsewhere. Labels are not
    shifted: packing shifts them per sample (the target of position t is `labels[t + 1]`), so no target
    ever crosses a sample boundary.
    """

    tokens: list[int]
    labels: list[int]
    category: str = ""

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.labels):
            raise ValueError(f"Sample has {len(self.tokens)} tokens but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def trained_tokens(self) -> int:
        """Number of tokens that carry a loss (the first token never does: nothing predicts it)."""
        if not self.labels:
            return 0
        ignored_after_first = self.labels.count(IGNORE_INDEX) - (self.labels[0] == IGNORE_INDEX)
        return len(self.labels) - 1 - ignored_after_first
