import math

import pytest
import torch

from hermes.model import Llama, LlamaConfig
from hermes.train.neftune import neftune

CONFIG = LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=96)


def _noise(alpha, cu, batch, seq):
    model = Llama(CONFIG)
    tokens = torch.randint(0, 50, (batch, seq))
    clean = model.tok_embeddings(tokens)
    with neftune(model, alpha, cu):
        noisy = model.tok_embeddings(tokens)
    after = model.tok_embeddings(tokens)
    torch.testing.assert_close(after, clean, atol=0, rtol=0)  # the hook is gone after the block
    return (noisy - clean).detach()


def test_each_packed_sample_gets_noise_scaled_by_its_own_length():
    torch.manual_seed(0)
    lengths = [8, 120, 400, 2]  # one row of 530 tokens
    cu = torch.tensor([0, 8, 128, 528, 530], dtype=torch.int32)
    noise = _noise(5.0, cu, 1, sum(lengths))[0]
    start = 0
    for n in lengths:
        bound = 5.0 / math.sqrt(n * CONFIG.dim)  # alpha / sqrt(L d), L the sample's own length
        piece = noise[start : start + n]
        assert piece.abs().max() <= bound * (1 + 1e-6)
        # U(-b, b) has standard deviation b / sqrt(3); 64 x n draws pin it well.
        assert abs(piece.std().item() / (bound / math.sqrt(3)) - 1) < 0.25
        if n >= 100:
            assert piece.abs().max() > 0.9 * bound
        start += n


def test_alpha_zero_adds_nothing():
    cu = torch.tensor([0, 16], dtype=torch.int32)
    assert torch.count_nonzero(_noise(0.0, cu, 1, 16)) == 0


def test_a_sequence_chunk_gets_the_scale_of_each_token_s_whole_sample():
    """Sequence parallelism: rank 1 of 2 holds tokens 265..529; a sample straddling the cut keeps the
    scale of its full length, not of the part this rank sees."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 8, 128, 528, 530], dtype=torch.int32)  # samples of 8, 120, 400 and 2 tokens
    model = Llama(CONFIG)
    local = torch.randint(0, 50, (1, 265))  # the second half of a 530-token row
    clean = model.tok_embeddings(local)
    with neftune(model, 5.0, cu, sequence_shard=(1, 2)):
        noise = (model.tok_embeddings(local) - clean).detach()[0]
    pieces = {400: noise[: 528 - 265], 2: noise[528 - 265 :]}
    for n, piece in pieces.items():
        bound = 5.0 / math.sqrt(n * CONFIG.dim)
        assert piece.abs().max() <= bound * (1 + 1e-6)
        if n >= 100:
            assert piece.abs().max() > 0.9 * bound


def test_a_sequence_that_the_chunks_do_not_cover_is_an_error():
    model = Llama(CONFIG)
    cu = torch.tensor([0, 30], dtype=torch.int32)
    with neftune(model, 5.0, cu, sequence_shard=(0, 2)), pytest.raises(ValueError, match="must divide by"):
        model.tok_embeddings(torch.zeros(1, 16, dtype=torch.long))
