"""What only a CUDA device exercises: the fused attention backends against the reference, bfloat16 mixed
precision through FSDP, fused AdamW, and CPU offload. Marked `gpu`: skipped where torch sees no CUDA
device (tests/conftest.py), run by benchmarks/gpu_check.sh."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hermes.config import OptimConfig
from hermes.model import Llama, LlamaConfig
from hermes.model.attention import attention, available_backends
from hermes.train.optim import build_optimizer, parameter_groups
from tests.launching import debug_overrides, metrics, run_launch, small_sft_data

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
LENGTHS = [[300, 17, 195], [512]]  # row 0: three samples and no pad; row 1: one sample filling the row
SEQ = 512


def _packed_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q [2, SEQ, 8, 64] and k, v [2, SEQ, 2, 64] on CUDA, requiring grad, and the rows' cu_seqlens."""
    generator = torch.Generator(device=CUDA).manual_seed(0)
    q, k, v = (
        torch.randn(2, SEQ, heads, 64, device=CUDA, generator=generator).to(dtype).requires_grad_()
        for heads in (8, 2, 2)
    )
    offsets = [0]
    for row in LENGTHS:
        offsets += [offsets[-1] + n for n in row]
    return q, k, v, torch.tensor(offsets, dtype=torch.int32, device=CUDA)


def _forward_backward(backend: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The packed attention output and the gradients of q, k, v, as float32."""
    q, k, v, cu = _packed_inputs(dtype)
    out = attention(q, k, v, cu, max_seqlen=max(map(max, LENGTHS)), backend=backend)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    return tuple(t.float() for t in (out, *grads))


@pytest.mark.parametrize("backend", ["flash", "varlen", "flex", "segments"])
def test_cuda_backend_matches_the_float32_reference_forward_and_backward(backend):
    """Each backend in bfloat16 (flex compiled, as it runs on CUDA) agrees with the reference backend
    computed in float32, to bfloat16's precision; a backend that this machine's torch or packages lack is
    skipped, not failed."""
    if backend not in available_backends(CUDA, torch.bfloat16):
        pytest.skip(f"{backend} is not available here (flash needs flash-attn, varlen torch >= 2.10)")
    got = _forward_backward(backend, torch.bfloat16)
    want = _forward_backward("reference", torch.float32)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        scale = w.abs().max().item()
        torch.testing.assert_close(g, w, atol=2e-2 * scale, rtol=2e-2, msg=f"{backend} {name}")


def _debug_model() -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig.preset("debug")).to(CUDA).train()


def _tokens(rows: int = 2, seq: int = 128) -> torch.Tensor:
    generator = torch.Generator(device=CUDA).manual_seed(1)
    return torch.randint(
        0, LlamaConfig.preset("debug").vocab_size, (rows, seq), device=CUDA, generator=generator
    )


def test_bfloat16_mixed_precision_through_fsdp_computes_in_bfloat16_and_keeps_float32_shards(monkeypatch):
    """FSDP2 over one process (NCCL): parameters stay float32 shards, the forward runs in bfloat16 and its
    gradients match those of a plain bfloat16 copy of the model, to bfloat16's precision."""
    import torch.distributed as dist

    from hermes.parallel.fsdp import apply_fsdp
    from hermes.parallel.mesh import ParallelDims, build_mesh, init_distributed
    from hermes.parallel.processes import free_port

    world = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**world, "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    init_distributed()
    try:
        model = _debug_model()
        plain = copy.deepcopy(model).to(torch.bfloat16)
        sharded = apply_fsdp(model, build_mesh(ParallelDims(1, -1, 1, 1)).fsdp, "bfloat16", "float32")
        tokens = _tokens()
        logits = sharded(tokens)
        assert logits.dtype == torch.bfloat16
        logits.float().logsumexp(-1).mean().backward()
        plain(tokens).float().logsumexp(-1).mean().backward()
        for (name, param), twin in zip(sharded.named_parameters(), plain.parameters()):
            assert param.dtype == torch.float32, name
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            scale = twin.grad.float().abs().max().item() + 1e-6
            torch.testing.assert_close(grad, twin.grad.float(), atol=5e-2 * scale, rtol=5e-2, msg=name)
    finally:
        dist.destroy_process_group()


def test_fused_adamw_is_chosen_on_cuda_and_steps_like_foreach_adamw():
    model = _debug_model()
    reference = copy.deepcopy(model)
    settings = OptimConfig()
    fused = build_optimizer(model, settings)
    assert all(group["fused"] for group in fused.param_groups)
    foreach = torch.optim.AdamW(
        parameter_groups(reference, settings.weight_decay),
        lr=settings.lr,
        betas=tuple(settings.betas),
        eps=settings.eps,
        foreach=True,
    )
    tokens = _tokens()
    for net, optimizer in ((model, fused), (reference, foreach)):
        for _ in range(3):
            net(tokens).float().logsumexp(-1).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)


def test_one_process_sft_run_with_cpu_offload_trains_to_finite_losses(tmp_path):
    """One process of launch/sft.py with --parallel.cpu_offload true: FSDP keeps the shards, gradients and
    AdamW states on the CPU and gathers each unit to CUDA to compute; two steps train to finite losses."""
    run_dir = tmp_path / "run"
    data = small_sft_data(tmp_path / "sft.jsonl", records=40)
    overrides = [
        *debug_overrides(run_dir, data, tmp_path / "cache", steps=2),
        "--parallel.cpu_offload",
        "true",
    ]
    run_launch("sft.py", 1, overrides, timeout=240)
    losses = [record["loss"] for record in metrics(run_dir)]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def test_memory_snapshot_of_a_step_holds_its_allocations_and_the_profile_its_kernels(tmp_path):
    """logging.memory_snapshot_step and logging.profile_steps on CUDA: the pickled allocator history of step 1
    holds allocations made by the run's blocks, and the step's trace holds CUDA kernels."""
    import json
    import pickle

    run_dir = tmp_path / "run"
    data = small_sft_data(tmp_path / "sft.jsonl", records=40)
    overrides = [
        *debug_overrides(run_dir, data, tmp_path / "cache", steps=2),
        *("--logging.memory_snapshot_step", "1", "--logging.profile_steps", "2"),
    ]
    run_launch("sft.py", 1, overrides, timeout=240)
    snapshot = pickle.loads((run_dir / "profile" / "memory-step-1-rank-0.pickle").read_bytes())
    events = [event for trace in snapshot["device_traces"] for event in trace]
    assert any(event["action"] == "alloc" for event in events)
    frames = {frame["filename"] for event in events for frame in event.get("frames", [])}
    assert any(name.endswith("hermes/model/llama.py") for name in frames)
    trace = json.loads((run_dir / "profile" / "step-2-rank-0.json").read_text())["traceEvents"]
    assert any(event.get("cat") == "kernel" for event in trace)
