"""LoRA under tensor parallelism: the adapted model computes the single-process forward and gradients."""

import pytest
import torch

from hermes.model import Llama, LlamaConfig
from hermes.model.lora import adapter_disabled, apply_lora
from tests.launching import start_gloo_processes

CONFIG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=64)
TP = 2


def _model() -> Llama:
    """A LoRA model whose B matrices are non-zero, so every adapter path carries a signal."""
    torch.manual_seed(0)
    model = apply_lora(Llama(CONFIG), rank=4, alpha=8.0, dropout=0.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def _batch():
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=generator)
    labels = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=generator)
    labels[:, :3] = -100
    return tokens, labels


def _forward_backward(model: Llama) -> dict:
    tokens, labels = _batch()
    logprobs = model(tokens, labels=labels)
    logprobs.sum().backward()
    with torch.no_grad(), adapter_disabled(model):
        reference = model(tokens, labels=labels)
    return {"logprobs": logprobs.detach(), "reference": reference}


def _worker(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    from hermes.parallel.tensor_parallel import apply_tensor_parallel

    model = apply_tensor_parallel(_model(), init_device_mesh("cpu", (world,)))
    with loss_parallel():
        result = _forward_backward(model)
    result["grads"] = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        torch.save(result, out)


@pytest.mark.slow
def test_tensor_parallel_lora_gives_single_process_logprobs_and_adapter_gradients(tmp_path):
    model = _model()
    expected = _forward_backward(model)
    expected_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(expected_grads) == 2 * 7 * CONFIG.n_layers
    out = tmp_path / "tp.pt"
    start_gloo_processes(_worker, TP, out)
    result = torch.load(out)
    torch.testing.assert_close(result["logprobs"], expected["logprobs"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result["reference"], expected["reference"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected["logprobs"], expected["reference"])  # the adapters matter
    assert result["grads"].keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(result["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_a_lora_rank_that_tp_cannot_split_is_an_error():
    from hermes.parallel.tensor_parallel import apply_tensor_parallel

    model = apply_lora(Llama(CONFIG), rank=3, alpha=8.0, dropout=0.0)
    with pytest.raises(
        ValueError, match=r"the rank 3 is not divisible by it; choose lora.rank as a multiple of 2"
    ):
        apply_tensor_parallel(model, _FakeMesh(2))


class _FakeMesh:
    """Only the size is read before any sharding happens."""

    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size
