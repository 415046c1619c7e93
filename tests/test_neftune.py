import math

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
