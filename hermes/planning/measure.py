"""Measured CPU memory of one forward + backward under FSDP on gloo: the check on the planner's formulas.

Two ways to see a step's peak on CPU, both used here:

- Allocator peak (the number compared with the planner). With `torch.profiler` memory profiling on, every
  allocation and free of torch's CPU allocator is recorded together with the allocator's running total of
  live bytes; the largest total during the window, less the total before it, is the peak that the step's
  tensors added. It counts exactly the tensors torch allocates, whatever malloc does, and is repeatable to
  the byte.
- Resident set (a cross-check). Writing "5" to /proc/self/clear_refs resets the kernel's high-water mark
  (VmHWM) to the current resident size, so VmHWM after the step less VmRSS before it is the peak growth of
  the process. It also sees glibc keeping freed memory for reuse (which makes it read low) and memory
  outside torch's allocator, such as gloo's buffers (high). `ru_maxrss` is the same high-water mark
  without the reset, so it is useless once model building has peaked higher than the step.

The measured step: build the model (on meta, then materialised shard by shard), apply activation
checkpointing and FSDP as hermes does (checkpointing first, then `apply_fsdp`), run a short warm-up forward +
backward (FSDP's lazy initialisation), set gradients to None as the training loop leaves them after each
optimizer step, then measure one forward + backward of a micro-batch whose every token is labelled, through
the plain causal attention path (torch's flash kernel on CPU: O(seq) memory, like flash-attn on GPU).
Optimizer states are resident memory outside the window; the planner's counterpart of the measurement is
`MemoryPlan.step_increase_bytes`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hermes.model.config import LlamaConfig
from hermes.planning.memory import MemoryPlan, plan

WARMUP_TOKENS = 16
"""Sequence length of the warm-up forward + backward (FSDP's lazy initialisation)."""


@dataclass(frozen=True)
class StepMemory:
    """One rank's measured growth during a forward + backward, in bytes."""

    rank: int
    allocator_peak: int
    rss_peak: int | None
    """None where /proc/self/clear_refs cannot be written."""


def allocator_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of live CPU tensors that `fn` adds, from torch.profiler's allocator records."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            records.append((event.start_time_ns, fields.total_allocated, fields.alloc_size))
        stack.extend(event.children)
    if not records:
        return 0
    records.sort()
    _, first_total, first_size = records[0]
    return max(total for _, total, _ in records) - (first_total - first_size)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_peak(fn: Callable[[], object]) -> int | None:
    """Peak growth of the resident set while `fn` runs (bytes), or None where the mark cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


@dataclass(frozen=True)
class StepSpec:
    """One measured step: the model and the planner inputs that describe it."""

    config: LlamaConfig
    seq_len: int
    activation_checkpointing: str = "full"
    micro_batch: int = 1
    param_dtype: str = "float32"
    reduce_dtype: str = "float32"
    lora_rank: int = 0
    lora_dropout: float = 0.05

    def plan(self, ranks: int) -> MemoryPlan:
        """The planner's answer for this step on `ranks` processes of one machine, with no fixed overhead."""
        return plan(
            self.config,
            nodes=1,
            gpus_per_node=ranks,
            seq_len=self.seq_len,
            micro_batch=self.micro_batch,
            param_dtype=self.param_dtype,
            reduce_dtype=self.reduce_dtype,
            master_dtype="float32",
            activation_checkpointing=self.activation_checkpointing,
            lora=self.lora_rank > 0,
            lora_rank=self.lora_rank,
            lora_dropout=self.lora_dropout,
            gpu_overhead_gib=0.0,
        )


def _measure_one(spec: StepSpec, world: int, rank: int, rss: bool) -> StepMemory:
    from hermes.model import Llama
    from hermes.model.lora import apply_lora
    from hermes.parallel.activation_checkpointing import apply_activation_checkpointing
    from hermes.parallel.fsdp import apply_fsdp
    from hermes.parallel.mesh import ParallelDims, build_mesh

    # Values do not change memory: build on meta, shard, then fill the shards with cheap random numbers.
    with torch.device("meta"):
        model = Llama(spec.config)
    if spec.lora_rank:
        apply_lora(model, rank=spec.lora_rank, dropout=spec.lora_dropout)
    apply_activation_checkpointing(model, spec.activation_checkpointing)
    apply_fsdp(model, build_mesh(ParallelDims(1, -1, 1, world)).fsdp, spec.param_dtype, spec.reduce_dtype)
    model.to_empty(device="cpu")
    torch.manual_seed(rank)
    with torch.no_grad():
        for param in model.parameters():
            param.to_local().normal_(std=0.02)

    def forward_backward(seq_len: int) -> None:
        shape = (spec.micro_batch, seq_len)
        tokens = torch.randint(0, spec.config.vocab_size, shape)
        labels = torch.randint(0, spec.config.vocab_size, shape)
        (-model(tokens, labels=labels).sum()).backward()

    # Warm-up on a short sequence (FSDP's lazy initialisation), then gradients set to None as the training
    # loop leaves them after each optimizer step.
    forward_backward(WARMUP_TOKENS)
    model.zero_grad(set_to_none=True)
    step = functools.partial(forward_backward, spec.seq_len)
    measured = allocator_peak(step)
    model.zero_grad(set_to_none=True)
    return StepMemory(rank, measured, rss_peak(step) if rss else None)


def _measure_rank(specs: list[StepSpec], rss: bool) -> list[dict]:
    """One process of `measure`: every spec in turn, on this rank of the world `run_on_processes` set up."""
    import torch.distributed as dist

    from hermes.parallel.mesh import init_distributed

    rank = init_distributed()
    results = [asdict(_measure_one(spec, dist.get_world_size(), rank, rss)) for spec in specs]
    dist.destroy_process_group()
    return results


def measure(specs: list[StepSpec], ranks: int = 1, rss: bool = True) -> list[list[StepMemory]]:
    """Measure one forward + backward of each spec on `ranks` gloo processes (FSDP over all of them).

    The processes are started once (spawn) and measure the specs one after the other, each on a freshly built
    model. Call it from under `if __name__ == "__main__":` in a script (spawn re-imports the main module).

    Args:
        specs: the steps to measure.
        ranks: processes, the FSDP shard group.
        rss: also measure the resident-set growth (one more forward + backward per spec).

    Returns:
        For each spec, one StepMemory per rank, by rank.
    """
    from hermes.parallel.processes import run_on_processes

    threads = max(1, (os.cpu_count() or 1) // ranks)
    per_rank = run_on_processes(_measure_rank, ranks, specs, rss, threads=threads)
    return [[StepMemory(**per_rank[r][i]) for r in range(ranks)] for i in range(len(specs))]
