import copy
import json
import math

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from hermes.model import Llama, LlamaConfig
from hermes.model.hf import load_pretrained, save_pretrained
from hermes.model.lora import (
    LoRALinear,
    adapter_disabled,
    apply_lora,
    init_lora_weights,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
)

SMALL = LlamaConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=256,
    hidden_dim=128,
    max_seq_len=128,
    bos_token_id=1,
    eos_token_id=2,
)

# hermes module -> Hugging Face module, per block, written out from the Llama naming table.
PROJECTIONS = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}


def _model(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(SMALL)


def _tokens() -> torch.Tensor:
    return torch.randint(0, SMALL.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return (out.logits if hasattr(out, "logits") else out).float()


@torch.no_grad()
def _randomise_lora_b(model: nn.Module, seed: int = 2) -> None:
    """B starts at zero, which hides every mistake in the adapter path: make it non-zero."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def _adapted_modules(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def _naive_lora(x, weight, a, b, scale):
    return x @ weight.T + scale * (x @ a.T) @ b.T


# The layer ------------------------------------------------------------------------------------------------


def test_lora_linear_computes_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 48, bias=False), rank=32, alpha=16.0, dropout=0.05).eval()
    _randomise_lora_b(layer)
    x = torch.randn(3, 5, 64)
    # The paper's r 32, alpha 16: the update is scaled by 16 / 32 = 0.5.
    expected = _naive_lora(x, layer.base.weight, layer.lora_A.weight, layer.lora_B.weight, 0.5)
    torch.testing.assert_close(layer(x), expected)
    assert layer.lora_A.weight.shape == (32, 64) and layer.lora_B.weight.shape == (48, 32)


def test_a_starts_kaiming_uniform_and_b_at_zero():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 48, bias=False), rank=32, alpha=16.0, dropout=0.0)
    a = layer.lora_A.weight
    # kaiming_uniform(a=sqrt(5)): bound = sqrt(6 / ((1 + 5) * fan_in)) = 1 / sqrt(64).
    bound = 1 / 8
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert math.isclose(a.std().item(), bound / math.sqrt(3), rel_tol=0.08)
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_dropout_acts_on_the_adapter_input_in_training_and_not_in_eval():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 48, bias=False), rank=8, alpha=16.0, dropout=0.3)
    _randomise_lora_b(layer)
    w, a, b = layer.base.weight, layer.lora_A.weight, layer.lora_B.weight
    x = torch.randn(4, 64)

    layer.train()
    torch.manual_seed(7)
    first = layer(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.3, training=True)
    torch.testing.assert_close(first, x @ w.T + 2.0 * (dropped @ a.T) @ b.T)
    assert not torch.allclose(layer(x), first)

    layer.eval()
    plain = _naive_lora(x, w, a, b, 2.0)
    torch.testing.assert_close(layer(x), plain)
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be a positive integer, got 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_rank_or_dropout_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRALinear(nn.Linear(8, 8), **{"rank": 4, "alpha": 8.0, "dropout": 0.0, **kwargs})


# Applying to the model --------------------------------------------------------------------------------------


def test_adapted_model_starts_equal_to_the_base_model():
    base = _model()
    model = apply_lora(copy.deepcopy(base))
    tokens = _tokens()
    assert torch.equal(_logits(model.train(), tokens), _logits(base.train(), tokens))


def test_all_linear_adapts_the_seven_block_projections_never_the_head():
    model = apply_lora(_model())
    assert _adapted_modules(model) == {f"layers.{i}.{m}" for i in range(2) for m in PROJECTIONS}
    assert not isinstance(model.output, LoRALinear) and isinstance(model.output, nn.Linear)


@pytest.mark.parametrize(("ours", "theirs"), list(PROJECTIONS.items()))
def test_each_target_and_its_hugging_face_alias_adapt_the_same_projection(ours, theirs):
    expected = {f"layers.{i}.{ours}" for i in range(2)}
    assert _adapted_modules(apply_lora(_model(), targets=[ours.rpartition(".")[2]])) == expected
    assert _adapted_modules(apply_lora(_model(), targets=theirs.rpartition(".")[2])) == expected


def test_only_lora_parameters_train_and_base_weights_stay_bit_identical():
    model = apply_lora(_model())
    _randomise_lora_b(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"layers.{i}.{m}.lora_{ab}.weight" for i in range(2) for m in PROJECTIONS for ab in "AB"
    }
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    lora = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = _tokens()
    for _ in range(2):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    params = dict(model.named_parameters())
    assert all(
        torch.equal(params[name], before) and params[name].grad is None for name, before in frozen.items()
    )
    assert all(not torch.equal(params[name], before) for name, before in lora.items())


def test_meta_built_model_initialises_base_through_init_weights_and_adapters_through_init_lora_weights():
    reference = Llama(SMALL)
    torch.manual_seed(0)
    reference.init_weights()
    with torch.device("meta"):
        model = Llama(SMALL)
    apply_lora(model)
    assert model.layers[0].attention.wq.lora_A.weight.is_meta
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    init_lora_weights(model)

    ours = model.state_dict()
    for name, tensor in reference.state_dict().items():
        adapted = name.replace(".weight", ".base.weight")
        assert torch.equal(ours.get(adapted, ours.get(name)), tensor), name
    assert all(torch.count_nonzero(t) == 0 for n, t in ours.items() if "lora_B" in n)
    assert all(0 < t.abs().max() <= 1 / 8 for n, t in ours.items() if "lora_A" in n and "w2" not in n)
    tokens = _tokens()
    assert torch.equal(_logits(model, tokens), _logits(reference, tokens))


# Adapter off, merge ---------------------------------------------------------------------------------------


def test_adapter_disabled_computes_exactly_the_base_model_and_restores_on_exit():
    base = _model().eval()
    model = apply_lora(copy.deepcopy(base)).eval()
    _randomise_lora_b(model)
    tokens = _tokens()
    adapted, plain = _logits(model, tokens), _logits(base, tokens)
    assert not torch.allclose(adapted, plain, atol=1e-3)

    with adapter_disabled(model):
        assert torch.equal(_logits(model, tokens), plain)
    assert torch.equal(_logits(model, tokens), adapted)

    with pytest.raises(RuntimeError, match="inside"), adapter_disabled(model):
        raise RuntimeError("inside")
    assert torch.equal(_logits(model, tokens), adapted)


def test_adapter_disabled_refuses_a_model_without_lora():
    with pytest.raises(ValueError, match="no LoRA layers; apply_lora"), adapter_disabled(_model()):
        pass


def test_merged_model_is_a_plain_llama_with_the_adapted_function():
    base_names = list(_model().state_dict())
    model = apply_lora(_model()).eval()
    _randomise_lora_b(model)
    wq = model.layers[1].attention.wq
    expected_wq = wq.base.weight + 0.5 * wq.lora_B.weight @ wq.lora_A.weight
    tokens = _tokens()
    adapted = _logits(model, tokens)

    merged = merge_lora(model)
    assert not _adapted_modules(merged) and type(merged.layers[1].attention.wq) is nn.Linear
    assert list(merged.state_dict()) == base_names
    torch.testing.assert_close(merged.layers[1].attention.wq.weight, expected_wq, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_logits(merged, tokens), adapted, atol=1e-5, rtol=1e-5)


def test_merged_model_exports_with_save_pretrained(tmp_path):
    model = apply_lora(_model()).eval()
    _randomise_lora_b(model)
    tokens = _tokens()
    adapted = _logits(model, tokens)
    save_pretrained(merge_lora(model), tmp_path / "merged")
    torch.testing.assert_close(
        _logits(load_pretrained(tmp_path / "merged"), tokens), adapted, atol=1e-5, rtol=1e-5
    )


# PEFT interop ---------------------------------------------------------------------------------------------


def test_saved_adapter_has_peft_layout_and_loads_in_peft_with_the_same_logits(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "base")
    apply_lora(model, rank=32, alpha=16.0, dropout=0.05)
    _randomise_lora_b(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "bias", "task_type")} == {
        "peft_type": "LORA",
        "r": 32,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    assert sorted(config["target_modules"]) == sorted(hf.rpartition(".")[2] for hf in PROJECTIONS.values())
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert keys == {
        f"base_model.model.model.layers.{i}.{hf}.lora_{ab}.weight"
        for i in range(2)
        for hf in PROJECTIONS.values()
        for ab in "AB"
    }

    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(theirs, tmp_path / "adapter").eval()
    tokens = _tokens()
    torch.testing.assert_close(_logits(theirs, tokens), _logits(model.eval(), tokens), atol=1e-5, rtol=1e-5)


def test_adapter_saved_by_peft_loads_with_the_same_logits(tmp_path):
    save_pretrained(_model(), tmp_path / "base")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    lora = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj", "gate_proj"],
        task_type="CAUSAL_LM",
    )
    theirs = peft.get_peft_model(theirs, lora)
    _randomise_lora_b(theirs)
    theirs.save_pretrained(tmp_path / "adapter")

    ours = load_adapter(load_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert _adapted_modules(ours) == {
        f"layers.{i}.{m}" for i in range(2) for m in ("attention.wq", "attention.wv", "feed_forward.w1")
    }
    assert ours.layers[0].attention.wq.lora_dropout.p == 0.1
    tokens = _tokens()
    torch.testing.assert_close(
        _logits(ours.eval(), tokens), _logits(theirs.eval(), tokens), atol=1e-5, rtol=1e-5
    )


def test_adapter_round_trips_into_an_already_adapted_model(tmp_path):
    model = apply_lora(_model())
    _randomise_lora_b(model)
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(apply_lora(_model()), tmp_path / "adapter")
    expected = lora_state_dict(model)
    assert all(torch.equal(t, expected[name]) for name, t in lora_state_dict(fresh).items())


def test_fsdp_sharded_adapters_are_gathered_on_save_and_scattered_on_load(tmp_path):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = apply_lora(_model())
    _randomise_lora_b(model)
    expected = {name: t.clone() for name, t in lora_state_dict(model).items()}
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        for shardable in [*model.layers, model]:
            fully_shard(shardable)
        assert isinstance(model.layers[0].attention.wq.lora_B.weight, DTensor)
        save_adapter(model, tmp_path / "adapter")

        fresh = apply_lora(_model(seed=5))
        for shardable in [*fresh.layers, fresh]:
            fully_shard(shardable)
        load_adapter(fresh, tmp_path / "adapter")
        loaded = {name: t.full_tensor() for name, t in lora_state_dict(fresh).items()}
        with pytest.raises(ValueError, match=r"layers\.0\.attention\.wq\.base\.weight is sharded"):
            merge_lora(fresh)
    finally:
        torch.distributed.destroy_process_group()
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert torch.equal(
        saved["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"],
        expected["layers.1.feed_forward.w3.lora_B.weight"],
    )
    assert all(torch.equal(loaded[name], t) for name, t in expected.items())


# Bad input ------------------------------------------------------------------------------------------------


def test_unknown_target_name_lists_the_valid_names():
    with pytest.raises(
        ValueError, match=r"unknown LoRA target \['lm_head'\]; valid names: all-linear, wq, wk, wv"
    ):
        apply_lora(_model(), targets=["q_proj", "lm_head"])


def test_applying_lora_twice_is_refused():
    model = apply_lora(_model())
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model)


def _saved_adapter(tmp_path):
    model = apply_lora(_model())
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def test_missing_adapter_files_are_named(tmp_path):
    directory = _saved_adapter(tmp_path)
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"adapter_model\.safetensors is missing: it holds the adapter's tensors; copy it",
    ):
        load_adapter(_model(), directory)
    (directory / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json is missing"):
        load_adapter(_model(), directory)


def test_wrong_shape_missing_and_unexpected_tensors_are_named_with_the_file(tmp_path):
    directory = _saved_adapter(tmp_path)
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    prefix = "base_model.model.model.layers"
    tensors[f"{prefix}.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(16, 64)
    del tensors[f"{prefix}.1.mlp.up_proj.lora_B.weight"]
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(32, 64)
    save_file(tensors, path)
    with pytest.raises(ValueError) as error:
        load_adapter(_model(), directory)
    message = str(error.value)
    assert "3 problems" in message
    assert (
        f"{prefix}.0.self_attn.q_proj.lora_A.weight in adapter_model.safetensors has shape (16, 64), expected (32, 64)"
        in message
    )
    assert (
        f"{prefix}.1.mlp.up_proj.lora_B.weight is missing (expected shape (128, 32)): adapter_model.safetensors holds no such tensor"
        in message
    )
    assert (
        "base_model.model.lm_head.lora_A.weight in adapter_model.safetensors (shape (32, 64)) is not a weight"
        in message
    )


def test_unsupported_peft_feature_in_the_config_is_named(tmp_path):
    directory = _saved_adapter(tmp_path)
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_rslora": True}))
    with pytest.raises(ValueError, match=r"adapter_config\.json sets use_rslora = True"):
        load_adapter(_model(), directory)
    config_path.write_text(json.dumps({**config, "target_modules": ["q_proj", "lm_head"]}))
    with pytest.raises(ValueError, match=r"adapter_config\.json: unknown LoRA target \['lm_head'\]"):
        load_adapter(_model(), directory)


def test_adapter_of_another_rank_than_the_models_lora_is_named(tmp_path):
    directory = _saved_adapter(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"says r = 32, lora_alpha = 16, but the model's LoRA layers have \(r, alpha\) \[\(8, 16\.0\)\]",
    ):
        load_adapter(apply_lora(_model(), rank=8), directory)
