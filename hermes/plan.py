"""Will it fit? Per-GPU and per-node CPU memory of a hermes training step, before the GPUs are rented.

    python -m hermes.plan --preset llama3.1-405b --nodes 7 --cpu-offload
    python -m hermes.plan --preset llama3.1-405b --nodes 16 --tp 8 --json

Prints a table (with --json, one JSON object: `fits`, `gpu_bytes_per_rank`, `cpu_bytes_per_node`, the
breakdowns, the per-phase totals). `plan(...) -> MemoryPlan` is the same calculation for code. Sizes are
GiB (2**30 bytes).

What is counted, per GPU (formulas and their checks in `hermes.planning.memory` and
`hermes.planning.activations`):
- parameters, gradients, optimizer states: FSDP shards of float32 masters (4 bytes), gradients (4) and AdamW
  states (8) per trained parameter, over dp_shard x tp ranks; LoRA keeps the frozen base in the compute
  dtype and trains only the adapters. CPU offload moves all three to host RAM.
- activations of one micro-batch: what each block keeps for backward under the checkpointing mode (exact
  per-token lists of the model's tensors, flash-style attention at O(seq)), the recompute and backward
  transient of the block in backward, the tensors around the blocks, and the output head's working set
  (chunks of 1,024 tokens; worst case over the number of labelled tokens). Divided by tp under sequence and
  loss parallelism, except the sequence-gathered tensors.
- FSDP buffers: the root unit (embedding + head) gathered through the whole step, the block computing and
  the one prefetched (in the compute dtype), unsharded gradients and the reduce-scatter input.
- a fixed 4 GiB for the CUDA context, NCCL and allocator fragmentation.
The step passes through phases (head backward, the last and the first block's backward, the root's
reduce-scatter, the optimizer step); the peak is the largest. Per node: gpus_per_node x (offloaded states +
the CPU optimizer's temporaries + 4 GiB per process).
"""

from __future__ import annotations

import argparse
import json
import sys

from hermes.planning.memory import (
    CHECKPOINTING,
    DTYPE_BYTES,
    GIB,
    GPU_OVERHEAD_GIB,
    HOST_OVERHEAD_GIB,
    OPTIMIZER_STATES,
    MemoryPlan,
    plan,
)

__all__ = ["MemoryPlan", "main", "plan"]

