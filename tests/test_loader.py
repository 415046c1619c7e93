import random

import pytest

from hermes.data.dataset import TokenizedDataset
from hermes.data.loader import PackedLoader, balanced_shares
from hermes.data.sample import IGNORE_INDEX, Sample

PAD = 0


def _dataset(n=120, seed=0):
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        length = rng.randint(3, 60)
        tokens = [1 + (i * 7 + t) % 500 for t in range(length)]
        labels = [IGNORE_INDEX if t < length // 3 else tok for t, tok in enumerate(tokens)]
        samples.append(Sample(tokens, labels, category=f"c{i % 3}"))
    return samples, TokenizedDataset.from_samples(samples)


def _loaders(dataset, world, global_batch=8, micro_batch=1, seed=3):
    return [PackedLoader(dataset, 64, global_batch, micro_batch, r, world, seed, PAD) for r in range(world)]


def _global_rows(loaders):
    """The step's rows over all ranks, as token tuples, real (non-empty) rows only, sorted."""
    rows = []
    batches = [loader.next_batch() for loader in loaders]
    for batch in batches:
        for micro in batch.micro_batches:
            for r in range(micro.rows):
                if micro.row_lengths[r]:
                    rows.append(tuple(micro.tokens[r].tolist()))
    return sorted(rows), batches


@pytest.mark.parametrize("world", [2, 4])
def test_global_batch_of_each_step_is_the_same_rows_whatever_the_world_size(world):
    _, dataset = _dataset()
    single, multi = _loaders(dataset, 1), _loaders(dataset, world)
    steps = single[0].steps_per_epoch * 2 + 1  # crosses two epoch boundaries
    for _ in range(steps):
        expected, [one] = _global_rows(single)
        got, batches = _global_rows(multi)
        assert got == expected
        assert {b.global_labelled_tokens for b in batches} == {one.global_labelled_tokens}
        assert len({len(b.micro_batches) for b in batches}) == 1  # same micro-step count on every rank


def test_an_epoch_trains_every_sample_exactly_once_and_counts_labels_like_the_samples():
    samples, dataset = _dataset()
    [loader] = _loaders(dataset, 1)
    seen, labelled = [], 0
    for _ in range(loader.steps_per_epoch):
        batch = loader.next_batch()
        labelled += batch.global_labelled_tokens
        for micro in batch.micro_batches:
            start = 0
            flat = micro.tokens.reshape(-1).tolist()
            for r, lengths in enumerate(micro.row_lengths):
                start = r * 64
                for n in lengths:
                    seen.append(tuple(flat[start : start + n]))
                    start += n
    assert loader.epoch_finished and loader.epoch == 2
    assert sorted(seen) == sorted(tuple(s.tokens) for s in samples)
    assert labelled == sum(sum(1 for x in s.labels[1:] if x != IGNORE_INDEX) for s in samples)


@pytest.mark.parametrize(("world_before", "world_after"), [(2, 2), (2, 1), (1, 4)])
def test_resume_from_a_saved_state_yields_the_batches_of_an_uninterrupted_run(world_before, world_after):
    _, dataset = _dataset()
    uninterrupted = _loaders(dataset, world_after)
    before = _loaders(dataset, world_before)
    k = before[0].steps_per_epoch + 2  # mid-epoch of epoch 2
    for _ in range(k):
        _global_rows(uninterrupted)
        _global_rows(before)
    state = before[0].state_dict()
    resumed = _loaders(dataset, world_after)
    for loader in resumed:
        loader.load_state_dict(state)
    for _ in range(5):
        assert _global_rows(resumed)[0] == _global_rows(uninterrupted)[0]


def test_shares_have_equal_row_counts_and_balanced_tokens():
    tokens = [100, 90, 80, 70, 60, 50, 40, 30]
    shares = balanced_shares(tokens, 2)
    assert sorted(i for share in shares for i in share) == list(range(8))
    assert [len(s) for s in shares] == [4, 4]
    totals = [sum(tokens[i] for i in share) for share in shares]
    assert abs(totals[0] - totals[1]) <= 20  # snake order: 100+70+60+30 vs 90+80+50+40


def test_global_batch_must_divide_over_ranks_and_micro_batches():
    _, dataset = _dataset()
    with pytest.raises(ValueError, match=r"global_batch \(6\) must be a multiple of .* \(4 x 1 = 4\)"):
        PackedLoader(dataset, 64, 6, 1, 0, 4, 0, PAD)


def test_a_resumed_state_from_another_seed_is_refused():
    _, dataset = _dataset()
    [loader] = _loaders(dataset, 1, seed=1)
    with pytest.raises(ValueError, match="seed 5"):
        loader.load_state_dict({"epoch": 1, "step_in_epoch": 0, "seed": 5})


def test_grouped_samples_stay_together_and_in_order_in_one_row():
    samples, dataset = _dataset(n=60)  # 30 units of two samples
    for world in (1, 2):
        loaders = [PackedLoader(dataset, 128, 4, 1, r, world, 0, PAD, group_size=2) for r in range(world)]
        seen = []
        for _ in range(loaders[0].steps_per_epoch):
            for loader in loaders:
                for micro in loader.next_batch().micro_batches:
                    for r, lengths in enumerate(micro.row_lengths):
                        start, row = 0, []
                        for n in lengths:
                            row.append(tuple(micro.tokens[r, start : start + n].tolist()))
                            start += n
                        assert len(row) % 2 == 0
                        seen += [(row[i], row[i + 1]) for i in range(0, len(row), 2)]
        expected = [(tuple(samples[i].tokens), tuple(samples[i + 1].tokens)) for i in range(0, 60, 2)]
        assert sorted(seen) == sorted(expected)
