import json
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from hermes.model import Llama, LlamaConfig, RopeScaling
from hermes.model import hf as hf_format
from hermes.model.hf import hermes_name, hf_name, load_pretrained, save_pretrained

# GQA (4 query heads on 2 kv heads) and llama3 RoPE scaling with a 32-token original context: with theta
# 10000 and head_dim 16, the frequencies fall in all three regimes (kept, divided, smoothed), and the
# 64-token inputs below reach past the original context.
SMALL = LlamaConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=256,
    hidden_dim=128,
    rope_theta=10000.0,
    rope_scaling=RopeScaling(
        factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
    ),
    max_seq_len=128,
    bos_token_id=1,
    eos_token_id=2,
)
SEQ = 64

# Hugging Face names of SMALL's tensors, written out from the table of Meta <-> Hugging Face names.
HF_NAMES = {
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    *(
        f"model.layers.{i}.{module}.weight"
        for i in range(2)
        for module in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.down_proj",
            "mlp.up_proj",
            "input_layernorm",
            "post_attention_layernorm",
        )
    ),
}


def _randomise_norms(model: nn.Module) -> None:
    """Norm weights start at one; make them distinct so a swapped norm name changes the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)


def _model(config: LlamaConfig = SMALL, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(config)
    _randomise_norms(model)
    return model


def _tokens(vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return (out.logits if hasattr(out, "logits") else out).float()


# Names ---------------------------------------------------------------------------------------------------


def test_names_map_to_the_hugging_face_table_and_back():
    ours = list(_model().state_dict())
    assert {hf_name(name) for name in ours} == HF_NAMES
    assert [hermes_name(hf_name(name)) for name in ours] == ours
    assert hf_name("layers.1.feed_forward.w2.weight") == "model.layers.1.mlp.down_proj.weight"
    assert hermes_name("model.layers.0.post_attention_layernorm.weight") == "layers.0.ffn_norm.weight"
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_norm\.weight' is not a Hugging"):
        hermes_name("model.layers.0.self_attn.q_norm.weight")


def test_state_dict_renaming_round_trips_and_drops_rope_buffers():
    state = _model().state_dict()
    renamed = hf_format.hf_state_dict(state)
    assert set(renamed) == HF_NAMES and renamed["lm_head.weight"] is state["output.weight"]
    inv_freq = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    assert hf_format.from_hf_state_dict({**renamed, **inv_freq}).keys() == state.keys()


def test_meta_qk_permutation_moves_interleaved_pairs_to_halves():
    # One head, head_dim 4, width 1: Meta rows are pairs (x0, y0, x1, y1); rotating halves wants (x0, x1, y0, y1).
    meta = torch.tensor([[10.0], [11.0], [20.0], [21.0]])
    assert hf_format.meta_qk_to_hf(meta, n_heads=1).flatten().tolist() == [10.0, 20.0, 11.0, 21.0]


# Hugging Face layout against transformers ---------------------------------------------------------------


def test_saved_shards_load_in_transformers_with_the_same_logits(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=100_000)

    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert "model.safetensors" not in files and "config.json" in files
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == HF_NAMES and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    for shard in shards:
        assert (tmp_path / "ckpt" / shard).stat().st_size < 100_000 + 4096  # payload cap + header

    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager")
    assert set(theirs.state_dict()) == HF_NAMES
    tokens = _tokens()
    torch.testing.assert_close(_logits(theirs, tokens), _logits(model, tokens), atol=1e-5, rtol=1e-5)


def _hf_config(**rope) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        **rope,
    )


@pytest.mark.parametrize("max_shard_size", ["5GB", "100KB"], ids=["single-file", "sharded"])
def test_checkpoint_written_by_transformers_loads_with_the_same_logits(tmp_path, max_shard_size):
    rope_scaling = {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(_hf_config(rope_theta=10000.0, rope_scaling=rope_scaling))
    theirs.config._attn_implementation = "eager"
    _randomise_norms(theirs)
    theirs.save_pretrained(tmp_path / "hf", max_shard_size=max_shard_size)
    is_sharded = (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert is_sharded == (max_shard_size == "100KB")

    ours = load_pretrained(tmp_path / "hf")
    assert ours.config == SMALL
    tokens = _tokens()
    torch.testing.assert_close(_logits(ours, tokens), _logits(theirs, tokens), atol=1e-5, rtol=1e-5)


def test_bfloat16_weights_stay_bfloat16_through_save_and_load(tmp_path):
    model = _model().to(torch.bfloat16)
    save_pretrained(model, tmp_path / "bf16")

    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(tmp_path / "bf16" / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    loaded = load_pretrained(tmp_path / "bf16")
    for (name, ours), theirs in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert theirs.dtype == torch.bfloat16 and torch.equal(theirs, ours), name
    upcast = load_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert torch.equal(upcast.output.weight, model.output.weight.float())
    assert all(p.requires_grad for p in loaded.parameters())


# Config generations ---------------------------------------------------------------------------------------

_COMMON = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_LLAMA3_ROPE = {
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def test_transformers_4_and_5_configs_read_to_the_same_llama_config():
    v4 = {**_COMMON, "rope_theta": 10000.0, "rope_scaling": {"rope_type": "llama3", **_LLAMA3_ROPE}}
    v5 = {**_COMMON, "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, **_LLAMA3_ROPE}}
    assert LlamaConfig.from_hf(v4) == LlamaConfig.from_hf(v5) == SMALL


def test_config_survives_to_hf_and_back():
    assert LlamaConfig.from_hf(SMALL.to_hf()) == SMALL
    plain = SMALL.replace(rope_scaling=None, eos_token_id=[2, 3])
    assert LlamaConfig.from_hf(plain.to_hf()) == plain


# Meta original layout ---------------------------------------------------------------------------------------

# Meta's params.json for SMALL's shape. FFN width by Meta's rule, worked by hand:
# int(2 * 4 * 64 / 3) = 170; int(0.75 * 170) = 127; rounded up to a multiple of 64 -> 128.
META_PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": -1,
    "multiple_of": 64,
    "ffn_dim_multiplier": 0.75,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
}
# What those params mean in hermes: Meta's scaled RoPE is Llama 3.1's (factor 8, original context 8192).
META_TWIN = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128)


def _interleave(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Halves layout (x_0..x_{d/2-1}, y_0..) -> Meta's interleaved pairs (x_0, y_0, x_1, y_1, ...)."""
    rows, dim = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def _meta_state(model: Llama) -> dict[str, torch.Tensor]:
    """The model's tensors as Meta stores them: same names, q/k rows interleaved."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("attention.wq.weight"):
            tensor = _interleave(tensor, 4)
        elif name.endswith("attention.wk.weight"):
            tensor = _interleave(tensor, 2)
        state[name] = tensor.clone()
    return state


def _split_dim(name: str, embedding_dim: int) -> int | None:
    """Model-parallel split of Meta's checkpoints: column-parallel on 0, row-parallel on 1, norms whole."""
    if "norm" in name:
        return None
    if name.startswith("tok_embeddings"):
        return embedding_dim
    return 1 if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else 0


