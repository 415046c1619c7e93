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


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_loss_gradients_and_parameter_names(mode):
    import torch

    from hermes.parallel.activation_checkpointing import apply_activation_checkpointing

    config = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64)
    torch.manual_seed(0)
    plain = Llama(config)
    torch.manual_seed(0)
    checkpointed = apply_activation_checkpointing(Llama(config), mode)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for model in (plain, checkpointed):
        model(tokens, labels=tokens).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_activation_checkpointing_recomputes_in_backward():
    import torch

    from hermes.parallel.activation_checkpointing import apply_activation_checkpointing

    config = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64)
    model = apply_activation_checkpointing(Llama(config), "full")
    calls = []
    model.layers[0].feed_forward.register_forward_hook(lambda *args: calls.append(1))
    tokens = torch.randint(0, 64, (1, 8))
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):  # recompute the whole block
        model(tokens, labels=tokens).sum().backward()
    assert len(calls) == 2  # the forward, and its recomputation in backward
