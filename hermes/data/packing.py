"""Sample packing: best-fit bin packing of sample lengths into rows, and the packed batch the model reads.

Several samples share one row of `seq_len` tokens. Attention never crosses a sample boundary (the model
reads `cu_seqlens`), positions restart at 0 at each sample and every sample's targets are shifted within
the sample, so a packed row trains exactly like its samples would one by one.
"""

from __future__ import annotations

import dataclasses
import gc
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from heapq import heapify, heappop, heappush
from itertools import accumulate, chain, repeat
from typing import Literal

import numpy as np
import torch

from hermes.data.sample import IGNORE_INDEX, Sample
from hermes.model.inputs import Packing

OVERLONG_POLICIES = ("truncate", "drop")
OverlongPolicy = Literal["truncate", "drop"]


def _validated_lengths(lengths: Sequence[int], capacity: int) -> np.ndarray:
    """Lengths as an int64 array, after checking each is in [1, capacity]."""
    if capacity < 1:
        raise ValueError(f"Packing capacity must be at least 1 token, got {capacity}; set a positive seq_len")
    sizes = np.asarray(lengths)
    if sizes.size == 0:
        return np.zeros(0, dtype=np.int64)
    if sizes.ndim != 1 or sizes.dtype.kind not in "iu":
        raise ValueError(
            f"Sample lengths must be a flat sequence of integers, got shape {sizes.shape} of {sizes.dtype}"
        )
    sizes = sizes.astype(np.int64, copy=False)
    bad = np.flatnonzero((sizes < 1) | (sizes > capacity))
    if bad.size:
        index = int(bad[0])
        length = int(sizes[index])
        if length < 1:
            raise ValueError(f"Sample {index} has length {length}; every sample needs at least 1 token")
        raise ValueError(
            f"Sample {index} has length {length}, longer than the packing capacity of {capacity} tokens; "
            f"truncate or drop it first (fit_to_capacity) or raise seq_len"
        )
    return sizes