def _write_meta(directory, state, embedding_dim=0, params=META_PARAMS, shards=2):
    directory.mkdir()
    (directory / "params.json").write_text(json.dumps(params))
    for rank in range(shards):
        part = {}
        for name, tensor in state.items():
            dim = _split_dim(name, embedding_dim)
            part[name] = tensor.clone() if dim is None else tensor.chunk(shards, dim=dim)[rank].clone()
        torch.save(part, directory / f"consolidated.{rank:02d}.pth")


@pytest.mark.parametrize(
    "embedding_dim", [0, 1], ids=["vocab-split-embedding-llama3", "width-split-embedding-llama2"]
)
def test_meta_shards_load_with_the_logits_of_their_hugging_face_twin(tmp_path, embedding_dim):
    twin = _model(META_TWIN)
    _write_meta(tmp_path / "meta", _meta_state(twin), embedding_dim)
    save_pretrained(twin, tmp_path / "hf")

    from_meta = load_pretrained(tmp_path / "meta")
    from_hf = load_pretrained(tmp_path / "hf")
    assert from_meta.config == META_TWIN
    tokens = _tokens()
    torch.testing.assert_close(_logits(from_meta, tokens), _logits(from_hf, tokens), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_logits(from_meta, tokens), _logits(twin, tokens), atol=1e-6, rtol=1e-6)