_GPU_ROWS = {
    "parameters": "parameters (sharded)",
    "gradients": "gradients (sharded)",
    "optimizer_states": "optimizer states",
    "activations": "activations",
    "fsdp_buffers": "FSDP gathered params, unsharded grads",
    "overhead": "CUDA / NCCL overhead",
}
_CPU_ROWS = {
    "parameters": "parameters (offloaded)",
    "gradients": "gradients (offloaded)",
    "optimizer_states": "optimizer states (offloaded)",
    "optimizer_workspace": "CPU optimizer step temporaries",
    "overhead": "per-process overhead",
}
_ACTIVATION_ROWS = {
    "kept_per_block": "kept per block",
    "kept_all_blocks": "kept, all blocks",
    "recompute_one_block": "one block recomputed in backward",
    "backward_transient": "backward transient (MLP gradients)",
    "around_blocks": "final norm, head input, RoPE, ids",
    "head_working_set": "output head working set (worst case)",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hermes.plan",
        description="Per-GPU and per-node CPU memory of a hermes training step (FSDP2, optional TP, LoRA).",
    )
    p.add_argument(
        "--preset", required=True, help="model preset, e.g. llama3.1-8b, llama3.1-405b, llama3.2-1b"
    )
    p.add_argument("--nodes", type=int, default=1, help="machines (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per machine (default 8)")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per packed row (default 8192)")
    p.add_argument("--micro-batch", type=int, default=1, help="rows per forward on one GPU (default 1)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree inside a node (default 1)")
    p.add_argument("--dp-replicate", type=int, default=1, help="HSDP replicas (default 1: plain FSDP)")
    p.add_argument("--cpu-offload", action="store_true", help="FSDP CPU offload of params, grads, optimizer")
    p.add_argument("--activation-checkpointing", choices=CHECKPOINTING, default="full", help="(default full)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters on a frozen base")
    p.add_argument("--lora-rank", type=int, default=32, help="LoRA rank (default 32)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    p.add_argument("--param-dtype", choices=tuple(DTYPE_BYTES), default="bfloat16", help="compute dtype")
    p.add_argument("--reduce-dtype", choices=tuple(DTYPE_BYTES), default="float32", help="gradient reduction")
    p.add_argument("--master-dtype", choices=tuple(DTYPE_BYTES), default="float32", help="master weights")
    p.add_argument("--optimizer", choices=tuple(OPTIMIZER_STATES), default="adamw", help="(default adamw)")
    p.add_argument("--prefetch", type=int, default=2, help="FSDP blocks gathered at once (default 2)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--node-memory", type=float, default=2048.0, help="GiB of RAM per node (default 2048)")
    p.add_argument(
        "--gpu-overhead", type=float, default=GPU_OVERHEAD_GIB, help="fixed GiB per GPU (default 4)"
    )
    p.add_argument(
        "--host-overhead", type=float, default=HOST_OVERHEAD_GIB, help="GiB per process on the host"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def _gib(n: float) -> str:
    return f"{n / GIB:9.2f}"


def _fits(used: int, capacity: int) -> str:
    verdict = "fits" if used <= capacity else f"does NOT fit ({(used - capacity) / GIB:.1f} GiB over)"
    return f"of {capacity / GIB:.0f} GiB: {verdict}"


def format_table(result: MemoryPlan) -> str:
    """The plan as the human-readable report `python -m hermes.plan` prints."""
    s = result.setup
    trained = (
        ""
        if not s["lora"]
        else f", {result.trainable_parameters / 1e9:.3f}B trained (LoRA r={s['lora_rank']})"
    )
    lines = [
        f"{s['model']}: {result.parameters / 1e9:.2f}B parameters{trained}",
        f"{s['nodes']} node(s) x {s['gpus_per_node']} GPUs = {s['world']} ranks: dp_replicate {s['dp_replicate']}"
        f" x dp_shard {s['dp_shard']} x tp {s['tp']}",
        f"{s['micro_batch']} x {s['seq_len']} tokens per micro-batch; compute {s['param_dtype']}, reduce "
        f"{s['reduce_dtype']}, master {s['master_dtype']}, {s['optimizer']}; activation checkpointing "
        f"{s['activation_checkpointing']}; CPU offload {'on' if s['cpu_offload'] else 'off'}",
        "",
        f"GPU memory per rank, GiB, at the peak ({result.peak_phase})",
    ]
    lines += [f"  {label:<40}{_gib(result.gpu_breakdown[key])}" for key, label in _GPU_ROWS.items()]
    lines.append(
        f"  {'total':<40}{_gib(result.gpu_bytes_per_rank)}  {_fits(result.gpu_bytes_per_rank, result.gpu_memory_bytes)}"
    )
    lines += ["", "GPU memory per rank by phase of the step, GiB"]
    lines += [f"  {phase:<40}{_gib(used)}" for phase, used in result.gpu_phases.items()]
    lines += ["", "Activations of one micro-batch, GiB"]
    lines += [
        f"  {label:<40}{_gib(result.activation_detail[key])}" for key, label in _ACTIVATION_ROWS.items()
    ]
    lines += ["", f"CPU memory per node ({s['gpus_per_node']} ranks), GiB"]
    lines += [f"  {label:<40}{_gib(result.cpu_breakdown[key])}" for key, label in _CPU_ROWS.items()]
    lines.append(
        f"  {'total':<40}{_gib(result.cpu_bytes_per_node)}  {_fits(result.cpu_bytes_per_node, result.node_memory_bytes)}"
    )
    short = [where for where, ok in (("GPU", result.fits_gpu), ("node RAM", result.fits_cpu)) if not ok]
    lines += ["", "Verdict: fits" if result.fits else f"Verdict: does NOT fit ({' and '.join(short)})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> MemoryPlan:
    """Parse `argv` (default sys.argv[1:]), plan, print; argument errors exit with status 2."""
    args = parser().parse_args(argv)
    try:
        result = plan(
            args.preset,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            seq_len=args.seq_len,
            micro_batch=args.micro_batch,
            tp=args.tp,
            dp_replicate=args.dp_replicate,
            param_dtype=args.param_dtype,
            reduce_dtype=args.reduce_dtype,
            master_dtype=args.master_dtype,
            optimizer=args.optimizer,
            cpu_offload=args.cpu_offload,
            activation_checkpointing=args.activation_checkpointing,
            lora=args.lora,
            lora_rank=args.lora_rank,
            lora_dropout=args.lora_dropout,
            prefetch=args.prefetch,
            gpu_memory_gib=args.gpu_memory,
            node_memory_gib=args.node_memory,
            gpu_overhead_gib=args.gpu_overhead,
            host_overhead_gib=args.host_overhead,
        )
    except ValueError as err:
        parser().error(str(err))
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
