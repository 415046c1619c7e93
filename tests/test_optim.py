import math

import pytest
import torch
from torch import nn

from hermes.config import OptimConfig
from hermes.model import Llama, LlamaConfig
from hermes.train.optim import build_optimizer, build_scheduler, parameter_groups


def _lrs(config: OptimConfig, total: int) -> list[float]:
    param = nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.SGD([param], lr=config.lr)
    scheduler = build_scheduler(optimizer, config, total)
    lrs = []
    for _ in range(total):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_then_cosine_follows_the_closed_form():
    peak, warmup, total, floor = 7e-6, 300, 1300, 0.1
    lrs = _lrs(OptimConfig(lr=peak, warmup_steps=warmup, schedule="cosine", min_lr_ratio=floor), total)
    assert lrs[0] == pytest.approx(peak / 300)
    assert lrs[1] == pytest.approx(2 * peak / 300)
    assert lrs[299] == pytest.approx(peak)  # last warmup step reaches the peak
    assert lrs[300] == pytest.approx(peak)  # cosine starts at the peak
    # Halfway through the decay the cosine is at the midpoint between peak and floor.
    assert lrs[800] == pytest.approx(peak * (floor + (1 - floor) * 0.5))
    p = 999 / 1000
    assert lrs[-1] == pytest.approx(peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))))


def test_linear_decay_reaches_zero_at_the_end():
    lrs = _lrs(OptimConfig(lr=3e-6, warmup_steps=9, schedule="linear"), 109)
    assert lrs[8] == pytest.approx(3e-6)
    assert lrs[59] == pytest.approx(3e-6 * 0.5)
    assert lrs[-1] == pytest.approx(3e-6 * (1 - 99 / 100))


def test_weight_decay_skips_norm_weights_only():
    model = Llama(LlamaConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=32, hidden_dim=32))
    decayed, undecayed = parameter_groups(model, 0.01)
    norm_ids = {id(m.weight) for name, m in model.named_modules() if name.endswith("norm")}
    assert {id(p) for p in undecayed["params"]} == norm_ids
    assert len(decayed["params"]) + len(undecayed["params"]) == len(list(model.parameters()))
    assert decayed["weight_decay"] == 0.01 and undecayed["weight_decay"] == 0.0


def test_adamw_step_matches_torch_reference_with_decoupled_decay():
    torch.manual_seed(0)
    w = nn.Linear(4, 4, bias=False)
    reference = torch.optim.AdamW(
        [nn.Parameter(w.weight.detach().clone())], lr=0.1, weight_decay=0.01, betas=(0.9, 0.95)
    )
    optimizer = build_optimizer(w, OptimConfig(lr=0.1, weight_decay=0.01, betas=[0.9, 0.95]))
    grad = torch.randn(4, 4)
    w.weight.grad = grad.clone()
    reference.param_groups[0]["params"][0].grad = grad.clone()
    optimizer.step()
    reference.step()
    torch.testing.assert_close(w.weight.detach(), reference.param_groups[0]["params"][0].detach())


def test_a_model_with_nothing_trainable_is_refused():
    layer = nn.Linear(2, 2)
    layer.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(layer, OptimConfig())
