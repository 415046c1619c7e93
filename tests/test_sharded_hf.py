"""Hugging Face checkpoints read straight into shards and written from them (hermes.parallel.sharded_hf),
and the sharded model build of hermes.train.build: compared with one unsharded process."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hermes.model import Llama, LlamaConfig
from hermes.model.hf import load_pretrained, save_pretrained
from hermes.model.lora import apply_lora, init_lora_weights
from hermes.parallel.materialize import plain_name
from hermes.parallel.sharded_hf import load_sharded, save_sharded
from tests.launching import TORCHRUN, run_command
from tests.test_hf import SMALL, _model, write_mismatched_checkpoint


def _empty(config: LlamaConfig = SMALL) -> Llama:
    """A model built on the meta device and materialised, as the sharded build does (without the mesh)."""
    with torch.device("meta"):
        model = Llama(config)
    return model.to_empty(device="cpu")


def _tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory (single file or shards), by Hugging Face name."""
    return {
        name: t for path in sorted(directory.glob("*.safetensors")) for name, t in load_file(path).items()
    }


def _assert_byte_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert got[name].contiguous().view(torch.uint8).equal(tensor.contiguous().view(torch.uint8)), name


def test_lora_base_weights_take_the_plain_models_names():
    assert plain_name("layers.3.attention.wq.base.weight") == "layers.3.attention.wq.weight"
    assert plain_name("layers.3.feed_forward.w2.weight") == "layers.3.feed_forward.w2.weight"
    assert plain_name("output.weight") == "output.weight"


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 100_000], ids=["one-file", "shards"])
def test_unsharded_load_converts_to_the_models_dtype_like_load_pretrained(tmp_path, max_shard_bytes):
    save_pretrained(_model().to(torch.bfloat16), tmp_path / "ckpt", max_shard_bytes=max_shard_bytes)
    model = _empty()
    load_sharded(model, tmp_path / "ckpt")
    expected = load_pretrained(tmp_path / "ckpt", dtype=torch.float32).state_dict()
    _assert_byte_identical(model.state_dict(), expected)


def test_a_lora_models_base_weights_load_and_its_adapters_are_left_alone(tmp_path):
    save_pretrained(_model(), tmp_path / "ckpt")
    model = apply_lora(_empty(), rank=4, targets=["wq", "w2"])
    torch.manual_seed(1)
    init_lora_weights(model)
    adapters = {n: t.clone() for n, t in model.state_dict().items() if "lora_" in n}
    load_sharded(model, tmp_path / "ckpt")
    state = model.state_dict()
    reference = load_pretrained(tmp_path / "ckpt").state_dict()
    assert torch.equal(state["layers.1.attention.wq.base.weight"], reference["layers.1.attention.wq.weight"])
    assert torch.equal(
        state["layers.0.feed_forward.w2.base.weight"], reference["layers.0.feed_forward.w2.weight"]
    )
    assert torch.equal(state["layers.0.feed_forward.w1.weight"], reference["layers.0.feed_forward.w1.weight"])
    assert all(torch.equal(state[n], t) for n, t in adapters.items())


def test_shape_mismatches_and_missing_tensors_are_named_before_any_weight_is_read(tmp_path):
    write_mismatched_checkpoint(tmp_path / "ckpt")
    model = _empty()
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(7.0)

    with pytest.raises(ValueError) as err:
        load_sharded(model, tmp_path / "ckpt")
    message = str(err.value)
    assert "(2 problems)" in message
    assert (
        "model.layers.0.self_attn.q_proj.weight in model.safetensors has shape (60, 64), expected (64, 64)"
        in message
    )
    assert (
        "model.layers.1.mlp.up_proj.weight is missing (expected shape (128, 64)): "
        "model.safetensors holds no such tensor" in message
    )
    assert all(bool((param == 7.0).all()) for param in model.parameters())  # nothing was read


