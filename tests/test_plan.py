"""The memory planner: the report's 405B facts, arithmetic worked by hand, autograd's own saved tensors, and
peak memory measured on CPU under FSDP."""

import functools
import json
import subprocess
import sys

import pytest
import torch

from hermes.model import Llama, LlamaConfig
from hermes.model.lora import apply_lora
from hermes.model.rope import rope_cos_sin, rope_frequencies
from hermes.plan import main, plan
from hermes.planning.activations import block_terms, total

GIB = 2**30
B405 = "llama3.1-405b"


@functools.cache
def meta_parameters(preset: str, lora_rank: int = 0) -> tuple[int, int]:
    """(all, trainable) parameter counts of the real model, built on the meta device."""
    with torch.device("meta"):
        model = Llama(LlamaConfig.preset(preset))
        if lora_rank:
            apply_lora(model, rank=lora_rank)
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def test_full_finetuning_holds_16_bytes_per_parameter_over_the_gpus_at_the_optimizer_step():
    n, _ = meta_parameters(B405)
    result = plan(B405, nodes=7)
    assert result.parameters == n
    # float32 master 4 + gradient 4 + AdamW exp_avg 4 + exp_avg_sq 4, sharded over 56 GPUs, plus 4 GiB.
    assert result.gpu_phases["optimizer step"] == pytest.approx(16 * n / 56 + 4 * GIB, rel=1e-9)
    assert 115e9 < 16 * n / 56 < 117e9  # the report's arithmetic: 6.5 TB over 56 GPUs
    # RMSProp: master 4 + gradient 4 + square_avg 4 + the foreach step's sqrt(square_avg) buffer 4.
    rmsprop = plan(B405, nodes=7, optimizer="rmsprop")
    assert rmsprop.gpu_phases["optimizer step"] == pytest.approx(16 * n / 56 + 4 * GIB, rel=1e-9)
    assert rmsprop.gpu_breakdown["optimizer_states"] == pytest.approx(4 * n / 56, rel=1e-9)


def test_405b_at_8k_needs_cpu_offload_on_7_nodes_as_the_report_says():
    plain = plan(B405, nodes=7, seq_len=8192)
    offload = plan(B405, nodes=7, seq_len=8192, cpu_offload=True)
    assert not plain.fits and not plain.fits_gpu
    assert plain.gpu_bytes_per_rank > 80 * GIB
    assert offload.fits and offload.gpu_bytes_per_rank <= 80 * GIB
    assert offload.cpu_bytes_per_node <= 2048 * GIB
    # Offloaded: the GPU holds no sharded state; the host holds 8 ranks' shards of it.
    for part in ("parameters", "gradients", "optimizer_states"):
        assert offload.gpu_breakdown[part] == 0
    n, _ = meta_parameters(B405)
    assert offload.cpu_breakdown["optimizer_states"] == pytest.approx(8 * n * 8 / 56, rel=1e-9)
    assert offload.cpu_breakdown["parameters"] == pytest.approx(8 * n * 4 / 56, rel=1e-9)


def test_405b_on_16_nodes_needs_offload_or_tensor_parallelism():
    assert not plan(B405, nodes=16).fits
    assert plan(B405, nodes=16, cpu_offload=True).fits
    tp8 = plan(B405, nodes=16, tp=8)
    assert tp8.fits
    assert (tp8.setup["dp_shard"], tp8.setup["tp"]) == (16, 8)


def test_tp_divides_the_checkpointed_block_inputs_by_tp():
    # Full checkpointing keeps each block's input: 126 blocks x 8192 tokens x 16384 x 2 bytes (bf16); sequence
    # parallelism shards it over the tp ranks.
    by_hand = 126 * 8192 * 16384 * 2
    assert plan(B405, nodes=16).activation_detail["kept_all_blocks"] == by_hand
    assert plan(B405, nodes=16, tp=8).activation_detail["kept_all_blocks"] == by_hand // 8


def test_hsdp_shards_states_within_a_replica_group():
    n, _ = meta_parameters(B405)
    result = plan(B405, nodes=16, dp_replicate=2)
    assert result.setup["dp_shard"] == 64
    assert result.gpu_phases["optimizer step"] == pytest.approx(16 * n / 64 + 4 * GIB, rel=1e-9)


