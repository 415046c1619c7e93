"""FP8 (llm-compressor's FP8_DYNAMIC in the compressed-tensors layout): the numerics against hand-worked
values, the export against the compressed-tensors library's own reading and transformers, the simulated
forward against a naive reference, the export written from FSDP x TP shards against one process, and the
evaluation's side-by-side report."""

import copy
import json
import runpy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hermes.data.conversation import Message
from hermes.evaluate import main as evaluate_main
from hermes.generate import Sampling, load_chat_format, load_model, reply_batch
from hermes.model import Llama, LlamaConfig
from hermes.model.fp8 import FP8_DTYPE, dequantize, quantize, quantize_weight
from hermes.model.fp8_checkpoint import export_bytes
from hermes.model.fp8_linear import FP8Linear, apply_fp8, fp8_projections
from hermes.model.hf import hf_name, load_pretrained, save_pretrained
from hermes.model.lora import apply_lora, merge_lora
from tests.launching import REPO, TORCHRUN, debug_overrides, run_command, run_launch, small_sft_data
from tests.test_hf import SMALL, _model, _tokens

pytest.importorskip("compressed_tensors")

from hermes.parallel.sharded_fp8 import export_fp8_directory, save_sharded_fp8

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def _tensors(directory) -> dict[str, torch.Tensor]:
    return {n: t for path in sorted(directory.glob("*.safetensors")) for n, t in load_file(path).items()}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


@pytest.fixture(scope="module")
def bf16_export(tmp_path_factory):
    """A bfloat16 Hugging Face directory of SMALL with (stand-in) tokenizer files, and its FP8 export."""
    root = tmp_path_factory.mktemp("fp8")
    save_pretrained(_model().to(torch.bfloat16), root / "hf")
    for index, name in enumerate(TOKENIZER_FILES):
        (root / "hf" / name).write_text(json.dumps({"stand-in": index}))
    export_fp8_directory(root / "hf", root / "fp8")
    return root


# Numerics ---------------------------------------------------------------------------------------------------


def test_per_channel_scales_and_rounding_match_a_hand_worked_matrix():
    weight = torch.tensor(
        [
            [448.0, -224.0, 1.0, 0.3],  # absmax 448: scale 1; 0.3 lies between e4m3's 0.28125 and 0.3125
            [0.0, 0.0, 0.0, 0.0],  # a zero row: scale = float32 epsilon, not 0
            [3.5, -1.0, 17 / 128, 0.175],  # absmax 3.5: scale 2**-7; 17 ties between 16 and 18, 22.4 -> 22
        ]
    )
    quantized, scale = quantize_weight(weight)
    assert scale.shape == (3, 1) and scale.dtype == torch.float32
    assert scale.flatten().tolist() == [1.0, torch.finfo(torch.float32).eps, 2**-7]
    assert quantized.dtype == FP8_DTYPE
    assert quantized.float().tolist() == [
        [448.0, -224.0, 1.0, 0.3125],
        [0.0, 0.0, 0.0, 0.0],
        [448.0, -128.0, 16.0, 22.0],  # the tie goes to the even mantissa (16 = 1.000b x 2^4)
    ]
    assert dequantize(quantized, scale).tolist() == [
        [448.0, -224.0, 1.0, 0.3125],
        [0.0, 0.0, 0.0, 0.0],
        [3.5, -1.0, 0.125, 0.171875],
    ]


