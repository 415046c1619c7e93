import math

import pytest
import torch

from hermes.data.sample import IGNORE_INDEX
from hermes.model import Llama, LlamaConfig, RopeScaling
from hermes.model.rope import rope_frequencies

SMALL = LlamaConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=300,
    hidden_dim=160,
    rope_scaling=RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
    ),
)


def test_8b_preset_on_meta_device_has_the_published_parameter_count():
    with torch.device("meta"):
        model = Llama(LlamaConfig.preset("llama3.1-8b"))
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "dim", "multiplier", "multiple_of", "expected"),
    [
        ("llama3.1-8b", 4096, 1.3, 1024, 14336),
        ("llama3.1-70b", 8192, 1.3, 4096, 28672),
        ("llama3.1-405b", 16384, 1.2, 4096, 53248),
    ],
)
def test_presets_derive_ffn_size_from_the_multiplier_rule(name, dim, multiplier, multiple_of, expected):
    hidden = int(multiplier * int(8 * dim / 3))
    assert math.ceil(hidden / multiple_of) * multiple_of == expected  # the rule, worked here
    config = LlamaConfig.preset(name)
    assert config.hidden_dim == expected and config.dim == dim and config.vocab_size == 128256


def test_tiny_preset_keeps_grouped_query_attention():
    tiny = LlamaConfig.preset("tiny")
    assert 2 <= tiny.n_layers <= 4 and tiny.n_heads > tiny.n_kv_heads and tiny.rope_scaling is not None


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"Unknown model preset 'llama9'.*llama3.1-8b"):
        LlamaConfig.preset("llama9")


def test_llama31_rope_scaling_changes_the_documented_frequency_counts():
    theta, d = 500000.0, 128
    base = [theta ** (-2 * i / d) for i in range(d // 2)]
    scaled = rope_frequencies(d, theta, RopeScaling()).double().tolist()
    unchanged = sum(math.isclose(s, f, rel_tol=1e-6) for s, f in zip(scaled, base))
    divided = sum(math.isclose(s, f / 8, rel_tol=1e-6) for s, f in zip(scaled, base))
    assert (unchanged, divided) == (29, 29)
    smoothed = [
        (i, s)
        for i, (s, f) in enumerate(zip(scaled, base))
        if not (math.isclose(s, f, rel_tol=1e-6) or math.isclose(s, f / 8, rel_tol=1e-6))
    ]
    assert len(smoothed) == 6
    for i, value in smoothed:
        f = base[i]
        wavelength = 2 * math.pi / f
        s = (8192 / wavelength - 1) / (4 - 1)
        assert 0 < s < 1
        assert value == pytest.approx((1 - s) * f / 8 + s * f, rel=1e-6)


def _packed_inputs(lengths, seq):
    """One row holding samples of `lengths` then padding; positions restart per sample."""
    positions, offsets = [], [0]
    for n in lengths:
        positions += list(range(n))
        offsets.append(offsets[-1] + n)
    if offsets[-1] < seq:
        positions += list(range(seq - offsets[-1]))
        offsets.append(seq)
    return torch.tensor([positions]), torch.tensor(offsets, dtype=torch.int32)


def test_packed_samples_give_the_logits_of_each_sample_run_alone():
    torch.manual_seed(0)
    model = Llama(SMALL)
    lengths, seq = [7, 20, 1, 11], 45  # positions past 16 exercise the scaled frequencies
    tokens = torch.randint(0, SMALL.vocab_size, (1, seq))
    position_ids, cu_seqlens = _packed_inputs(lengths, seq)
    packed = model(tokens, position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=max(lengths))
    start = 0
    for n in lengths:
        alone = model(tokens[:, start : start + n])
        torch.testing.assert_close(packed[:, start : start + n], alone, atol=1e-5, rtol=1e-5)
        start += n


def test_packed_samples_do_not_attend_across_boundaries():
    torch.manual_seed(0)
    model = Llama(SMALL)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 24))
    position_ids, cu_row = _packed_inputs([10, 14], 24)
    cu_seqlens = torch.cat([cu_row, cu_row[1:] + 24]).int()
    base = model(tokens, position_ids=position_ids.expand(2, -1), cu_seqlens=cu_seqlens)
    changed = tokens.clone()
    changed[:, :10] = (changed[:, :10] + 1) % SMALL.vocab_size  # rewrite the first sample of each row
    after = model(changed, position_ids=position_ids.expand(2, -1), cu_seqlens=cu_seqlens)
    torch.testing.assert_close(after[:, 10:], base[:, 10:], atol=0, rtol=0)
    assert not torch.allclose(after[:, :10], base[:, :10])