def test_a_shard_missing_from_disk_is_named(tmp_path):
    save_pretrained(_model(), tmp_path / "ckpt", max_shard_bytes=100_000)
    shard = sorted((tmp_path / "ckpt").glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_sharded(_empty(), tmp_path / "ckpt")


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 100_000], ids=["one-file", "shards"])
def test_unsharded_export_has_the_files_and_bytes_of_save_pretrained(tmp_path, max_shard_bytes):
    model = _model().to(torch.bfloat16)
    save_pretrained(model, tmp_path / "reference", max_shard_bytes=max_shard_bytes)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "tokenizer.json").write_text("{}")
    save_sharded(model, tmp_path / "export", max_shard_bytes=max_shard_bytes)

    reference_files = sorted(p.name for p in (tmp_path / "reference").iterdir())
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == sorted(
        [*reference_files, "tokenizer.json"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "reference"]  # no staging left behind
    _assert_byte_identical(_tensors(tmp_path / "export"), _tensors(tmp_path / "reference"))
    for name in ("config.json", "model.safetensors.index.json"):
        if (tmp_path / "reference" / name).exists():
            assert json.loads((tmp_path / "export" / name).read_text()) == json.loads(
                (tmp_path / "reference" / name).read_text()
            )


# Four gloo processes: FSDP 2 x TP 2 -------------------------------------------------------------------------

# Builds the `debug` model through hermes.train.build on a 2 x 2 mesh, three ways, and writes what the test
# compares with one process: logits and the export of a Hugging Face checkpoint, the export of a fresh model,
# and the whole state of a LoRA model loaded from the checkpoint.
SCRIPT = """
import sys
from pathlib import Path

import torch

from hermes.config import load_config
from hermes.parallel.sharded_hf import save_sharded
from hermes.parallel.build import build_model
from hermes.parallel.export import export_model
from hermes.train import build

checkpoint, out = sys.argv[1], Path(sys.argv[2])
COMMON = ["--model.preset", "debug", "--parallel.tp", "2", "--run.seed", "3"]


def config(*overrides):
    return load_config(overrides=[*COMMON, *overrides])


def whole(net):
    return {name: t.full_tensor() for name, t in net.state_dict().items()}


loaded = config("--model.checkpoint", checkpoint, "--run.dir", str(out / "run"), "--train.export_hf", "true")
env = build.environment(loaded)
net = build_model(loaded, env.meshes, env.device)
tokens = torch.load(out / "tokens.pt")
with torch.no_grad():
    logits = net(tokens).full_tensor()
export_model(loaded, env.chat, net)

fresh = build_model(config(), env.meshes, env.device)
save_sharded(fresh, out / "fresh")

adapted = config("--model.checkpoint", checkpoint, "--lora.rank", "4")
adapted_net = build_model(adapted, env.meshes, env.device, lora=adapted.lora)
lora_state = whole(adapted_net)
trainable = sorted(name for name, p in adapted_net.named_parameters() if p.requires_grad)
if env.rank == 0:
    torch.save(logits, out / "logits.pt")
    torch.save(lora_state, out / "lora_state.pt")
    (out / "trainable.txt").write_text("\\n".join(trainable))
build.finish(env)
"""


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """The script's outputs, and the bfloat16 Hugging Face checkpoint it loaded (into float32 weights)."""
    root = tmp_path_factory.mktemp("sharded")
    save_pretrained(_model(seed=5, config=LlamaConfig.preset("debug")).to(torch.bfloat16), root / "ckpt")
    torch.save(
        torch.randint(0, 128256, (2, 24), generator=torch.Generator().manual_seed(0)), root / "tokens.pt"
    )
    (root / "script.py").write_text(SCRIPT)
    command = [*TORCHRUN, "--standalone", "--nproc_per_node", "4", str(root / "script.py")]
    run_command([*command, str(root / "ckpt"), str(root)], timeout=600)
    return root


@pytest.mark.slow
def test_fsdp_x_tp_load_gives_the_logits_of_one_process(four_ranks):
    one = load_pretrained(four_ranks / "ckpt", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = one(torch.load(four_ranks / "tokens.pt"))
    torch.testing.assert_close(torch.load(four_ranks / "logits.pt"), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_fsdp_x_tp_export_is_byte_identical_to_a_one_process_export_and_loads_in_transformers(four_ranks):
    import transformers

    one = load_pretrained(four_ranks / "ckpt", dtype=torch.float32)
    save_pretrained(one, four_ranks / "one-process")
    export = four_ranks / "run" / "hf"
    assert sorted(p.name for p in export.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    _assert_byte_identical(_tensors(export), _tensors(four_ranks / "one-process"))

    theirs = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    tokens = torch.load(four_ranks / "tokens.pt")
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, one.eval()(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_fresh_model_initialised_on_the_mesh_has_the_weights_of_one_seeded_process(four_ranks, tmp_path):
    torch.manual_seed(3)
    save_pretrained(Llama(LlamaConfig.preset("debug")), tmp_path / "one-process")
    _assert_byte_identical(_tensors(four_ranks / "fresh"), _tensors(tmp_path / "one-process"))


@pytest.mark.slow
def test_lora_on_the_mesh_loads_the_base_and_draws_the_adapters_of_one_process(four_ranks):
    reference = load_pretrained(four_ranks / "ckpt", dtype=torch.float32)
    apply_lora(reference, rank=4, alpha=16.0, dropout=0.05)
    torch.manual_seed(3)
    init_lora_weights(reference)
    expected = reference.state_dict()
    got = torch.load(four_ranks / "lora_state.pt")
    _assert_byte_identical(got, expected)
    assert got["layers.1.attention.wo.lora_A.weight"].abs().sum() > 0  # drawn, not left empty
    trainable = (four_ranks / "trainable.txt").read_text().split("\n")
    assert trainable == sorted(name for name, p in reference.named_parameters() if p.requires_grad)
    assert len(trainable) == 2 * 7 * 2  # A and B of 7 projections in 2 blocks: the base stays frozen