def _add_bins(buckets: dict[int, list[int]], rooms: list[int], room: int, bins: Sequence[int]) -> None:
    """File `bins` (ascending ids) under `room` tokens of free space; full bins are no longer tracked."""
    if room == 0 or not bins:
        return
    heap = buckets.get(room)
    if heap is None:
        buckets[room] = list(bins)  # ascending ids already form a min-heap
        insort(rooms, room)
    elif 8 * len(bins) < len(heap):  # a few bins join a big heap: push them one by one
        for bin_id in bins:
            heappush(heap, bin_id)
    else:
        heap.extend(bins)
        heapify(heap)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Hold off the cyclic garbage collector for the duration of the block."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack samples into as few rows as possible by best-fit decreasing.

    Samples are taken longest first (equal lengths by index); each goes into the open bin with the least
    free space that still holds it (equal free space: the bin opened first), or opens a new bin. Bins are
    grouped by their free space, which is a small integer, and a run of equal lengths is placed bin by bin
    rather than sample by sample: the bin that takes one such sample stays the best fit for the next
    while it has room. The work is O(n log n) and usually far less than one step per sample.

    Args:
        lengths: token count of each sample.
        capacity: tokens per bin (the row length).

    Returns:
        Bins in the order they were opened, each a list of sample indices in the order they were placed.
        Every index appears exactly once and no bin holds more than `capacity` tokens. The result depends
        only on the inputs.

    Raises:
        ValueError: for a capacity below 1, a length below 1, or a sample longer than `capacity`
            (the message names the sample's index and length).
    """
    sizes = _validated_lengths(lengths, capacity)
    if sizes.size == 0:
        return []
    order = np.argsort(-sizes, kind="stable")  # longest first, equal lengths by index
    distinct, counts = np.unique(sizes, return_counts=True)

    # Samples longer than half a bin never share one: each opens its own, in order. Bins of equal free
    # space are then consecutive ids.
    num_bins = int(np.count_nonzero(2 * sizes > capacity))
    room_values, room_starts = np.unique(capacity - sizes[order[:num_bins]], return_index=True)
    room_ends = [*room_starts[1:].tolist(), num_bins]
    buckets: dict[int, list[int]] = {  # free space -> min-heap of ids of the open bins with that space
        room: list(range(start, end))
        for room, start, end in zip(room_values.tolist(), room_starts.tolist(), room_ends)
        if room
    }
    rooms = sorted(buckets)  # the keys of `buckets`, kept sorted
    run_bins = list(range(num_bins))  # the bin of each run of consecutive samples in `order` ...
    run_sizes = [1] * num_bins  # ... and the run's number of samples
    small = 2 * distinct <= capacity
    distinct, counts = distinct[small], counts[small]
    for length, count in zip(distinct[::-1].tolist(), counts[::-1].tolist()):
        while count:
            slot = bisect_left(rooms, length)
            room = rooms[slot] if slot < len(rooms) else capacity  # no open bin holds it: open new ones
            if count * length <= room:  # one bin takes the rest of the run: the common case, kept lean
                if room == capacity:
                    bin_id = num_bins
                    num_bins += 1
                else:
                    heap = buckets[room]
                    bin_id = heappop(heap)
                    if not heap:
                        del rooms[slot], buckets[room]
                run_bins.append(bin_id)
                run_sizes.append(count)
                _add_bins(buckets, rooms, room - count * length, (bin_id,))
                break
            per_bin = room // length  # samples of this length one bin with `room` takes
            full, rest = divmod(count, per_bin)
            need = full + (rest > 0)
            if room == capacity:
                taken: Sequence[int] = range(num_bins, num_bins + need)
                num_bins += need
            else:
                heap = buckets[room]
                if need >= len(heap):  # the run uses up every bin with this room
                    if need > len(heap):
                        full, rest = len(heap), 0
                    taken = sorted(heap)
                    del rooms[slot], buckets[room]
                else:
                    taken = [heappop(heap) for _ in range(need)]
            run_bins.extend(taken)
            run_sizes.extend([per_bin] * full)
            _add_bins(buckets, rooms, room - per_bin * length, taken[:full])
            if rest:
                run_sizes.append(rest)
                _add_bins(buckets, rooms, room - rest * length, taken[full:])
            count -= full * per_bin + rest

    bin_of = np.repeat(np.asarray(run_bins), np.asarray(run_sizes))  # bin of each sample in `order`
    members = order[np.argsort(bin_of, kind="stable")].tolist()
    ends = np.cumsum(np.bincount(bin_of, minlength=num_bins)).tolist()
    with gc_paused():  # many small lists, no cycles: spare them the collector's repeated full passes
        return [members[start:end] for start, end in zip([0, *ends[:-1]], ends)]


def packing_efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], capacity: int) -> float:
    """Fraction of the packed token slots that hold real tokens: sum of packed lengths / (bins * capacity).

    Returns 0.0 when there are no bins.
    """
    if not bins:
        return 0.0
    packed = np.fromiter(chain.from_iterable(bins), dtype=np.int64)
    return int(np.asarray(lengths, dtype=np.int64)[packed].sum()) / (len(bins) * capacity)


@dataclass(frozen=True)
class FittedSamples:
    """Samples that fit a row, and how many of the input samples were cut or left out to get there."""

    samples: list[Sample]
    truncated: int
    dropped: int


def fit_to_capacity(
    samples: Sequence[Sample], capacity: int, overlong: OverlongPolicy = "truncate"
) -> FittedSamples:
    """Make every sample fit a row of `capacity` tokens.

    Args:
        samples: tokenized samples.
        capacity: the row length.
        overlong: what to do with a sample longer than `capacity`: "truncate" keeps its first `capacity`
            tokens and labels; "drop" leaves it out.

    Returns:
        The kept samples in input order, and the counts of truncated and dropped ones for the caller to
        report.

    Raises:
        ValueError: for an unknown policy or a capacity below 1.
    """
    _check_fit_options(capacity, overlong)
    kept: list[Sample] = []
    truncated = 0
    for sample in samples:
        fitted = fit_sample(sample, capacity, overlong)
        if fitted is not None:
            kept.append(fitted)
            truncated += fitted is not sample
    return FittedSamples(samples=kept, truncated=truncated, dropped=len(samples) - len(kept))


def fit_sample(sample: Sample, capacity: int, overlong: OverlongPolicy = "truncate") -> Sample | None:
    """`sample` itself when it fits a row of `capacity` tokens; else a new sample of its first `capacity`
    tokens and labels ("truncate"), or None ("drop").

    Raises:
        ValueError: for an unknown policy or a capacity below 1.
    """
    _check_fit_options(capacity, overlong)
    if len(sample) <= capacity:
        return sample
    if overlong == "drop":
        return None
    return dataclasses.replace(sample, tokens=sample.tokens[:capacity], labels=sample.labels[:capacity])


def _check_fit_options(capacity: int, overlong: str) -> None:
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"Unknown over-long sample policy {overlong!r}; choose one of {OVERLONG_POLICIES}")
    if capacity < 1:
        raise ValueError(f"Packing capacity must be at least 1 token, got {capacity}; set a positive seq_len")


def _segments(row_lengths: Sequence[Sequence[int]], seq_len: int) -> list[int]:
    """Lengths of the attention segments of the flattened rows: each sample, then each row's pad tail."""
    segments: list[int] = []
    for lengths in row_lengths:
        segments.extend(lengths)
        pad = seq_len - sum(lengths)
        if pad:
            segments.append(pad)
    return segments


def _cu_seqlens(segments: Sequence[int]) -> torch.Tensor:
    """int32 cumulative offsets [0, s0, s0 + s1, ..., total]."""
    return torch.tensor([0, *accumulate(segments)], dtype=torch.int32)


def _row_pieces(
    rows: Sequence[Sequence[Sample]], seq_len: int, pad_id: int
) -> tuple[list[Iterable[int]], list[Iterable[int]], list[tuple[int, ...]]]:
    """The rows' tokens and labels as pieces to concatenate (each sample's lists, then the row's pad run),
    and each row's sample lengths.

    Raises:
        ValueError: for a row longer than `seq_len` or an empty sample (the message names the row).
    """
    tokens: list[Iterable[int]] = []
    labels: list[Iterable[int]] = []
    row_lengths = []
    for r, row in enumerate(rows):
        lengths = tuple(map(len, row))
        if 0 in lengths:
            raise ValueError(
                f"Row {r} holds an empty sample (position {lengths.index(0)}); drop empty samples"
            )
        used = sum(lengths)
        if used > seq_len:
            raise ValueError(
                f"Row {r} holds {used} tokens, more than seq_len={seq_len}; pack with capacity seq_len"
            )
        for sample in row:
            tokens.append(sample.tokens)
            labels.append(sample.labels)
        tokens.append(repeat(pad_id, seq_len - used))
        labels.append(repeat(IGNORE_INDEX, seq_len - used))
        row_lengths.append(lengths)
    return tokens, labels, row_lengths


def _int64_values(pieces: Iterable[Iterable[int]], count: int) -> np.ndarray:
    """The concatenated pieces (`count` values in all) as one int64 array."""
    return np.fromiter(chain.from_iterable(pieces), dtype=np.int64, count=count)


@dataclass(frozen=True)
class PackedBatch:
    """Rows of packed samples, ready for the model and the loss.

    Each row holds whole samples back to back, then pad tokens up to `seq_len`. For the flattened
    [rows * seq_len] tokens, the segments are: every sample, and the pad tail of every row that has one.

    Attributes:
        tokens: [rows, seq_len] int64 token ids; pad slots hold the pad id.
        labels: [rows, seq_len] int64 targets, already shifted within each sample: labels[r, t] is the
            sample's label of the token after t, IGNORE_INDEX at each sample's last token and on every pad
            slot, so no target crosses a sample boundary.
        position_ids: [rows, seq_len] int64, restarting at 0 at each segment (the pad tail counts from 0).
        cu_seqlens: [segments + 1] int32 offsets of the segments into the flattened tokens, from 0 to
            rows * seq_len (the form varlen attention kernels take).
        max_seqlen: the longest segment, pad tails included.
        row_lengths: each row's sample lengths, in order; the source of `cu_seqlens` after `select`.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    row_lengths: tuple[tuple[int, ...], ...]

    @property
    def packing(self) -> Packing:
        """The packing metadata as the model takes it."""
        return Packing(self.position_ids, self.cu_seqlens, self.max_seqlen)

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[Sample]], seq_len: int, pad_id: int) -> PackedBatch:
        """Lay out rows of samples (e.g. the bins of `pack_lengths`) as a packed batch.

        Args:
            rows: the samples of each row, in order; a row may be empty (all pad).
            seq_len: tokens per row.
            pad_id: token id of the pad slots.

        Raises:
            ValueError: for a row longer than `seq_len` or an empty sample (the message names the row).
        """
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1 token, got {seq_len}")
        token_pieces, label_pieces, row_lengths = _row_pieces(rows, seq_len, pad_id)
        segments = _segments(row_lengths, seq_len)
        cu_seqlens = _cu_seqlens(segments)
        offsets = cu_seqlens.numpy().astype(np.int64)
        size = len(rows) * seq_len
        tokens = _int64_values(token_pieces, size)
        # Each segment's labels move one slot left; its last slot, which no label of its own follows,
        # is ignored.
        labels = np.empty(size, dtype=np.int64)
        labels[:-1] = _int64_values(label_pieces, size)[1:]
        labels[offsets[1:] - 1] = IGNORE_INDEX
        position_ids = np.arange(size, dtype=np.int64) - np.repeat(offsets[:-1], segments)
        return cls(
            tokens=torch.from_numpy(tokens).view(len(rows), seq_len),
            labels=torch.from_numpy(labels).view(len(rows), seq_len),
            position_ids=torch.from_numpy(position_ids).view(len(rows), seq_len),
            cu_seqlens=cu_seqlens,
            max_seqlen=max(segments, default=0),
            row_lengths=tuple(row_lengths),
        )

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_samples(self) -> int:
        return sum(len(lengths) for lengths in self.row_lengths)

    @property
    def sample_lengths(self) -> list[int]:
        """Each sample's own length, row by row (what per-sample NEFTune scaling and FLOP counts need)."""
        return [length for lengths in self.row_lengths for length in lengths]

    @property
    def num_real_tokens(self) -> int:
        """Slots that hold a sample's token (not pad)."""
        return sum(sum(lengths) for lengths in self.row_lengths)

    @property
    def num_labelled(self) -> int:
        """Positions that carry a target (label != IGNORE_INDEX)."""
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def sample_segments(self) -> list[int]:
        """Index, among the segments of `cu_seqlens`, of every sample in order (pad tails skipped): turns
        per-segment sums (hermes.train.losses.segment_sums) into per-sample values."""
        indices, segment = [], 0
        for lengths in self.row_lengths:
            indices.extend(range(segment, segment + len(lengths)))
            segment += len(lengths) + (sum(lengths) < self.seq_len)
        return indices

    def select(self, row_indices: Sequence[int]) -> PackedBatch:
        """The sub-batch of the given rows, in the given order, with `cu_seqlens` and `max_seqlen` rebuilt."""
        picked = [int(r) for r in row_indices]
        outside = [r for r in picked if not 0 <= r < self.rows]
        if outside:
            raise IndexError(
                f"Row {outside[0]} is not in this batch of {self.rows} rows (0..{self.rows - 1})"
            )
        row_lengths = tuple(self.row_lengths[r] for r in picked)
        segments = _segments(row_lengths, self.seq_len)
        index = torch.tensor(picked, dtype=torch.long, device=self.tokens.device)
        return PackedBatch(
            tokens=self.tokens.index_select(0, index),
            labels=self.labels.index_select(0, index),
            position_ids=self.position_ids.index_select(0, index),
            cu_seqlens=_cu_seqlens(segments).to(self.cu_seqlens.device),
            max_seqlen=max(segments, default=0),
            row_lengths=row_lengths,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """The same batch with every tensor on `device`."""
        return dataclasses.replace(
            self,
            tokens=self.tokens.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            position_ids=self.position_ids.to(device, non_blocking=non_blocking),
            cu_seqlens=self.cu_seqlens.to(device, non_blocking=non_blocking),
        )