def test_grouped_query_attention_matches_repeated_kv_heads():
    """GQA equals full multi-head attention whose kv weights repeat each kv head for its query group."""
    torch.manual_seed(0)
    gqa = Llama(SMALL)
    mha = Llama(SMALL.replace(n_kv_heads=SMALL.n_heads))
    state = gqa.state_dict()
    group, hd = SMALL.n_heads // SMALL.n_kv_heads, SMALL.attention_head_dim
    for name in list(state):
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            w = state[name].view(SMALL.n_kv_heads, hd, SMALL.dim)
            state[name] = w.repeat_interleave(group, dim=0).reshape(-1, SMALL.dim)
    mha.load_state_dict(state)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 12))
    torch.testing.assert_close(gqa(tokens), mha(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keep_logits_bytes", [0, 2**30], ids=["recompute", "keep"])
def test_label_logprobs_equal_log_softmax_of_full_logits_with_gradients(monkeypatch, keep_logits_bytes):
    from hermes.model import llama

    monkeypatch.setattr(llama, "KEEP_LOGITS_BYTES", keep_logits_bytes)
    torch.manual_seed(0)
    model = Llama(SMALL)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 40))
    labels = torch.randint(0, SMALL.vocab_size, (2, 40))
    labels[0, :5] = IGNORE_INDEX
    model.zero_grad()
    logits = model(tokens)
    full = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    expected = torch.where(labels == IGNORE_INDEX, 0.0, full)
    expected.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = llama.label_logprobs(model.hidden_states(tokens), model.output, labels, chunk_tokens=7)
    torch.testing.assert_close(chunked, expected.detach(), atol=1e-5, rtol=1e-5)
    chunked.sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    ("dtype", "keep_logits_bytes", "chunks"),
    [(torch.float32, 2**30, 1), (torch.bfloat16, 2**30, 5), (torch.float32, 0, 5)],
    ids=["float32-kept", "bfloat16-kept", "float32-recomputed"],
)
def test_label_logprobs_runs_kept_float32_logits_as_one_chunk_without_a_larger_peak(
    monkeypatch, dtype, keep_logits_bytes, chunks
):
    from hermes.model import llama
    from hermes.model.llama import OutputHead
    from hermes.planning.measure import allocator_peak

    monkeypatch.setattr(llama, "KEEP_LOGITS_BYTES", keep_logits_bytes)
    torch.manual_seed(0)
    model = Llama(SMALL.replace(vocab_size=4096)).to(dtype)
    hidden = model.hidden_states(torch.randint(0, 4096, (2, 40))).detach().requires_grad_()
    labels = torch.randint(0, 4096, (2, 40))  # 80 labelled tokens: 5 chunks of 16
    calls, forward_calls = [], []
    chunk_logprobs = OutputHead.chunk_logprobs

    def counted(head, h, y):
        calls.append(h.shape[0])
        return chunk_logprobs(head, h, y)

    monkeypatch.setattr(OutputHead, "chunk_logprobs", counted)

    def step() -> None:
        logprobs = llama.label_logprobs(hidden, model.output, labels, chunk_tokens=16)
        forward_calls[:] = calls  # a recomputed chunk is called again in backward
        logprobs.sum().backward()

    peak = allocator_peak(step)
    assert len(forward_calls) == chunks and sum(forward_calls) == 80
    # Chunked as before (the head said to add buffers), the float32 kept step peaks no lower.
    monkeypatch.setattr(OutputHead, "chunks_add_no_buffers", lambda head: False)
    chunked_peak = allocator_peak(step)
    if chunks == 1:
        assert peak <= chunked_peak
        assert peak < 2 * 80 * 4096 * 4  # the kept logits and the head's weight gradient, no second copy


def test_meta_built_model_materialises_through_init_weights():
    with torch.device("meta"):
        model = Llama(SMALL)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert torch.equal(model.layers[0].attention_norm.weight, torch.ones(SMALL.dim))
    std = model.layers[0].attention.wq.weight.std().item()
    assert 0.015 < std < 0.025
    tokens = torch.randint(0, SMALL.vocab_size, (1, 8))
    assert torch.isfinite(model(tokens)).all()


def test_packed_rows_without_position_ids_are_refused():
    model = Llama(SMALL)
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32))


def test_rmsnorm_matches_the_formula_in_bfloat16():
    from hermes.model.llama import RMSNorm

    norm = RMSNorm(16, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    x = torch.randn(3, 16).to(torch.bfloat16)
    x32 = x.float()
    expected = (x32 / torch.sqrt((x32 * x32).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * norm.weight
    torch.testing.assert_close(norm(x), expected)
