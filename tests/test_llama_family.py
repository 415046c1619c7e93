"""Llama-architecture checkpoints beyond Llama 3.1: tied input/output embeddings (Llama 3.2 1B / 3B) and the
RoPE variants (default, linear, llama3), against transformers, Meta's layout and real gloo processes."""

import json

import pytest
import torch
import transformers

from hermes.data.sample import IGNORE_INDEX
from hermes.model import LinearRopeScaling, Llama, LlamaConfig, RopeScaling
from hermes.model.hf import load_pretrained, save_pretrained
from hermes.model.lora import apply_lora, merge_lora
from hermes.parallel.sharded_hf import load_sharded, save_sharded
from hermes.plan import plan
from hermes.train.metrics import training_flops
from tests.launching import start_gloo_processes
from tests.test_hf import (
    _LLAMA3_ROPE,
    HF_NAMES,
    META_TWIN,
    SMALL,
    _hf_config,
    _logits,
    _meta_state,
    _model,
    _randomise_norms,
    _tokens,
    _write_meta,
)
from tests.test_plan import meta_parameters
from tests.test_sharded_hf import _assert_byte_identical, _empty, _tensors

TIED = SMALL.replace(tie_word_embeddings=True)
LLAMA3_SCALING = {"rope_type": "llama3", **_LLAMA3_ROPE}


def _safetensors_names(path) -> set[str]:
    """The tensor names a safetensors file's header lists (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return set(header) - {"__metadata__"}


def _transformers_model(config: transformers.LlamaConfig, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.config._attn_implementation = "eager"
    _randomise_norms(model)
    return model


def _batch(vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Four rows of 16 tokens with random targets, the first four positions of each untrained."""
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, vocab, (4, 16), generator=generator)
    labels = torch.randint(0, vocab, (4, 16), generator=generator)
    labels[:, :4] = IGNORE_INDEX
    return tokens, labels


# Tied embeddings: one parameter -------------------------------------------------------------------------


def test_tied_head_is_the_embedding_table_and_one_adamw_step_keeps_it_one_tensor():
    model = _model(TIED)
    assert model.output.weight is model.tok_embeddings.weight
    untied_count = sum(p.numel() for p in _model(SMALL).parameters())
    assert sum(p.numel() for p in model.parameters()) == untied_count - 256 * 64

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.tok_embeddings.weight.detach().clone()
    tokens, labels = _batch()
    (-model(tokens, labels=labels).sum()).backward()
    optimizer.step()
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert not torch.equal(model.tok_embeddings.weight, before)  # the step moved the table
    assert len(optimizer.state) == len(list(model.parameters()))  # one state for the table


def test_tied_gradient_is_the_sum_of_the_embedding_and_the_head_gradients():
    tied = _model(TIED)
    untied = Llama(SMALL)
    untied.load_state_dict(tied.state_dict())  # both names hold the one table: the same values twice
    tokens, labels = _batch()
    for model in (tied, untied):
        (-model(tokens, labels=labels).sum()).backward()
    both_uses = untied.tok_embeddings.weight.grad + untied.output.weight.grad
    assert untied.tok_embeddings.weight.grad.abs().sum() > 0 and untied.output.weight.grad.abs().sum() > 0
    torch.testing.assert_close(tied.tok_embeddings.weight.grad, both_uses, atol=1e-6, rtol=1e-5)


def _initialised_on_meta(config: LlamaConfig, seed: int) -> Llama:
    """Built on the meta device, materialised, then initialised with `seed`: the sharded build's order."""
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


def test_a_tied_model_materialised_from_meta_stays_tied_and_its_table_gets_the_embeddings_init():
    model = _initialised_on_meta(TIED, seed=4)
    assert model.output.weight is model.tok_embeddings.weight
    untied = _initialised_on_meta(SMALL, seed=4)
    # The embedding is drawn first, so the tied table is the untied model's embedding; the blocks follow.
    assert torch.equal(model.tok_embeddings.weight, untied.tok_embeddings.weight)
    assert torch.equal(model.layers[1].feed_forward.w2.weight, untied.layers[1].feed_forward.w2.weight)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(1.0, abs=0.05)  # N(0, 1), not the head's


