import pytest
import torch

from hermes.model.attention import attention, available_backends, document_causal_mask


def _naive_packed_attention(q, k, v, lengths_per_row):
    """Each sample alone: softmax(q k^T / sqrt(d) + causal) v, kv heads repeated for their query group."""
    heads, dim = q.shape[2:]
    group = heads // k.shape[2]
    out = torch.zeros_like(q)
    for b, lengths in enumerate(lengths_per_row):
        start = 0
        for n in lengths:
            qs = q[b, start : start + n].transpose(0, 1)  # [heads, n, dim]
            ks = k[b, start : start + n].repeat_interleave(group, dim=1).transpose(0, 1)
            vs = v[b, start : start + n].repeat_interleave(group, dim=1).transpose(0, 1)
            scores = qs @ ks.transpose(1, 2) / dim**0.5
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            out[b, start : start + n] = (scores.softmax(-1) @ vs).transpose(0, 1)
            start += n
    return out


LENGTHS = [[5, 9, 2], [16]]  # row 0: three samples; row 1: one sample filling the row


def _inputs(requires_grad=False):
    torch.manual_seed(0)
    q = torch.randn(2, 16, 4, 8, requires_grad=requires_grad)
    k = torch.randn(2, 16, 2, 8, requires_grad=requires_grad)
    v = torch.randn(2, 16, 2, 8, requires_grad=requires_grad)
    offsets = [0]
    for row in LENGTHS:
        for n in row:
            offsets.append(offsets[-1] + n)
    return q, k, v, torch.tensor(offsets, dtype=torch.int32)


@pytest.mark.parametrize("backend", available_backends("cpu", torch.float32))
def test_backends_match_a_naive_per_sample_attention_forward_and_backward(backend):
    q, k, v, cu = _inputs(requires_grad=True)
    out = attention(q, k, v, cu, max_seqlen=16, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q2, k2, v2, _ = _inputs(requires_grad=True)
    expected = _naive_packed_attention(q2, k2, v2, LENGTHS)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q2, k2, v2))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_flex_attention_forward_on_cpu_matches_the_naive_reference():
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v, cu = _inputs()
    out = attention(q, k, v, cu, backend="flex")
    torch.testing.assert_close(out, _naive_packed_attention(q, k, v, LENGTHS), atol=1e-5, rtol=1e-5)


def test_document_mask_blocks_other_samples_and_the_future():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    mask = document_causal_mask(cu, 1, 5)[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_unknown_backend_is_refused_with_the_choices():
    q, k, v, cu = _inputs()
    with pytest.raises(ValueError, match="Unknown attention backend 'fast'.*reference"):
        attention(q, k, v, cu, backend="fast")
