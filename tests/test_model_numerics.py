"""The model's RoPE, RMSNorm and label log-probabilities against the formulas they replaced, written out
here (benchmarks/model_cpu.py --changes patches them back in to time each change alone): cos/sin rebuilt
from the position ids on every forward and halves rotated by slicing and concatenating; RMSNorm as float32
normalisation, cast back, times the weight; log p(label) as the negated `F.cross_entropy` of the logits."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from hermes.model import Llama, LlamaConfig, RopeScaling
from hermes.model import llama as llama_module
from hermes.model.inputs import IGNORE_INDEX
from hermes.model.llama import OutputHead, RMSNorm
from hermes.model.rope import RopeCache, apply_rope, rope_frequencies

SCALED = LlamaConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=300,
    hidden_dim=160,
    rope_scaling=RopeScaling(original_max_position_embeddings=16),  # positions past 16 use every band
)


def plain_cos_sin(position_ids: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous tables: angles position * f, halves repeated, plain cos and sin (the form
    `rotate_halves` takes)."""
    angles = position_ids.float()[..., None] * freqs
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rebuilt_cos_sin(position_ids: torch.Tensor, config: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous per-forward tables of `config`'s frequencies."""
    freqs = rope_frequencies(config.attention_head_dim, config.rope_theta, config.rope_scaling)
    return plain_cos_sin(position_ids, freqs)


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The previous rotation: x * cos + (-x2, x1) * sin in float32, cast back."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).to(x.dtype)


def packed_positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]


def test_cached_table_rows_are_the_angles_of_each_packed_position():
    positions = packed_positions([7, 40, 1, 300])
    cache = RopeCache(SCALED.attention_head_dim, SCALED.rope_theta, SCALED.rope_scaling)
    cos, sin = cache.cos_sin(positions, bound=positions.shape[1])
    want_cos, want_sin = rebuilt_cos_sin(positions, SCALED)
    half = SCALED.attention_head_dim // 2
    assert torch.equal(cos, want_cos)
    assert torch.equal(sin, torch.cat((-want_sin[..., :half], want_sin[..., half:]), dim=-1))