class _ColumnParallelLinear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, **_):
        super().__init__(in_features, out_features, bias=bias)


class _Embedding(nn.Embedding):
    def __init__(self, num_embeddings, embedding_dim, **_):
        super().__init__(num_embeddings, embedding_dim)


@pytest.fixture
def meta_reference(monkeypatch):
    """Meta's own llama3 model code, run on one CPU process: fairscale's model-parallel layers are stood
    in for by their single-process equivalents (Linear, Embedding, world size 1)."""
    initialize = types.SimpleNamespace(get_model_parallel_world_size=lambda: 1)
    layers = types.SimpleNamespace(
        ColumnParallelLinear=_ColumnParallelLinear,
        RowParallelLinear=_ColumnParallelLinear,
        VocabParallelEmbedding=_Embedding,
    )
    fake = {
        "fairscale": types.ModuleType("fairscale"),
        "fairscale.nn": types.ModuleType("fairscale.nn"),
        "fairscale.nn.model_parallel": types.SimpleNamespace(initialize=initialize, layers=layers),
        "fairscale.nn.model_parallel.initialize": initialize,
        "fairscale.nn.model_parallel.layers": layers,
    }
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "llama_models.llama3.model", raising=False)
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    def build(params: dict, vocab_size: int, state: dict) -> nn.Module:
        args = ModelArgs(**{**params, "vocab_size": vocab_size, "max_seq_len": SEQ, "max_batch_size": 2})
        model = Transformer(args)
        model.load_state_dict(state)
        return model.eval()

    yield build
    sys.modules.pop("llama_models.llama3.model", None)


def test_meta_checkpoint_gives_the_logits_of_metas_reference_model(tmp_path, meta_reference):
    twin = _model(META_TWIN)
    state = _meta_state(twin)
    _write_meta(tmp_path / "meta", state)
    reference = meta_reference(META_PARAMS, 256, state)

    tokens = _tokens()
    with torch.inference_mode():
        expected = reference(tokens, start_pos=0)
    torch.testing.assert_close(
        _logits(load_pretrained(tmp_path / "meta"), tokens), expected, atol=1e-5, rtol=1e-5
    )


# Saving into place ----------------------------------------------------------------------------------------


def test_save_into_an_existing_directory_replaces_old_weights_and_keeps_other_files(tmp_path):
    target = tmp_path / "export"
    save_pretrained(_model(seed=1), target, max_shard_bytes=100_000)
    (target / "tokenizer.json").write_text("{}")
    model = _model(seed=2)
    save_pretrained(model, target)

    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert torch.equal(load_pretrained(target).output.weight, model.output.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging directory left


def test_interrupted_save_leaves_no_directory_that_looks_complete(tmp_path, monkeypatch):
    written = []

    def failing_save_file(tensors, path, metadata=None):
        if written:
            raise OSError("disk full")
        written.append(path)
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf_format, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(_model(), tmp_path / "export", max_shard_bytes=100_000)
    assert written and list(tmp_path.iterdir()) == []


def test_fsdp_sharded_parameters_are_gathered_when_saved(tmp_path):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = _model()
        expected = {name: t.clone() for name, t in model.state_dict().items()}
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        assert isinstance(model.output.weight, DTensor)
        save_pretrained(model, tmp_path / "fsdp")
    finally:
        torch.distributed.destroy_process_group()
    loaded = load_pretrained(tmp_path / "fsdp").state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())


# Bad input --------------------------------------------------------------------------------------------------


def write_mismatched_checkpoint(directory: Path, unexpected: dict[str, torch.Tensor] | None = None) -> None:
    """A checkpoint of `_model()` whose q_proj of block 0 is (60, 64) instead of (64, 64), whose up_proj of
    block 1 is missing, and that holds the `unexpected` tensors too."""
    save_pretrained(_model(), directory)
    path = directory / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(60, 64)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file({**tensors, **(unexpected or {})}, path)