def test_scales_and_float8_values_are_those_compressed_tensors_computes():
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    from hermes.model.fp8_format import compress_weight, quantization_config

    weights = quantization_config().config_groups["group_0"].weights
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        weight = (torch.randn(96, 80) * torch.logspace(-4, 1, 96)[:, None]).to(dtype)
        weight[7] = 0.0
        quantized, scale = quantize_weight(weight)
        theirs, _ = calculate_qparams(weight.amin(1, keepdim=True), weight.amax(1, keepdim=True), weights)
        assert scale.dtype == dtype and torch.equal(scale, theirs)  # zero row: their epsilon too
        assert torch.equal(_bits(quantized), _bits(compress_weight(weight, scale)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_value_lands_beyond_the_channel_absmax(dtype):
    torch.manual_seed(1)
    weight = (torch.randn(256, 64) * torch.logspace(-6, 3, 256)[:, None]).to(dtype)
    quantized, scale = quantize_weight(weight)
    assert bool(quantized.float().isfinite().all()) and float(quantized.float().abs().max()) <= 448.0
    absmax = weight.float().abs().amax(1, keepdim=True)
    # The scale is absmax / 448 rounded to its dtype: 448 * scale passes absmax by at most that rounding
    # (half a unit in the last place) and the product's own.
    slack = 1 + torch.finfo(dtype).eps
    assert bool((dequantize(quantized, scale).abs() <= absmax * slack).all())
    # A value past 448 scales (a scale rounded down, or a foreign one) saturates at the e4m3 maximum.
    assert quantize(torch.tensor([[1000.0, -449.0, 447.9]]), torch.ones(1, 1)).float().tolist() == [
        [448.0, -448.0, 448.0]
    ]


def _naive_fp8(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The FP8_DYNAMIC product written out: dequantised weight (float8 * per-row scale), each token
    quantised with its own absmax / 448 scale and back, the matmul in float32."""
    w_scale = weight.abs().amax(1, keepdim=True).to(weight.dtype).float() / 448
    w_scale = torch.where(w_scale == 0, torch.finfo(weight.dtype).eps, w_scale).to(weight.dtype).float()
    w = (weight.float() / w_scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * w_scale
    x_scale = x.float().abs().amax(-1, keepdim=True) / 448
    x_scale = torch.where(x_scale == 0, torch.finfo(torch.float32).eps, x_scale)
    xq = (x.float() / x_scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * x_scale
    return (xq @ w.t()).to(x.dtype)


class _NaiveFP8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _naive_fp8(x, self.weight)


@torch.no_grad()
def test_an_fp8_layer_computes_the_naive_fp8_product():
    torch.manual_seed(2)
    linear = nn.Linear(64, 48, bias=False)
    x = torch.randn(3, 5, 64) * torch.logspace(-3, 2, 5)[:, None]
    x[1, 2] = 0.0  # a zero token
    layer = FP8Linear.from_linear(linear)
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale.shape == (48, 1)
    torch.testing.assert_close(layer(x), _naive_fp8(x, linear.weight), rtol=1e-5, atol=1e-6)
    assert bool((layer(x)[1, 2] == 0).all())
    exact = linear(x)
    error = float((layer(x) - exact).norm() / exact.norm())
    assert 0.005 < error < 0.05  # e4m3 keeps 3 mantissa bits: a few percent per product


@torch.no_grad()
def test_the_fp8_model_matches_a_naive_fp8_forward_and_stays_near_the_unquantised_model():
    model, tokens = _model().eval(), _tokens()
    reference = model(tokens)
    naive = copy.deepcopy(model)
    for name, module in fp8_projections(naive):
        parent, _, child = name.rpartition(".")
        setattr(naive.get_submodule(parent), child, _NaiveFP8Linear(module))
    fp8 = apply_fp8(copy.deepcopy(model))
    assert len([m for m in fp8.modules() if isinstance(m, FP8Linear)]) == 7 * SMALL.n_layers
    assert type(fp8.output) is type(model.output) and fp8.tok_embeddings.weight.dtype == torch.float32
    logits = fp8(tokens)
    torch.testing.assert_close(logits, naive(tokens), rtol=1e-4, atol=1e-4)
    error = float((logits - reference).norm() / reference.norm())
    assert 0 < error < 0.02  # quantised, within what FP8 (a 3-bit mantissa, per-channel scales) costs


@torch.no_grad()
def test_lora_adapters_are_merged_before_the_projections_are_quantised():
    model = apply_lora(_model(), rank=4, targets=["wq", "w2"])
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.normal_(std=0.1)
    merged = merge_lora(copy.deepcopy(model))
    fp8 = apply_fp8(model)
    expected = quantize_weight(merged.layers[0].attention.wq.weight)[0]
    assert torch.equal(_bits(fp8.layers[0].attention.wq.weight), _bits(expected))


def test_fp8_layers_keep_their_float8_weights_through_dtype_casts():
    model = apply_fp8(_model())
    before = _bits(model.layers[0].feed_forward.w2.weight).clone()
    scale = model.layers[0].feed_forward.w2.weight_scale.clone()
    model.to(torch.bfloat16).half().float()
    layer = model.layers[0].feed_forward.w2
    assert layer.weight.dtype == FP8_DTYPE and torch.equal(_bits(layer.weight), before)
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
    assert model.tok_embeddings.weight.dtype == torch.float32


# Export -----------------------------------------------------------------------------------------------------


def test_the_export_has_the_fp8_dynamic_layout_the_library_writes(bf16_export):
    from compressed_tensors.quantization import QuantizationConfig

    export = bf16_export / "fp8"
    assert sorted(p.name for p in export.iterdir()) == sorted(
        ["config.json", "model.safetensors", *TOKENIZER_FILES]
    )
    for name in TOKENIZER_FILES:
        assert (export / name).read_bytes() == (bf16_export / "hf" / name).read_bytes()
    config = json.loads((export / "config.json").read_text())
    source = json.loads((bf16_export / "hf" / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == source
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors"
    assert quantization["format"] == "float-quantized"
    assert quantization["quantization_status"] == "compressed"
    assert quantization["ignore"] == ["lm_head"]
    group = quantization["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    settings = ("num_bits", "type", "strategy", "symmetric", "dynamic")
    assert {k: group["weights"][k] for k in settings} == dict(
        zip(settings, (8, "float", "channel", True, False))
    )
    assert {k: group["input_activations"][k] for k in settings} == dict(
        zip(settings, (8, "float", "token", True, True))
    )
    QuantizationConfig.model_validate(quantization)  # the library reads back what it wrote

    tensors, dense = _tensors(export), _tensors(bf16_export / "hf")
    quantized = {
        f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}"
        for i in range(2)
        for p in PROJECTIONS
    }
    assert sorted(tensors) == sorted([*dense, *(f"{m}.weight_scale" for m in quantized)])
    for name, tensor in dense.items():
        module = name.removesuffix(".weight")
        if module in quantized:
            assert tensors[name].dtype == FP8_DTYPE and tensors[name].shape == tensor.shape
            assert tensors[f"{module}.weight_scale"].dtype == torch.bfloat16
            assert tensors[f"{module}.weight_scale"].shape == (tensor.shape[0], 1)
            assert torch.equal(_bits(tensors[name]), _bits(quantize_weight(tensor)[0]))
        else:  # embedding, norms, head: as in the 16-bit export
            assert torch.equal(_bits(tensors[name]), _bits(tensor)), name


def test_an_export_in_several_files_has_an_index_and_the_tensors_of_one_file(bf16_export, tmp_path):
    save_sharded_fp8(load_pretrained(bf16_export / "hf"), tmp_path / "fp8", max_shard_bytes=40_000)
    files = sorted(p.name for p in (tmp_path / "fp8").glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "fp8" / "model.safetensors.index.json").read_text())
    got, expected = _tensors(tmp_path / "fp8"), _tensors(bf16_export / "fp8")
    assert sorted(index["weight_map"]) == sorted(got) == sorted(expected)
    assert all(torch.equal(_bits(got[name]), _bits(t)) for name, t in expected.items())
    assert torch.equal(
        load_model(tmp_path / "fp8", fp8=True)(_tokens()),
        load_model(bf16_export / "fp8", fp8=True)(_tokens()),
    )


def test_compressed_tensors_decompresses_the_export_to_hermes_dequantised_weights(bf16_export):
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    export = bf16_export / "fp8"
    # Reading without a model, the library takes every weight but the norms' for a Linear's; the embedding
    # is none (llm-compressor's ignore list names only Linears), so it is named here.
    dequantizer = CompressedTensorsDequantizer(export, ignore=["model.embed_tokens"], dtype=torch.bfloat16)
    theirs = dequantizer.validate(_tensors(export))
    expected = load_model(export).state_dict()  # an FP8 export loads dequantised
    assert sorted(theirs) == sorted(hf_name(n) for n in expected)
    for name, tensor in expected.items():
        assert theirs[hf_name(name)].dtype == tensor.dtype == torch.bfloat16
        assert torch.equal(theirs[hf_name(name)], tensor), name


@torch.no_grad()
def test_an_fp8_export_loads_as_its_own_float8_weights_and_computes_as_the_simulation(bf16_export):
    export = bf16_export / "fp8"
    loaded = load_model(export, fp8=True)
    stored = _tensors(export)
    layer = loaded.layers[1].feed_forward.w2
    assert isinstance(layer, FP8Linear)
    assert torch.equal(_bits(layer.weight), _bits(stored["model.layers.1.mlp.down_proj.weight"]))
    assert torch.equal(layer.weight_scale, stored["model.layers.1.mlp.down_proj.weight_scale"].float())
    simulated = load_model(bf16_export / "hf", fp8=True)  # quantised in memory from the bfloat16 weights
    tokens = _tokens()
    assert torch.equal(loaded(tokens), simulated(tokens))


@torch.no_grad()
def test_transformers_loads_the_export_and_computes_hermes_fp8_logits(tmp_path):
    import transformers

    model = _model().eval()  # float32: transformers' CPU matmuls then agree with hermes' to rounding
    save_sharded_fp8(model, tmp_path / "fp8")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8").eval()
    tokens = _tokens()
    ours = apply_fp8(copy.deepcopy(model))(tokens)
    torch.testing.assert_close(theirs(tokens).logits, ours, rtol=1e-5, atol=1e-5)
    assert float((ours - model(tokens)).abs().max()) > 1e-4  # both are FP8, not the unquantised model


def test_export_sizes_count_one_byte_per_projection_weight_plus_a_scale_per_channel():
    model = Llama(SMALL).to(torch.bfloat16)
    dense, fp8 = export_bytes(model)
    projections = sum(m.weight.numel() for _, m in fp8_projections(model))
    rows = sum(m.weight.shape[0] for _, m in fp8_projections(model))
    assert dense == 2 * sum(p.numel() for p in model.parameters())
    assert fp8 == dense - projections + 2 * rows


# From the shards: FSDP 2 x TP 2 (wq ... w3 sharded on rows by FSDP and colwise TP; wo, w2 on columns by
# rowwise TP, whose scales need the max over the tp group) ----------------------------------------------

SCRIPT = """
import sys
from pathlib import Path

from hermes.config import load_config
from hermes.parallel.build import build_model
from hermes.parallel.export import export_fp8
from hermes.train import build

checkpoint, out = sys.argv[1], Path(sys.argv[2])
config = load_config(overrides=[
    "--model.preset", "debug", "--parallel.tp", "2", "--model.checkpoint", checkpoint,
    "--run.dir", str(out / "run"), "--train.export_fp8", "true",
])
env = build.environment(config)
export_fp8(config, env.chat, build_model(config, env.meshes, env.device))
build.finish(env)
"""


@pytest.mark.slow
def test_fsdp_x_tp_fp8_export_is_byte_identical_to_one_process(tmp_path):
    save_pretrained(_model(seed=5, config=LlamaConfig.preset("debug")).to(torch.bfloat16), tmp_path / "ckpt")
    (tmp_path / "script.py").write_text(SCRIPT)
    command = [*TORCHRUN, "--standalone", "--nproc_per_node", "4", str(tmp_path / "script.py")]
    run_command([*command, str(tmp_path / "ckpt"), str(tmp_path)], timeout=600)
    save_sharded_fp8(load_pretrained(tmp_path / "ckpt", dtype=torch.float32), tmp_path / "one-process")
    export = tmp_path / "run" / "fp8"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in export.iterdir()
    }
    got, expected = _tensors(export), _tensors(tmp_path / "one-process")
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(_bits(got[name]), _bits(tensor)), name
    quantization = json.loads((export / "config.json").read_text())["quantization_config"]
    assert (
        quantization
        == json.loads((tmp_path / "one-process" / "config.json").read_text())["quantization_config"]
    )


@pytest.mark.slow
def test_a_lora_sft_run_with_export_fp8_writes_the_merged_model_in_fp8(tmp_path):
    torch.manual_seed(0)
    save_pretrained(Llama(LlamaConfig.preset("debug")), tmp_path / "base")
    data = small_sft_data(tmp_path / "data.jsonl", records=24)
    run_dir = tmp_path / "run"
    args = [
        *debug_overrides(run_dir, data, tmp_path / "cache", 2),
        "--model.checkpoint",
        str(tmp_path / "base"),
    ]
    run_launch("sft.py", 1, [*args, "--lora.rank", "4", "--lora.dropout", "0", "--train.export_fp8", "true"])
    assert not (run_dir / "hf").exists()  # train.export_hf is off: only the adapter and the FP8 model
    merged = load_model(tmp_path / "base", adapter=run_dir / "adapter")
    save_sharded_fp8(merged, tmp_path / "expected")
    got, expected = _tensors(run_dir / "fp8"), _tensors(tmp_path / "expected")
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(_bits(got[name]), _bits(t)) for name, t in expected.items())
    assert (run_dir / "fp8" / "tokenizer_config.json").is_file()


# Evaluation -------------------------------------------------------------------------------------------------


def test_compare_fp8_prints_the_model_and_its_fp8_simulation_side_by_side(tmp_path, capsys):
    torch.manual_seed(0)
    save_pretrained(
        Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64)), tmp_path / "m"
    )
    items = tmp_path / "items.jsonl"
    lines = [
        {"context": "Is it?", "choices": [" yes", " no"], "answer": 0},
        {"context": "Pet:", "choices": [" dog", " cat", " fish"], "answer": 1},
    ]
    items.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    args = ["--model", str(tmp_path / "m"), str(items), "--device", "cpu"]

    evaluate_main([*args, "--compare-fp8"])
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == f"{items}: 2 items"
    assert rows[1].split() == ["weights", "acc", "acc_norm", "mean", "dlogp", "size"]
    assert rows[2].split()[0] == "float32" and rows[2].split()[3:] == ["0.0000", "1.000"]
    assert rows[3].split()[0] == "fp8"

    report = evaluate_main([*args, "--compare-fp8", "--json"])
    assert json.loads(capsys.readouterr().out) == report
    assert report["items"] == 2 and report["dtype"] == "float32"
    changes = [f - r for s in report["scores"] for f, r in zip(s["fp8"], s["reference"])]
    assert report["mean_logprob_change"] == pytest.approx(sum(changes) / 5) and any(changes)
    assert 0.25 < report["size_ratio"] < 1  # float32 -> float8 projections; the embedding and head stay
    alone = evaluate_main([*args, "--fp8"])
    capsys.readouterr()
    assert {k: alone[k] for k in ("acc", "acc_norm")} == report["fp8"]


@torch.no_grad()
def test_the_generate_script_with_fp8_replies_as_the_fp8_model(tmp_path, capsys):
    torch.manual_seed(0)
    save_pretrained(
        Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64)), tmp_path / "m"
    )
    script = runpy.run_path(str(REPO / "launch" / "generate.py"))
    script["main"](["--model", str(tmp_path / "m"), "--fp8", "--prompt", "Hi!", "--max-new-tokens", "4"])
    model = load_model(tmp_path / "m", fp8=True)
    assert isinstance(model.layers[0].attention.wq, FP8Linear)
    conversation = [Message("user", "Hi!")]
    (reply,) = reply_batch(model, load_chat_format(tmp_path / "m"), [conversation], sampling=Sampling(4))
    assert capsys.readouterr().out.startswith(f"=== reply 1 ===\n{reply.text}")


def test_the_export_command_writes_the_fp8_directory(bf16_export, tmp_path, capsys):
    from hermes.export import main as export_main

    assert export_main(["fp8", str(bf16_export / "hf"), str(tmp_path / "out")]) == 0
    assert f"Wrote {tmp_path / 'out'}" in capsys.readouterr().out
    got, expected = _tensors(tmp_path / "out"), _tensors(bf16_export / "fp8")
    assert sorted(got) == sorted(expected) and all(
        torch.equal(_bits(got[n]), _bits(t)) for n, t in expected.items()
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in (bf16_export / "fp8").iterdir()
    )
    assert export_main(["fp8", str(tmp_path / "missing"), str(tmp_path / "other")]) == 1
    assert "error:" in capsys.readouterr().err
