import pytest

from hermes.model import Llama, LlamaConfig
from hermes.parallel.mesh import ParallelDims
from hermes.parallel.tensor_parallel import check_divisible


def test_world_size_must_match_the_mesh_with_the_arithmetic_shown():
    with pytest.raises(ValueError, match=r"World size 6 is not divisible by dp_replicate x tp = 2 x 4 = 8"):
        ParallelDims(dp_replicate=2, dp_shard=-1, tp=4, world_size=6)
    with pytest.raises(ValueError, match=r"2 x 2 x 2 = 8, but the world has 4 processes"):
        ParallelDims(dp_replicate=2, dp_shard=2, tp=2, world_size=4)
    dims = ParallelDims(dp_replicate=2, dp_shard=-1, tp=2, world_size=16)
    assert (dims.dp_shard, dims.dp_size) == (4, 8)


def test_heads_must_divide_by_tp():
    model = Llama(LlamaConfig(dim=48, n_layers=1, n_heads=6, n_kv_heads=3, vocab_size=32, hidden_dim=96))
    check_divisible(model, 3)
    with pytest.raises(ValueError, match=r"tp=2 needs n_kv_heads \(3\) divisible by it"):
        check_divisible(model, 2)