def test_table_is_built_once_and_grows_only_for_a_larger_position():
    cache = RopeCache(SCALED.attention_head_dim, SCALED.rope_theta, SCALED.rope_scaling)
    cpu = torch.device("cpu")
    first = cache.tables(cpu, 100)
    assert first[0].shape[0] == 128  # the next power of two
    assert cache.tables(cpu, 128) is first  # reused while the positions fit
    positions = torch.tensor([[0, 5, 1000]])
    cos, _ = cache.cos_sin(positions)  # no bound given: read from the positions
    grown = cache.tables(cpu, 1)
    assert grown is not first and grown[0].shape[0] == 1024
    assert torch.equal(cos, rebuilt_cos_sin(positions, SCALED)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rolled_rotation_equals_the_sliced_one_forward_and_backward(dtype):
    torch.manual_seed(0)
    positions = packed_positions([13, 51])
    x = torch.randn(1, 64, 4, SCALED.attention_head_dim).to(dtype).requires_grad_()
    cache = RopeCache(SCALED.attention_head_dim, SCALED.rope_theta, SCALED.rope_scaling)
    got = apply_rope(x, *cache.cos_sin(positions))
    want = rotate_halves(x, *rebuilt_cos_sin(positions, SCALED))
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    else:  # the float32 results are a rounding apart at most, so the bfloat16 ones one step at most
        assert ((got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-6).all()
    grad = torch.randn_like(got)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    torch.testing.assert_close(got_grad.float(), want_grad.float(), atol=1e-5, rtol=1e-5)


CosSin = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class PerForwardRope:
    """The previous RoPE of `Llama.hidden_states` (a stand-in for `Llama.rope`): frequencies and tables
    rebuilt from the position ids on every call, by `cos_sin` (position ids, frequencies -> tables): the
    previous plain tables, or `rope_cos_sin`'s signed ones for the rolled rotation."""

    def __init__(self, config: LlamaConfig, cos_sin: CosSin = plain_cos_sin) -> None:
        self.config = config
        self.tables = cos_sin

    def cos_sin(
        self, position_ids: torch.Tensor, bound: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        freqs = rope_frequencies(c.attention_head_dim, c.rope_theta, c.rope_scaling, position_ids.device)
        return self.tables(position_ids, freqs)


def test_model_with_the_cached_table_gives_the_logits_and_gradients_of_the_per_forward_rebuild(monkeypatch):
    torch.manual_seed(0)
    model = Llama(SCALED)
    tokens = torch.randint(0, SCALED.vocab_size, (2, 48))
    lengths = [5, 30, 13]
    positions = packed_positions(lengths).expand(2, -1)
    offsets = torch.tensor([0, 5, 35, 48], dtype=torch.int32)
    cu_seqlens = torch.cat([offsets, offsets[1:] + 48]).int()

    def logits_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logits = model(tokens, position_ids=positions, cu_seqlens=cu_seqlens, max_seqlen=30)
        logits.square().mean().backward()
        return logits.detach(), {name: p.grad for name, p in model.named_parameters()}

    got, got_grads = logits_and_grads()
    monkeypatch.setattr(model, "rope", PerForwardRope(SCALED))
    monkeypatch.setattr(llama_module, "apply_rope", rotate_halves)
    want, want_grads = logits_and_grads()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, want_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def recipe_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama 3's RMSNorm as the recipe states it: float32, cast back, times the weight."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_the_recipe_forward_and_backward(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 64))
    x = (3 * torch.randn(4, 9, 64)).to(dtype).requires_grad_()
    weight = norm.weight.detach().clone().requires_grad_()
    got, want = norm(x), recipe_rmsnorm(x, weight, 1e-5)
    assert got.dtype == dtype
    # float32: one op instead of three, the same to rounding; bfloat16: the same three steps.
    tolerance = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tolerance)
    grad = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (x, norm.weight), grad)
    want_grads = torch.autograd.grad(want, (x, weight), grad)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(
            g.float(), w.float(), atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-3
        )


def test_rmsnorm_backward_passes_gradcheck_and_leaves_a_frozen_weight_without_gradient():
    from hermes.model.llama import _RMSNormFunction

    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.linspace(0.5, 1.5, 8, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w: _RMSNormFunction.apply(a, w, 1e-5), (x, weight))
    norm = RMSNorm(8, 1e-5).requires_grad_(False)  # a LoRA run freezes the norms
    x32 = torch.randn(2, 8, requires_grad=True)
    norm(x32).sum().backward()
    assert norm.weight.grad is None and x32.grad is not None


def cross_entropy_logprobs(head: OutputHead, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The previous `OutputHead.chunk_logprobs`: the negated token cross-entropy of the float32 logits."""
    logits = head(hidden).float()
    return -F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")


@pytest.mark.parametrize("keep_logits_bytes", [0, 2**30], ids=["recompute", "keep"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_logprobs_in_place_equal_the_cross_entropy_forward_and_backward(
    monkeypatch, keep_logits_bytes, dtype
):
    monkeypatch.setattr(llama_module, "KEEP_LOGITS_BYTES", keep_logits_bytes)
    torch.manual_seed(0)
    model = Llama(SCALED).to(dtype)
    tokens = torch.randint(0, SCALED.vocab_size, (2, 40))
    labels = torch.randint(0, SCALED.vocab_size, (2, 40))
    labels[:, :9] = IGNORE_INDEX
    weights = torch.rand(2, 40)  # a loss that weighs each token's log-probability differently

    def logprobs_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logprobs = llama_module.label_logprobs(model.hidden_states(tokens), model.output, labels, 16)
        (logprobs * weights).sum().backward()
        return logprobs.detach(), {name: p.grad for name, p in model.named_parameters()}

    got, got_grads = logprobs_and_grads()
    monkeypatch.setattr(OutputHead, "chunk_logprobs", cross_entropy_logprobs)
    want, want_grads = logprobs_and_grads()
    assert got.dtype == torch.float32
    # The same float32 log-softmax; its gradient differs by a rounding at most (exp in another kernel).
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for name, grad in got_grads.items():
        tolerance = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {}
        torch.testing.assert_close(grad, want_grads[name], **tolerance, msg=name)


def test_label_logprobs_refuse_a_second_backward_through_the_same_graph():
    """Backward turns the kept log-softmax into the logits' gradient in place; a retained graph cannot run
    it again, and says so rather than giving a wrong gradient."""
    model = Llama(SCALED)
    tokens = torch.randint(0, SCALED.vocab_size, (1, 12))
    loss = model(tokens, labels=tokens).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