def test_lora_trains_only_the_adapters_of_the_frozen_bf16_base():
    n, adapters = meta_parameters("llama3.1-8b", lora_rank=32)
    result = plan("llama3.1-8b", nodes=1, gpus_per_node=8, lora=True, lora_rank=32)
    assert result.trainable_parameters == adapters
    base = n - adapters
    assert result.gpu_breakdown["parameters"] == pytest.approx((2 * base + 4 * adapters) / 8, rel=1e-6)
    assert result.gpu_phases["optimizer step"] == pytest.approx(
        (2 * base + 16 * adapters) / 8 + 4 * GIB, rel=1e-6
    )


def _kept_by_autograd(block: torch.nn.Module, x: torch.Tensor, cos, sin) -> int:
    """Bytes of the distinct storages a forward saves for backward, parameters and RoPE tables excluded."""
    skip = {t.untyped_storage().data_ptr() for t in (*block.parameters(), cos, sin)}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin)
    return sum(storages.values())


@pytest.mark.parametrize(
    ("dtype", "lora_rank"), [(torch.float32, 0), (torch.bfloat16, 0), (torch.float32, 8), (torch.bfloat16, 8)]
)
def test_block_terms_are_what_autograd_saves(dtype, lora_rank):
    config = LlamaConfig.preset("tiny")
    with torch.device("meta"):
        model = Llama(config)
        if lora_rank:
            apply_lora(model, rank=lora_rank, dropout=0.0)
    block = model.layers[0].to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(std=0.02)
    seq = 64
    x = torch.randn(1, seq, config.dim, dtype=dtype, requires_grad=True)
    freqs = rope_frequencies(config.attention_head_dim, config.rope_theta, config.rope_scaling)
    cos, sin = rope_cos_sin(torch.arange(seq)[None], freqs)
    a = torch.finfo(dtype).bits // 8
    predicted = total(block_terms(config, "none", a, lora_rank, 0.0), seq, 1)
    assert predicted == _kept_by_autograd(block, x, cos, sin)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tp": 3}, "tp = 3 must divide gpus_per_node = 8"),
        ({"tp": 16, "gpus_per_node": 16}, r"tp = 16 does not divide the 8 key/value heads of llama3.1-405b"),
        ({"nodes": 1, "dp_replicate": 3}, r"dp_replicate x tp = 3 x 1 does not divide the 8 ranks"),
        ({"activation_checkpointing": "half"}, r"activation_checkpointing = 'half' is not one of"),
        ({"seq_len": 200_000}, r"seq_len = 200000 exceeds the 131072-token context"),
        ({"nodes": 0}, r"nodes must be positive, got 0"),
        ({"param_dtype": "fp8"}, r"param_dtype = 'fp8' is not one of 'float32', 'bfloat16'"),
    ],
)
def test_bad_inputs_name_the_argument_and_what_is_accepted(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(B405, **kwargs)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"Unknown model preset 'llama-9000'; choose one of"):
        plan("llama-9000")


def test_cli_json_holds_the_verdict_and_the_breakdown(capsys):
    main(["--preset", B405, "--nodes", "7", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["fits_gpu"] is False
    gpu = out["breakdown"]["gpu_per_rank"]
    assert sum(gpu.values()) == out["gpu_bytes_per_rank"] == out["gpu_phases"][out["peak_phase"]]
    assert sum(out["breakdown"]["cpu_per_node"].values()) == out["cpu_bytes_per_node"]
    assert set(gpu) == {
        "parameters",
        "gradients",
        "optimizer_states",
        "activations",
        "fsdp_buffers",
        "overhead",
    }


def test_cli_prints_the_table_and_rejects_bad_arguments_with_status_2(capsys):
    ok = subprocess.run(
        [sys.executable, "-m", "hermes.plan", "--preset", B405, "--nodes", "7", "--cpu-offload"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "Verdict: fits" in ok.stdout
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", B405, "--tp", "3"])
    assert exit_info.value.code == 2
    assert "tp = 3 must divide gpus_per_node = 8" in capsys.readouterr().err


@pytest.mark.slow
def test_predicted_step_memory_is_within_25_percent_of_the_measured_peak():
    from hermes.planning.measure import StepSpec, measure

    specs = [
        # The tiny preset: the 128,256-token head and the gathered root unit dominate.
        StepSpec(LlamaConfig.preset("tiny"), seq_len=256, activation_checkpointing="full"),
        # A small config whose blocks' activations dominate.
        StepSpec(
            LlamaConfig.preset("tiny").replace(vocab_size=4096), seq_len=1024, activation_checkpointing="none"
        ),
    ]
    for spec, (measured,) in zip(specs, measure(specs, ranks=1, rss=False)):
        predicted = spec.plan(ranks=1).step_increase_bytes
        assert predicted == pytest.approx(measured.allocator_peak, rel=0.25), spec
