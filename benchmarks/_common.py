"""Pieces the CPU benchmarks share: a small model whose blocks, not its vocabulary, carry the work; the
bundled data with token ids folded into that vocabulary; and running a function on fresh processes that
form a gloo world.
"""

from __future__ import annotations

import numpy as np

from hermes.data.dataset import TokenizedDataset
from hermes.data.sample import IGNORE_INDEX
from hermes.model import LlamaConfig

SMALL_VOCAB = LlamaConfig(
    dim=512, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=1536, vocab_size=4096, max_seq_len=8192
)
"""16.8M parameters, 12.6M of them in the blocks: the Llama 3 vocabulary would put 131M parameters into
the embedding and the output head instead, and their optimizer step and FSDP traffic would dominate.
Heads (8), kv heads (4) and the FFN width (1536) divide by 1, 2 and 4 tensor-parallel ranks."""


def fold_vocabulary(dataset: TokenizedDataset, pad_id: int, vocab_size: int) -> tuple[TokenizedDataset, int]:
    """The dataset and pad id with every token id and label taken modulo `vocab_size`.

    Lengths and label masks are unchanged, so every step computes the same amount of work on ids a
    `vocab_size`-token model accepts (the losses mean nothing, but they agree between variants)."""
    labels = np.where(dataset.labels == IGNORE_INDEX, IGNORE_INDEX, dataset.labels % vocab_size)
    folded = TokenizedDataset(dataset.tokens % vocab_size, labels, dataset.offsets, dataset.categories)
    return folded, pad_id % vocab_size