# Tied embeddings: checkpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 100_000], ids=["one-file", "shards"])
def test_tied_export_has_no_lm_head_and_loads_tied_in_transformers_with_the_same_logits(
    tmp_path, max_shard_bytes
):
    model = _model(TIED)
    save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=max_shard_bytes)

    files = sorted((tmp_path / "ckpt").glob("*.safetensors"))
    names = set().union(*(_safetensors_names(f) for f in files))
    assert names == HF_NAMES - {"lm_head.weight"}
    if max_shard_bytes < 2**30:
        index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == names
        assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["tie_word_embeddings"] is True

    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager")
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    tokens = _tokens()
    torch.testing.assert_close(_logits(theirs, tokens), _logits(model, tokens), atol=1e-5, rtol=1e-5)


def test_tied_checkpoint_written_by_transformers_loads_tied_with_the_same_logits(tmp_path):
    config = _hf_config(rope_theta=10000.0, rope_scaling=LLAMA3_SCALING)
    config.tie_word_embeddings = True
    theirs = _transformers_model(config)
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    theirs.save_pretrained(tmp_path / "hf")
    assert "lm_head.weight" not in _safetensors_names(tmp_path / "hf" / "model.safetensors")

    ours = load_pretrained(tmp_path / "hf")
    assert ours.config == TIED
    assert ours.output.weight is ours.tok_embeddings.weight
    tokens = _tokens()
    torch.testing.assert_close(_logits(ours, tokens), _logits(theirs, tokens), atol=1e-5, rtol=1e-5)


def test_tied_checkpoint_loads_into_a_materialised_model_and_exports_the_bytes_of_save_pretrained(tmp_path):
    model = _model(TIED)
    save_pretrained(model, tmp_path / "reference")
    empty = _empty(TIED)
    load_sharded(empty, tmp_path / "reference")
    assert empty.output.weight is empty.tok_embeddings.weight
    assert torch.equal(empty.tok_embeddings.weight, model.tok_embeddings.weight)

    save_sharded(empty, tmp_path / "export")
    assert "lm_head.weight" not in _safetensors_names(tmp_path / "export" / "model.safetensors")
    _assert_byte_identical(_tensors(tmp_path / "export"), _tensors(tmp_path / "reference"))


def test_meta_checkpoint_without_output_weight_reads_as_tied(tmp_path):
    twin = _model(META_TWIN.replace(tie_word_embeddings=True))
    state = _meta_state(twin)
    del state["output.weight"]  # Llama 3.2's consolidated.00.pth holds the table once
    _write_meta(tmp_path / "meta", state)

    loaded = load_pretrained(tmp_path / "meta")
    assert loaded.config.tie_word_embeddings
    assert loaded.output.weight is loaded.tok_embeddings.weight
    tokens = _tokens()
    torch.testing.assert_close(_logits(loaded, tokens), _logits(twin, tokens), atol=1e-6, rtol=1e-6)


def test_lora_on_a_tied_model_adapts_only_the_blocks_and_its_merged_export_stays_tied(tmp_path):
    model = apply_lora(_model(TIED), rank=4, dropout=0.0)
    assert model.output.weight is model.tok_embeddings.weight
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2 and all(".lora_" in name for name in trainable)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # a non-zero update, so the merge has something to fold in
    tokens = _tokens()
    adapted = _logits(model, tokens)

    save_pretrained(merge_lora(model), tmp_path / "merged")
    assert "lm_head.weight" not in _safetensors_names(tmp_path / "merged" / "model.safetensors")
    merged = load_pretrained(tmp_path / "merged")
    assert merged.output.weight is merged.tok_embeddings.weight
    torch.testing.assert_close(_logits(merged, tokens), adapted, atol=1e-5, rtol=1e-5)