def test_wrong_shape_missing_and_unexpected_tensors_are_all_named_with_shapes_and_file(tmp_path):
    unexpected = {
        "model.layers.0.self_attn.q_norm.weight": torch.zeros(16),
        "model.layers.2.mlp.gate_proj.weight": torch.zeros(128, 64),
    }
    write_mismatched_checkpoint(tmp_path / "ckpt", unexpected)

    with pytest.raises(ValueError) as err:
        load_pretrained(tmp_path / "ckpt")
    message = str(err.value)
    assert "does not match the model its config describes (4 problems)" in message
    assert (
        "model.layers.0.self_attn.q_proj.weight in model.safetensors has shape (60, 64), expected (64, 64)"
        in message
    )
    assert (
        "model.layers.1.mlp.up_proj.weight is missing (expected shape (128, 64)): "
        "model.safetensors holds no such tensor" in message
    )
    assert (
        "model.layers.0.self_attn.q_norm.weight in model.safetensors (shape (16,)) is not a weight of this model"
        in message
    )
    assert (
        "model.layers.2.mlp.gate_proj.weight in model.safetensors (shape (128, 64)) is not a weight"
        in message
    )


def test_index_entry_pointing_at_a_shard_without_the_tensor_is_named(tmp_path):
    save_pretrained(_model(), tmp_path / "ckpt", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    wrong_file = index["weight_map"]["model.embed_tokens.weight"]
    index["weight_map"]["lm_head.weight"] = wrong_file
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps(index))

    with pytest.raises(
        ValueError,
        match=rf"lm_head\.weight is missing \(expected shape \(256, 64\)\): {wrong_file} does not hold it, "
        r"though model\.safetensors\.index\.json lists it there",
    ):
        load_pretrained(tmp_path / "ckpt")


def test_shard_missing_from_disk_is_named(tmp_path):
    save_pretrained(_model(), tmp_path / "ckpt", max_shard_bytes=100_000)
    second = sorted((tmp_path / "ckpt").glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    with pytest.raises(FileNotFoundError, match=rf"lists shard files that are missing .*: {second.name}; "):
        load_pretrained(tmp_path / "ckpt")


def test_truncated_safetensors_file_is_named(tmp_path):
    save_pretrained(_model(), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(
        ValueError, match=r"model\.safetensors is not a readable safetensors file .*truncated"
    ):
        load_pretrained(tmp_path / "ckpt")


def test_missing_config_json_is_named(tmp_path):
    save_pretrained(_model(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt/config\.json is missing: a Hugging Face checkpoint"):
        load_pretrained(tmp_path / "ckpt")


def test_directory_of_neither_layout_says_what_is_expected(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"neither a Hugging Face checkpoint .* nor a Meta original"):
        load_pretrained(tmp_path)


def test_meta_checkpoint_without_params_json_is_named(tmp_path):
    _write_meta(tmp_path / "meta", _meta_state(_model(META_TWIN)))
    (tmp_path / "meta" / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"meta/params\.json is missing: a Meta checkpoint"):
        load_pretrained(tmp_path / "meta")


def test_meta_tensor_of_wrong_shape_names_the_shard_files(tmp_path):
    params = {**META_PARAMS, "ffn_dim_multiplier": 1.0}  # says 192 wide; the weights are 128
    _write_meta(tmp_path / "meta", _meta_state(_model(META_TWIN)), params=params)
    with pytest.raises(ValueError) as err:
        load_pretrained(tmp_path / "meta")
    assert (
        "layers.0.feed_forward.w1.weight in consolidated.00.pth, consolidated.01.pth has shape (128, 64), "
        "expected (192, 64)" in str(err.value)
    )


def test_meta_tensor_absent_from_one_shard_is_named(tmp_path):
    _write_meta(tmp_path / "meta", _meta_state(_model(META_TWIN)))
    part = torch.load(tmp_path / "meta" / "consolidated.01.pth", weights_only=True)
    del part["layers.1.attention.wv.weight"]
    torch.save(part, tmp_path / "meta" / "consolidated.01.pth")
    with pytest.raises(
        ValueError,
        match=r"layers\.1\.attention\.wv\.weight is in consolidated\.00\.pth but not in every shard",
    ):
        load_pretrained(tmp_path / "meta")
