"""The SFT loss is the mean over every labelled token of the global batch, however it is split."""

import math
import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hermes.data.dataset import TokenizedDataset
from hermes.data.loader import PackedLoader
from hermes.data.packing import PackedBatch
from hermes.data.sample import IGNORE_INDEX, Sample
from hermes.model import Llama, LlamaConfig
from hermes.train.losses import dpo_loss, segment_sums, sft_loss
from hermes.train.sft import sft_step
from hermes.train.trainer import micro_batches
from tests.launching import start_gloo_processes

CONFIG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=64)
SEQ, ROWS = 48, 4


def _samples():
    rng = random.Random(0)
    samples = []
    for _ in range(14):
        n = rng.randint(4, 20)
        tokens = [rng.randrange(CONFIG.vocab_size) for _ in range(n)]
        cut = rng.randint(1, n - 1)  # prompt length: labels only after it
        samples.append(Sample(tokens, [IGNORE_INDEX] * cut + tokens[cut:]))
    return samples


def _model():
    torch.manual_seed(0)
    return Llama(CONFIG)


def _one_pass_reference(dataset):
    """The global batch of step 0 as ONE forward over all its rows: mean NLL over labelled tokens."""
    loader = PackedLoader(dataset, SEQ, ROWS, ROWS, 0, 1, seed=0, pad_id=0)
    [batch] = loader.next_batch().micro_batches
    model = _model()
    logits = model(batch.tokens, position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens)
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX
    )
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh

    from hermes.parallel.fsdp import apply_fsdp

    dataset = TokenizedDataset.from_samples(_samples())
    loader = PackedLoader(dataset, SEQ, ROWS, ROWS // world, rank, world, seed=0, pad_id=0)
    model = apply_fsdp(_model(), init_device_mesh("cpu", (world,)))
    batch = loader.next_batch()
    sums = sft_step(model, batch, micro_batches(model, batch, torch.device("cpu")))
    loss = sums["loss"].clone()
    dist.all_reduce(loss)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"loss": loss.item(), "grads": grads}, out)


@pytest.mark.slow
@pytest.mark.parametrize(("ranks", "micro_batches"), [(1, 4), (2, 2), (4, 1)])
def test_any_split_into_ranks_and_micro_batches_gives_the_one_pass_loss_and_gradients(
    tmp_path, ranks, micro_batches
):
    assert ranks * micro_batches == ROWS
    expected_loss, expected_grads = _one_pass_reference(TokenizedDataset.from_samples(_samples()))
    out = tmp_path / "result.pt"
    start_gloo_processes(_worker, ranks, out)
    result = torch.load(out)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(result["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def _accumulation_worker(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh

    from hermes.parallel.fsdp import apply_fsdp, sync_gradients_after

    dataset = TokenizedDataset.from_samples(_samples())
    loader = PackedLoader(dataset, SEQ, ROWS, 1, rank, world, seed=0, pad_id=0)
    model = apply_fsdp(_model(), init_device_mesh("cpu", (world,)))
    first = loader.next_batch().micro_batches[0]
    sync_gradients_after(model, last_micro_batch=False)
    model(first.tokens, position_ids=first.position_ids, cu_seqlens=first.cu_seqlens).sum().backward()
    shapes = {
        n: (tuple(p.grad.to_local().shape), tuple(p.to_local().shape)) for n, p in model.named_parameters()
    }
    if rank == 0:
        torch.save(shapes, out)


@pytest.mark.slow
def test_between_micro_batches_each_rank_holds_only_its_gradient_shard(tmp_path):
    """A non-final micro-batch still reduce-scatters: 405B's unsharded gradients would not fit any GPU."""
    out = tmp_path / "shapes.pt"
    start_gloo_processes(_accumulation_worker, 2, out)
    shapes = torch.load(out)
    assert len(shapes) == len(list(_model().parameters()))
    for name, (grad, param) in shapes.items():
        assert grad == param, name
    assert shapes["tok_embeddings.weight"][0] == (CONFIG.vocab_size // 2 + 1, CONFIG.dim)  # 97 rows over 2


def test_every_labelled_token_weighs_one_over_the_global_count_whatever_its_row_mates():
    rows = [
        [Sample([1, 2, 3], [IGNORE_INDEX, 2, 3]), Sample([4] * 30, [4] * 30)],
        [Sample([5, 6], [IGNORE_INDEX, 6])],
    ]
    batch = PackedBatch.from_rows(rows, 40, 0)
    logprobs = torch.zeros(batch.labels.shape, requires_grad=True)
    loss = sft_loss(logprobs, batch.num_labelled)
    loss.backward()
    labelled = batch.labels != IGNORE_INDEX
    assert batch.num_labelled == 2 + 29 + 1
    assert torch.all(logprobs.grad[labelled] == -1 / 32)  # a per-row or per-micro-batch mean would differ


def test_a_global_batch_without_labels_is_an_error():
    with pytest.raises(ValueError, match="no labelled token"):
        sft_loss(torch.zeros(1, 4), 0)


def test_segment_sums_add_each_sample_separately():
    values = torch.arange(12, dtype=torch.float32).view(2, 6)
    cu = torch.tensor([0, 2, 6, 9, 12], dtype=torch.int32)
    assert segment_sums(values, cu).tolist() == [0 + 1, 2 + 3 + 4 + 5, 6 + 7 + 8, 9 + 10 + 11]


def test_dpo_loss_matches_a_hand_worked_pair():
    # r_w = 0.1 * (-10 - -12) = 0.2; r_l = 0.1 * (-20 - -19) = -0.1; margin 0.3
    # loss = -log(sigmoid(0.3)) = log(1 + e^-0.3) = 0.554355...
    loss, metrics = dpo_loss(
        torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-12.0]), torch.tensor([-19.0]), beta=0.1
    )
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.3)), rel=1e-6)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.2)
    assert metrics["rewards/rejected"].item() == pytest.approx(-0.1)
    assert metrics["rewards/margins"].item() == pytest.approx(0.3)
    assert metrics["rewards/accuracies"].item() == 1.0


def _trl_sigmoid_dpo(pc, pr, rc, rr, beta, smoothing):
    """TRL's formula, written independently: logits = (pc - pr) - (rc - rr)."""
    logits = (pc - pr) - (rc - rr)
    return (-F.logsigmoid(beta * logits) * (1 - smoothing) - F.logsigmoid(-beta * logits) * smoothing).mean()


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dpo_loss_equals_trls_formula(smoothing):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=g) * 20 for _ in range(4))
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=smoothing)
    torch.testing.assert_close(loss, _trl_sigmoid_dpo(pc, pr, rc, rr, 0.3, smoothing))
    assert metrics["rewards/accuracies"].item() == pytest.approx(
        ((pc - rc) > (pr - rr)).float().mean().item()
    )


def test_dpo_loss_is_ln2_with_zero_rewards_when_policy_equals_reference():
    logps = torch.tensor([-5.0, -7.0, -3.0])
    loss, metrics = dpo_loss(logps, logps + 1, logps, logps + 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert all(metrics[k].item() == 0 for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
