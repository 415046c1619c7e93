"""Deterministic, resumable, rank-aware iteration over packed global batches.

Every rank computes the same epoch plan from the sample lengths and the seed: samples are shuffled, packed
into rows by best-fit decreasing, and the rows shuffled again. Global batch k is rows [k*G, (k+1)*G) of that
plan whatever the number of processes; parallelism only decides which rows a rank computes. So the state is
just (epoch, step within the epoch), and a run resumes on any world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hermes.data.dataset import TokenizedDataset
from hermes.data.packing import PackedBatch, pack_lengths


@dataclass
class StepBatch:
    """What one rank needs for one optimizer step."""

    epoch: int
    """1-based epoch the step belongs to."""
    micro_batches: list[PackedBatch]
    """This rank's rows, `micro_batch` rows each; every rank gets the same number of micro-batches."""
    global_labelled_tokens: int
    """Labelled tokens in the whole global batch (the loss denominator)."""
    global_real_tokens: int
    """Non-pad tokens in the whole global batch."""
    global_sample_lengths: list[int] = field(default_factory=list)
    """Length of every sample in the global batch (for FLOP counting)."""


def _rng(seed: int, epoch: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, purpose])


def balanced_shares(row_tokens: list[int], ranks: int) -> list[list[int]]:
    """Split row indices into `ranks` equal-count shares with balanced token totals (snake order over the
    rows sorted by tokens, descending). Deterministic."""
    order = sorted(range(len(row_tokens)), key=lambda r: (-row_tokens[r], r))
    shares: list[list[int]] = [[] for _ in range(ranks)]
    for i, row in enumerate(order):
        lap, pos = divmod(i, ranks)
        shares[pos if lap % 2 == 0 else ranks - 1 - pos].append(row)
    return [sorted(share) for share in shares]


class PackedLoader:
    """Packed global batches for one data-parallel rank.

    Args:
        samples: the tokenized dataset (the same samples, in the same order, on every rank).
        seq_len: tokens per packed row.
        global_batch: rows per optimizer step over all data-parallel ranks.
        micro_batch: rows per forward/backward on one rank.
        dp_rank, dp_size: this rank's index among the data-parallel ranks, and their number.
        seed: shuffling seed.
        pad_id: token id of pad slots.
        group_size: samples that travel together: samples k*group_size ... (k+1)*group_size - 1 are one unit,
            packed into the same row in order (DPO: a pair's chosen and rejected sequences).
    """

    def __init__(
        self,
        samples: TokenizedDataset,
        seq_len: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        pad_id: int,
        group_size: int = 1,
    ) -> None:
        if len(samples) == 0:
            raise ValueError("No training samples: every record was filtered out (see filter_summary.json)")
        if global_batch % (dp_size * micro_batch):
            raise ValueError(
                f"train.global_batch ({global_batch}) must be a multiple of data-parallel ranks x micro_batch "
                f"({dp_size} x {micro_batch} = {dp_size * micro_batch})"
            )
        if len(samples) % group_size:
            raise ValueError(f"{len(samples)} samples do not split into groups of {group_size}")
        self.unit_lengths = samples.lengths.reshape(-1, group_size).sum(axis=1)
        too_long = np.flatnonzero(self.unit_lengths > seq_len)
        if len(too_long):
            raise ValueError(
                f"{len(too_long)} samples (or groups of {group_size}) exceed seq_len {seq_len} "
                f"(first: #{too_long[0]}); truncate or drop them first"
            )
        self.samples, self.group_size = samples, group_size
        self.lengths = samples.lengths
        self.seq_len, self.global_batch, self.micro_batch = seq_len, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed, self.pad_id = dp_rank, dp_size, seed, pad_id
        self.epoch, self.step_in_epoch = 1, 0
        self._plan_epoch: int | None = None
        self._rows: list[list[int]] = []

    def _plan(self) -> list[list[int]]:
        """Rows of sample indices for the current epoch, in training order."""
        if self._plan_epoch != self.epoch:
            order = _rng(self.seed, self.epoch, 0).permutation(len(self.unit_lengths))
            bins = pack_lengths(self.unit_lengths[order].tolist(), self.seq_len)
            g = self.group_size
            rows = [[int(order[i]) * g + j for i in b for j in range(g)] for b in bins]
            row_order = _rng(self.seed, self.epoch, 1).permutation(len(rows))
            self._rows = [rows[i] for i in row_order]
            self._plan_epoch = self.epoch
        return self._rows

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self._plan()) // self.global_batch)

    @property
    def epoch_finished(self) -> bool:
        """True right after the last batch of an epoch was handed out."""
        return self.step_in_epoch == 0 and self.epoch > 1

    def next_batch(self) -> StepBatch:
        """The next global batch's share for this rank (epochs roll over by themselves)."""
        rows = self._plan()
        start = self.step_in_epoch * self.global_batch
        global_rows = rows[start : start + self.global_batch]
        epoch = self.epoch
        batch = self._make(global_rows, epoch)
        self.step_in_epoch += 1
        if self.step_in_epoch * self.global_batch >= len(rows):
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return batch

    def _make(self, global_rows: list[list[int]], epoch: int) -> StepBatch:
        row_tokens = [int(self.lengths[row].sum()) for row in global_rows]
        # The last batch of an epoch may be short: empty rows (all padding, no labels) keep every rank's
        # micro-batch count equal, which the collectives need.
        slots = self.global_batch // self.dp_size
        mine = [
            [self.samples[i] for i in global_rows[r]]
            for r in balanced_shares(row_tokens, self.dp_size)[self.dp_rank]
        ]
        mine += [[] for _ in range(slots - len(mine))]
        packed = PackedBatch.from_rows(mine, self.seq_len, self.pad_id)
        micro = [
            packed.select(list(range(i, i + self.micro_batch))) for i in range(0, slots, self.micro_batch)
        ]
        in_batch = [i for row in global_rows for i in row]
        return StepBatch(
            epoch=epoch,
            micro_batches=micro,
            global_labelled_tokens=int(self.samples.trained_tokens[in_batch].sum()),
            global_real_tokens=sum(row_tokens),
            global_sample_lengths=self.lengths[in_batch].tolist(),
        )

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"Loader state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
