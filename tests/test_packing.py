"""Packing: best-fit decreasing bins, over-long samples, and the packed batch layout."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hermes.data.packing import (
    PackedBatch,
    fit_sample,
    fit_to_capacity,
    pack_lengths,
    packing_efficiency,
)
from hermes.data.sample import IGNORE_INDEX, Sample


def naive_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """O(n^2) best-fit decreasing: longest first (ties by index), into the fullest bin that still holds
    the sample (ties: the bin opened first), else a new bin."""
    free: list[int] = []
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [(room, b) for b, room in enumerate(free) if room >= lengths[i]]
        if fits:
            _, b = min(fits)
            free[b] -= lengths[i]
            bins[b].append(i)
        else:
            free.append(capacity - lengths[i])
            bins.append([i])
    return bins


def lognormal_lengths(n: int, capacity: int, seed: int) -> list[int]:
    """A chat-like mix: median ~1,000 tokens, sigma 1, clipped to [16, capacity]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.lognormal(np.log(1000), 1.0, n)), 16, capacity).astype(int).tolist()


@st.composite
def lengths_and_capacity(draw: st.DrawFn) -> tuple[list[int], int]:
    capacity = draw(st.integers(1, 64))
    # A small pool of values makes runs of equal lengths common, as in real data.
    pool = draw(st.lists(st.integers(1, capacity), min_size=1, max_size=6))
    lengths = draw(st.lists(st.one_of(st.sampled_from(pool), st.integers(1, capacity)), max_size=80))
    return lengths, capacity


@settings(max_examples=300, deadline=None)
@given(lengths_and_capacity())
def test_every_sample_lands_in_exactly_one_bin_within_capacity(case: tuple[list[int], int]) -> None:
    lengths, capacity = case
    bins = pack_lengths(lengths, capacity)
    assert sorted(i for members in bins for i in members) == list(range(len(lengths)))
    assert all(members for members in bins)
    assert all(sum(lengths[i] for i in members) <= capacity for members in bins)


@settings(max_examples=300, deadline=None)
@given(lengths_and_capacity())
def test_bins_equal_a_naive_best_fit_decreasing(case: tuple[list[int], int]) -> None:
    lengths, capacity = case
    assert pack_lengths(lengths, capacity) == naive_best_fit_decreasing(lengths, capacity)


@pytest.mark.parametrize("seed", range(3))
def test_realistic_mixes_equal_a_naive_best_fit_decreasing(seed: int) -> None:
    lengths = lognormal_lengths(400, 2048, seed)
    assert pack_lengths(lengths, 2048) == naive_best_fit_decreasing(lengths, 2048)


def test_packing_is_deterministic_and_ignores_the_container_type() -> None:
    lengths = lognormal_lengths(2000, 8192, seed=7)
    first = pack_lengths(lengths, 8192)
    assert pack_lengths(lengths, 8192) == first
    assert pack_lengths(np.asarray(lengths, dtype=np.int32), 8192) == first
    assert pack_lengths(tuple(lengths), 8192) == first