# Llama 3.2 presets ------------------------------------------------------------------------------------------

# Published parameter counts, the tied table counted once.
LLAMA32 = {
    "llama3.2-1b": (2048, 16, 32, 64, 1_235_814_400),
    "llama3.2-3b": (3072, 28, 24, 128, 3_212_749_824),
}


@pytest.mark.parametrize("name", sorted(LLAMA32))
def test_llama32_presets_have_the_published_shape_and_parameter_count(name):
    dim, layers, heads, head_dim, count = LLAMA32[name]
    config = LlamaConfig.preset(name)
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads) == (dim, layers, heads, 8)
    assert config.attention_head_dim == head_dim and config.tie_word_embeddings
    assert config.rope_scaling == RopeScaling(
        factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
    assert (config.rope_theta, config.vocab_size, config.max_seq_len) == (500000.0, 128256, 131072)
    with torch.device("meta"):
        model = Llama(config)
    assert model.output.weight is model.tok_embeddings.weight
    assert meta_parameters(name) == (count, count)

    hf = config.to_hf()
    assert (hf["intermediate_size"], hf["head_dim"], hf["tie_word_embeddings"]) == (8192, head_dim, True)
    assert hf["rope_scaling"]["factor"] == 32.0
    assert LlamaConfig.from_hf(hf) == config


def test_planner_and_flop_count_count_the_tied_table_once():
    count = LLAMA32["llama3.2-1b"][-1]
    result = plan("llama3.2-1b", nodes=1)
    assert result.parameters == count
    # float32 master, gradient and two AdamW states over 8 GPUs, plus the 4 GiB overhead.
    assert result.gpu_phases["optimizer step"] == pytest.approx(16 * count / 8 + 4 * 2**30, rel=1e-9)
    # 6 N per token with N excluding the embedding table (which the tied head is), plus attention.
    table = 128256 * 2048
    expected = 6 * (count - table) * 100 + 12 * 16 * 2048 * 100**2
    assert training_flops(LlamaConfig.preset("llama3.2-1b"), [100]) == expected


# RoPE variants against transformers ---------------------------------------------------------------------

# head_dim 32 on a 64-wide model with 4 heads (q is 64 -> 128), theta 10000; the 64-token inputs reach past
# the llama3 scaling's 32-token original context, so its three frequency regimes all occur.
ROPE_VARIANTS = {
    "default": (None, None),
    "linear": (LinearRopeScaling(factor=4.0), {"rope_type": "linear", "factor": 4.0}),
    "llama3": (SMALL.rope_scaling, LLAMA3_SCALING),
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_variant_gives_the_logits_of_transformers_both_ways(tmp_path, variant):
    ours_scaling, theirs_scaling = ROPE_VARIANTS[variant]
    config = SMALL.replace(head_dim=32, rope_scaling=ours_scaling)
    tokens = _tokens()

    theirs = _transformers_model(_hf_config(head_dim=32, rope_theta=10000.0, rope_scaling=theirs_scaling))
    theirs.save_pretrained(tmp_path / "theirs")
    from_theirs = load_pretrained(tmp_path / "theirs")
    assert from_theirs.config == config
    torch.testing.assert_close(_logits(from_theirs, tokens), _logits(theirs, tokens), atol=1e-5, rtol=1e-5)

    ours = _model(config)
    save_pretrained(ours, tmp_path / "ours")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    torch.testing.assert_close(_logits(loaded, tokens), _logits(ours, tokens), atol=1e-5, rtol=1e-5)


_SHAPE = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def test_rope_settings_are_read_from_both_config_generations_and_written_in_the_4x_form():
    expected = SMALL.replace(head_dim=32, rope_theta=20000.0, rope_scaling=LinearRopeScaling(factor=2.0))
    v5 = {**_SHAPE, "rope_parameters": {"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0}}
    v4 = {**_SHAPE, "rope_theta": 20000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    v4_old_key = {**_SHAPE, "rope_theta": 20000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert LlamaConfig.from_hf(v5) == LlamaConfig.from_hf(v4) == LlamaConfig.from_hf(v4_old_key) == expected
    plain = {**_SHAPE, "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}}
    assert LlamaConfig.from_hf(plain) == expected.replace(rope_scaling=None)

    written = expected.to_hf()
    assert written["rope_theta"] == 20000.0 and "rope_parameters" not in written
    assert written["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"rope_theta": 10000.0, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        (
            {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
            "rope_parameters",
        ),
    ],
)
def test_unknown_rope_type_names_the_key_and_the_supported_types(settings, key):
    with pytest.raises(ValueError, match=rf"{key} has rope_type '\w+'.*'default', 'linear', 'llama3'"):
        LlamaConfig.from_hf({**_SHAPE, **settings})


# Tied embeddings on a mesh: two gloo processes --------------------------------------------------------------

STEPS = 3


def _train(model: torch.nn.Module, rows: slice, steps: int = STEPS) -> list[torch.Tensor]:
    """AdamW steps on `rows` of the batch; each step's loss is this rank's summed negative log-likelihood
    over the whole batch's labelled-token count (FSDP sums the ranks' gradients)."""
    from hermes.parallel.tensor_parallel import loss_context

    tokens, labels = _batch()
    count = int((labels != IGNORE_INDEX).sum())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        with loss_context(model):
            loss = -model(tokens[rows], labels=labels[rows]).sum() / count
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def _tied_on_mesh(rank: int, world: int, out) -> None:
    """The tied model under FSDP over both ranks (each with half the rows), then under TP over both (every
    rank with all rows), each built on meta, sharded and initialised as one process would."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from hermes.parallel.fsdp import apply_fsdp
    from hermes.parallel.materialize import draws_as_one_process
    from hermes.parallel.tensor_parallel import apply_tensor_parallel

    results = {}
    for layout in ("fsdp", "tp"):
        with torch.device("meta"):
            model = Llama(TIED)
        if layout == "tp":
            mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
            apply_tensor_parallel(model, mesh["tp"])
            apply_fsdp(model, mesh["dp"])
            rows = slice(None)
        else:
            apply_fsdp(model, init_device_mesh("cpu", (world,)))
            half = _batch()[0].shape[0] // world
            rows = slice(rank * half, (rank + 1) * half)
        model.to_empty(device="cpu")
        torch.manual_seed(7)
        with draws_as_one_process():
            model.init_weights()
        weights = {name: t.full_tensor().clone() for name, t in model.state_dict().items()}
        losses = torch.stack(_train(model, rows))
        if layout == "fsdp":
            dist.all_reduce(losses)  # each rank's share of the global mean
        results[layout] = {
            "weights": weights,
            "losses": losses,
            "tied": model.output.weight is model.tok_embeddings.weight,
        }
    if rank == 0:
        torch.save(results, out)


@pytest.mark.slow
def test_tied_model_under_fsdp_and_tensor_parallel_gives_the_losses_of_one_process(tmp_path):
    reference = _initialised_on_meta(TIED, seed=7)
    initial = {name: t.clone() for name, t in reference.state_dict().items()}
    expected = torch.stack(_train(reference, slice(None)))

    start_gloo_processes(_tied_on_mesh, 2, tmp_path / "out.pt")
    results = torch.load(tmp_path / "out.pt")
    for layout in ("fsdp", "tp"):
        got = results[layout]
        assert got["tied"], layout
        assert got["weights"].keys() == initial.keys()
        for name, tensor in initial.items():
            assert torch.equal(got["weights"][name], tensor), (layout, name)
        torch.testing.assert_close(got["losses"], expected, atol=1e-5, rtol=1e-5, msg=layout)
    assert expected[-1] < expected[0]