@pytest.mark.parametrize("seed", range(3))
def test_lognormal_mix_packs_at_least_99_percent_full(seed: int) -> None:
    lengths = lognormal_lengths(3000, 8192, seed)
    bins = pack_lengths(lengths, 8192)
    assert packing_efficiency(lengths, bins, 8192) >= 0.99
    # No packing can use fewer rows than the tokens need; best fit comes within one row of that here.
    assert len(bins) <= -(-sum(lengths) // 8192) + 1


def test_packing_efficiency_is_real_tokens_over_row_slots() -> None:
    # Rows [5] and [3, 2] of capacity 8: 10 real tokens in 16 slots.
    assert packing_efficiency([3, 5, 2], [[1], [0, 2]], 8) == pytest.approx(10 / 16)
    assert packing_efficiency([], [], 8) == 0.0


def test_empty_input_gives_no_bins() -> None:
    assert pack_lengths([], 16) == []


def test_sample_longer_than_capacity_is_rejected_by_index_length_and_capacity() -> None:
    with pytest.raises(ValueError, match=r"Sample 2 has length 9, longer than .* capacity of 8 tokens"):
        pack_lengths([3, 8, 9, 1], 8)


@pytest.mark.parametrize(
    ("lengths", "capacity", "message"),
    [
        ([1, 2], 0, "capacity must be at least 1 token, got 0"),
        ([4, 0, 2], 8, "Sample 1 has length 0"),
        ([4, -3], 8, "Sample 1 has length -3"),
        ([1.5, 2.0], 8, "flat sequence of integers"),
    ],
)
def test_invalid_lengths_or_capacity_are_rejected(lengths: list, capacity: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pack_lengths(lengths, capacity)


def make_sample(length: int, first: int = 1, trained_from: int = 0) -> Sample:
    """Tokens first, first + 1, ...; labelled from `trained_from` on (the prompt before it is not)."""
    tokens = list(range(first, first + length))
    labels = [IGNORE_INDEX if t < trained_from else token for t, token in enumerate(tokens)]
    return Sample(tokens=tokens, labels=labels)


def test_overlong_samples_are_truncated_to_their_first_tokens_and_counted() -> None:
    samples = [make_sample(3), make_sample(7, first=10, trained_from=2), make_sample(5)]
    fitted = fit_to_capacity(samples, capacity=5, overlong="truncate")
    assert (fitted.truncated, fitted.dropped) == (1, 0)
    assert fitted.samples[0] is samples[0] and fitted.samples[2] is samples[2]
    assert fitted.samples[1].tokens == [10, 11, 12, 13, 14]
    assert fitted.samples[1].labels == [IGNORE_INDEX, IGNORE_INDEX, 12, 13, 14]


def test_overlong_samples_are_dropped_and_counted() -> None:
    samples = [make_sample(6), make_sample(2), make_sample(9), make_sample(4)]
    fitted = fit_to_capacity(samples, capacity=5, overlong="drop")
    assert (fitted.truncated, fitted.dropped) == (0, 2)
    assert fitted.samples == [samples[1], samples[3]]


def test_unknown_overlong_policy_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'split'.*\('truncate', 'drop'\)"):
        fit_to_capacity([make_sample(3)], capacity=2, overlong="split")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'split'.*\('truncate', 'drop'\)"):
        fit_sample(make_sample(1), capacity=2, overlong="split")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1 token"):
        fit_sample(make_sample(1), capacity=0)


def test_one_sample_is_kept_as_is_truncated_or_dropped() -> None:
    fits, long = make_sample(5), make_sample(7, first=10, trained_from=2)
    assert fit_sample(fits, capacity=5, overlong="drop") is fits
    assert fit_sample(long, capacity=5, overlong="drop") is None
    cut = fit_sample(long, capacity=5, overlong="truncate")
    assert cut is not None
    assert (cut.tokens, cut.labels) == ([10, 11, 12, 13, 14], [IGNORE_INDEX, IGNORE_INDEX, 12, 13, 14])
    assert (long.tokens, len(long.labels)) == (list(range(10, 17)), 7)  # the input is left whole


ROWS = [
    [make_sample(3, first=1), make_sample(4, first=20, trained_from=2)],
    [make_sample(8, first=40, trained_from=5)],
    [],
    [make_sample(1, first=60), make_sample(2, first=70)],
]
SEQ_LEN = 8
PAD = 0


def test_labels_are_shifted_within_each_sample_and_never_cross_a_boundary() -> None:
    batch = PackedBatch.from_rows(ROWS, SEQ_LEN, PAD)
    for r, row in enumerate(ROWS):
        expected_tokens: list[int] = []
        expected_labels: list[int] = []
        for sample in row:
            expected_tokens += sample.tokens
            # Target of token t is the sample's own label of token t + 1; the last token has none.
            expected_labels += [sample.labels[t + 1] for t in range(len(sample) - 1)] + [IGNORE_INDEX]
        pad = SEQ_LEN - len(expected_tokens)
        assert batch.tokens[r].tolist() == expected_tokens + [PAD] * pad
        assert batch.labels[r].tolist() == expected_labels + [IGNORE_INDEX] * pad
    assert batch.labels[0].tolist() == [2, 3, IGNORE_INDEX, IGNORE_INDEX, 22, 23, IGNORE_INDEX, IGNORE_INDEX]


def test_positions_restart_at_each_sample_and_at_the_pad_tail() -> None:
    batch = PackedBatch.from_rows(ROWS, SEQ_LEN, PAD)
    assert batch.position_ids.tolist() == [
        [0, 1, 2, 0, 1, 2, 3, 0],
        [0, 1, 2, 3, 4, 5, 6, 7],
        [0, 1, 2, 3, 4, 5, 6, 7],
        [0, 0, 1, 0, 1, 2, 3, 4],
    ]


def test_cu_seqlens_mark_every_sample_row_and_pad_tail_start() -> None:
    batch = PackedBatch.from_rows(ROWS, SEQ_LEN, PAD)
    # Row 0: samples at 0, 3, pad at 7; row 1 (one full sample) at 8; row 2 (all pad) at 16;
    # row 3: samples at 24, 25, pad at 27; end at 32.
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, 3, 7, 8, 16, 24, 25, 27, 32]
    assert batch.max_seqlen == 8


def test_counts_and_sample_lengths_follow_the_rows() -> None:
    batch = PackedBatch.from_rows(ROWS, SEQ_LEN, PAD)
    assert batch.sample_lengths == [3, 4, 8, 1, 2]
    assert batch.num_samples == 5
    assert batch.num_real_tokens == 18
    # Trained targets: sample 1 of row 0 predicts 22, 23 (its labels from index 2 on, shifted by one);
    # row 0's first sample predicts 2, 3; row 1 predicts 45, 46, 47; row 3's second sample predicts 71.
    assert batch.num_labelled == sum(sample.trained_tokens for row in ROWS for sample in row) == 8


def test_select_rebuilds_cu_seqlens_for_the_chosen_rows() -> None:
    batch = PackedBatch.from_rows(ROWS, SEQ_LEN, PAD)
    part = batch.select([3, 0])
    assert part.cu_seqlens.tolist() == [0, 1, 3, 8, 11, 15, 16]
    assert part.max_seqlen == 5
    assert part.sample_lengths == [1, 2, 3, 4]
    direct = PackedBatch.from_rows([ROWS[3], ROWS[0]], SEQ_LEN, PAD)
    for name in ("tokens", "labels", "position_ids", "cu_seqlens"):
        assert torch.equal(getattr(part, name), getattr(direct, name)), name
    assert part.row_lengths == direct.row_lengths


def test_select_rejects_a_row_outside_the_batch() -> None:
    batch = PackedBatch.from_rows(ROWS, SEQ_LEN, PAD)
    with pytest.raises(IndexError, match="Row 4 is not in this batch of 4 rows"):
        batch.select([0, 4])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(40, 64), st.randoms())
def test_packed_rows_match_their_samples_and_split_like_direct_construction(
    lengths: list[int], seq_len: int, rnd
) -> None:
    samples = [make_sample(n, first=1000 * i, trained_from=rnd.randint(0, n)) for i, n in enumerate(lengths)]
    rows = [[samples[i] for i in members] for members in pack_lengths(lengths, seq_len)]
    batch = PackedBatch.from_rows(rows, seq_len, pad_id=-1)
    # Every token's segment (from cu_seqlens) holds exactly one sample's tokens or only pad.
    flat_tokens = batch.tokens.flatten().tolist()
    bounds = batch.cu_seqlens.tolist()
    segments = [flat_tokens[a:b] for a, b in pairwise(bounds)]
    real = [segment for segment in segments if segment[0] != -1]
    assert sorted(real) == sorted(sample.tokens for sample in samples)
    assert all(set(segment) == {-1} for segment in segments if segment[0] == -1)
    assert batch.num_labelled == sum(sample.trained_tokens for sample in samples)
    assert batch.num_real_tokens == sum(lengths)
    picked = sorted(rnd.sample(range(len(rows)), rnd.randint(0, len(rows))))
    direct = PackedBatch.from_rows([rows[r] for r in picked], seq_len, pad_id=-1)
    assert batch.select(picked).cu_seqlens.tolist() == direct.cu_seqlens.tolist()


def test_rows_longer_than_seq_len_or_with_empty_samples_are_rejected() -> None:
    with pytest.raises(ValueError, match="Row 1 holds 9 tokens, more than seq_len=8"):
        PackedBatch.from_rows([[make_sample(2)], [make_sample(5), make_sample(4)]], 8, PAD)
    with pytest.raises(ValueError, match="Row 0 holds an empty sample"):
        PackedBatch.from_rows([[make_sample(2), Sample(tokens=[], labels=[])]], 8, PAD)


def test_to_moves_every_tensor() -> None:
    batch = PackedBatch.from_rows(ROWS, SEQ_LEN, PAD).to("meta")
    for tensor in (batch.tokens, batch.labels, batch.position_ids, batch.cu_seqlens):
        assert tensor.device.type == "meta"
    assert batch.row_lengths == ((3, 4), (8,), (), (1, 2))


def test_sample_segments_pick_each_sample_sum_out_of_the_segment_sums():
    from hermes.train.losses import segment_sums

    rows = [
        [Sample([1, 2], [1, 2]), Sample([4, 5], [4, 5])],  # a pad tail follows
        [Sample([6, 7, 8, 9, 10], [6, 7, 8, 9, 10])],  # fills the row: no pad segment
        [],
        [Sample([11], [11])],
    ]
    batch = PackedBatch.from_rows(rows, 5, pad_id=0)
    sums = segment_sums(batch.tokens.float(), batch.cu_seqlens)
    picked = [sums[i].item() for i in batch.sample_segments]
    assert picked == [1 + 2, 4 + 5, 6 + 7 + 8 + 9 + 10, 11]
