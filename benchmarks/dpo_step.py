"""The DPO step on CPU: packed against padded preference pairs, and the memory of LoRA-DPO against
full-weights DPO with a reference copy.

Data: the bundled preference pairs (hermes/data/examples/preference.jsonl) rendered as (chosen, rejected)
samples by `build_preference_samples` (Hermes ChatML, Llama 3 tokenizer, token ids folded into the model's
vocabulary). Model: `SMALL_VOCAB` of benchmarks/_common.py (dim 512, 4 blocks, vocabulary 4,096), float32,
built as `hermes.train.build.model` builds the DPO model on one process: LoRA r 32, alpha 16, dropout 0.05
on every block projection, activation checkpointing, then FSDP2 over a mesh of 1. The step is hermes'
`dpo_step` (reference = the same model with the adapter off, NEFTune alpha 5, beta 0.1), then the optimizer
of hermes' DPO configs (RMSProp, `build_optimizer`).

Part 1, throughput (one process, 1 thread, no activation checkpointing: hermes' default). The same global
batches of pairs two ways, each on its own model from the same initial weights, step by step in turn:
- packed: `PackedLoader` (group size 2: a pair's two sides in one row) into --rows rows of --seq-len
  tokens, --micro-batch rows per forward;
- padded: the same pairs in a random order (as TRL's sampler draws them), one sample per row,
  --padded-pairs pairs (2x rows) per forward, each micro-batch padded to its longest sample, as TRL
  batches DPO. The rows are laid out as a `PackedBatch` of one sample per row (positions from 0, one
  attention segment per row and one for its pad tail), so the same model forward and the same `dpo_step`
  run on both.
Tokens/s counts real (non-pad) tokens, the same for both; medians over timed steps, by wall time and by
CPU time (`time.process_time`). "attn M" is the millions of query-key pairs per head that attention
computes on CPU (hermes' "segments" backend: SDPA on each attention segment alone, length^2 per segment).
Before timing, the per-sample log-probabilities of the first batch are compared between the two layouts:
they must agree (the same pairs through the same weights).

Part 2, memory. LoRA-DPO (one model; the reference is the adapter switched off; RMSProp on the adapters)
against full-weights DPO (policy and a frozen reference copy, two full models, every policy weight
trained by AdamW, as TRL does without PEFT), both with full activation checkpointing (as hermes' DPO
configs of the Llama 3.1 models):
- predicted by the memory planner (`hermes.plan.plan`) for Llama 3.1 8B at 8K tokens (bfloat16 compute,
  float32 masters, as launch/configs/dpo-llama3.1-8b.toml). The planner plans one forward + backward and
  the optimizer step; DPO's reference forward runs under no_grad before the policy's, so it adds only the
  reference copy's parameters for full weights (sharded like the policy, in the compute dtype) and
  nothing for LoRA;
- measured on CPU for the small model, each variant in a fresh process: building the model(s) and the
  optimizer, then --memory-steps steps of one packed row, by the growth of the resident set
  (`hermes.planning.measure.rss_peak`) and, in another fresh process, by the peak of torch's allocator
  (`allocator_peak`), beside the planner's prediction for the same small step. "peak RSS" is the
  process's resident high-water mark (VmHWM), torch and Python included.

Usage: python benchmarks/dpo_step.py [--seq-len 1024] [--rows 4] [--micro-batch 2] [--padded-pairs 4]
    [--warmup 1] [--steps 3] [--memory-steps 2] [--skip-throughput | --skip-memory]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from _common import SMALL_VOCAB, fold_vocabulary
from torch.distributed.device_mesh import DeviceMesh
from train_step import SEED, Result, Shape, packed_slots, timed, unpacked_samples

from hermes.config import DataConfig, DpoConfig, LoraConfig, OptimConfig
from hermes.data.chat import ChatFormat
from hermes.data.dataset import TokenizedDataset
from hermes.data.loader import PackedLoader, StepBatch
from hermes.data.packing import PackedBatch
from hermes.data.pipeline import build_preference_samples, bundled_example
from hermes.data.sample import Sample
from hermes.data.tokenizer import Tokenizer
from hermes.model import Llama, LlamaConfig
from hermes.model.lora import apply_lora
from hermes.parallel.activation_checkpointing import apply_activation_checkpointing
from hermes.parallel.fsdp import apply_fsdp
from hermes.parallel.mesh import ParallelDims, build_mesh, init_distributed
from hermes.parallel.processes import run_on_processes
from hermes.planning.measure import allocator_peak, rss_peak
from hermes.planning.memory import DTYPE_BYTES, GIB, plan
from hermes.train.dpo import dpo_step, sequence_logprobs
from hermes.train.losses import dpo_loss
from hermes.train.neftune import neftune
from hermes.train.optim import build_optimizer
from hermes.train.trainer import micro_batches

MIB = 2**20
LORA = LoraConfig()
DPO = DpoConfig()
LORA_OPTIMIZER = OptimConfig(name="rmsprop")
"""hermes' DPO configs train the adapters with RMSProp (the Hermes 3 recipe)."""
FULL_OPTIMIZER = OptimConfig(name="adamw")
THROUGHPUT_CHECKPOINTING = "none"
"""hermes' default (launch/configs/dpo-tiny.toml)."""
MEMORY_CHECKPOINTING = "full"
"""As hermes' DPO configs of the Llama 3.1 models, which part 2 plans."""

StepFn = Callable[[StepBatch], float]


# Data ----------------------------------------------------------------------------------------------------


def preference_dataset(seq_len: int) -> tuple[TokenizedDataset, int]:
    """The bundled pairs as interleaved (chosen, rejected) samples, pairs over `seq_len` dropped, ids folded
    into SMALL_VOCAB's vocabulary. Returns the dataset and the pad id."""
    chat = ChatFormat(Tokenizer.default())
    built = build_preference_samples(
        [bundled_example("preference.jsonl")], chat, DataConfig(seq_len=seq_len), SEED
    )
    dataset = TokenizedDataset.from_samples(built.samples)
    return fold_vocabulary(dataset, chat.tokenizer.pad_id, SMALL_VOCAB.vocab_size)


def packed_batches(dataset: TokenizedDataset, pad_id: int, shape: Shape, count: int) -> list[StepBatch]:
    """The first `count` global batches of one process, each pair's two sides in one row."""
    loader = PackedLoader(
        dataset, shape.seq_len, shape.rows, shape.micro_batch, 0, 1, SEED, pad_id, group_size=2
    )
    return [loader.next_batch() for _ in range(count)]


def padded(
    batch: StepBatch, pairs_per_micro: int, pad_id: int, rng: np.random.Generator | None = None
) -> StepBatch:
    """The pairs of `batch`, one sample per row (each pair's chosen then rejected side), in micro-batches of
    `pairs_per_micro` pairs each padded to its longest sample; the global counts are unchanged. With `rng`
    the pairs come in a random order, as a sampler that knows nothing of lengths draws them; without it,
    in the packed order."""
    samples = [Sample(tokens.tolist(), labels.tolist()) for tokens, labels in unpacked_samples(batch)]
    pairs = [samples[i : i + 2] for i in range(0, len(samples), 2)]
    if rng is not None:
        pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    micro = []
    for start in range(0, len(pairs), pairs_per_micro):
        rows = [[sample] for pair in pairs[start : start + pairs_per_micro] for sample in pair]
        micro.append(PackedBatch.from_rows(rows, max(len(row[0]) for row in rows), pad_id))
    return dataclasses.replace(batch, micro_batches=micro)


# Models and steps ----------------------------------------------------------------------------------------


def one_process_mesh() -> DeviceMesh:
    """The mesh of a world of one (joined on first use): what FSDP shards over in a 1-process run."""
    init_distributed()
    return build_mesh(ParallelDims(1, -1, 1, 1)).fsdp


def lora_model(config: LlamaConfig, mesh: DeviceMesh, checkpointing: str) -> Llama:
    """Fresh weights with the recipe's adapter, activation checkpointing, then FSDP2: what
    `hermes.train.build.model` builds with `lora` on one process."""
    torch.manual_seed(SEED)
    model = Llama(config)
    torch.manual_seed(SEED)
    apply_lora(model, rank=LORA.rank, alpha=LORA.alpha, dropout=LORA.dropout, targets=tuple(LORA.targets))
    apply_activation_checkpointing(model, checkpointing)
    return apply_fsdp(model, mesh)


def lora_dpo(config: LlamaConfig, mesh: DeviceMesh, checkpointing: str) -> StepFn:
    """hermes' LoRA-DPO training step: `dpo_step` then the optimizer; returns the step's loss."""
    model = lora_model(config, mesh, checkpointing)
    optimizer = build_optimizer(model, LORA_OPTIMIZER)

    def step(batch: StepBatch) -> float:
        metrics = dpo_step(model, batch, micro_batches(model, batch, torch.device("cpu")), DPO)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(metrics["loss"])

    return step


def full_dpo_step(policy: Llama, reference: Llama, batch: StepBatch) -> float:
    """Forward + backward of DPO against a separate frozen reference model (one process): `dpo_step` with
    the reference copy in place of the adapter switched off."""
    global_pairs = len(batch.global_sample_lengths) // 2
    total = 0.0
    for micro in batch.micro_batches:
        with torch.no_grad():
            ref = sequence_logprobs(reference, micro)
        with neftune(policy, DPO.neftune_alpha, micro.cu_seqlens):
            logps = sequence_logprobs(policy, micro)
        loss, _ = dpo_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], DPO.beta, DPO.label_smoothing)
        share = logps.numel() // 2 / global_pairs
        (loss * share).backward()
        total += float(loss.detach()) * share
    return total


def full_dpo(config: LlamaConfig, mesh: DeviceMesh, checkpointing: str) -> StepFn:
    """Full-weights DPO: policy (with activation checkpointing) and frozen reference copy, each
    FSDP2-wrapped, AdamW on every policy weight; returns the step's loss."""
    torch.manual_seed(SEED)
    policy = Llama(config)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    apply_activation_checkpointing(policy, checkpointing)
    policy, reference = apply_fsdp(policy, mesh), apply_fsdp(reference, mesh)
    optimizer = build_optimizer(policy, FULL_OPTIMIZER)

    def step(batch: StepBatch) -> float:
        loss = full_dpo_step(policy, reference, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


VARIANTS: dict[str, Callable[[LlamaConfig, DeviceMesh, str], StepFn]] = {
    "LoRA-DPO": lora_dpo,
    "full DPO + reference": full_dpo,
}


# Part 1: throughput --------------------------------------------------------------------------------------


def max_logprob_difference(model: Llama, packed_batch: StepBatch, padded_batch: StepBatch) -> float:
    """Largest difference between the per-sample response log-probabilities of the two layouts."""
    with torch.no_grad():
        per_layout = [
            torch.cat([sequence_logprobs(model, micro) for micro in batch.micro_batches])
            for batch in (packed_batch, padded_batch)
        ]
    return float((per_layout[0] - per_layout[1]).abs().max())


def attention_entries(batch: StepBatch) -> int:
    """Query-key pairs per head that hermes' CPU attention (SDPA on each segment alone) computes: the sum
    of the squared segment lengths (pad tails included). A dense mask over each row would compute
    rows x width^2."""
    return sum(
        int(((micro.cu_seqlens[1:] - micro.cu_seqlens[:-1]).long() ** 2).sum())
        for micro in batch.micro_batches
    )


def time_layouts(
    batches: list[StepBatch], pad_id: int, mesh: DeviceMesh, args: argparse.Namespace
) -> tuple[list[Result], dict[str, int]]:
    """Run LoRA-DPO on the packed batches and their padded twins, step by step in turn, each layout on its
    own model from the same initial weights; returns the timings and each layout's attention entries per
    step (mean over timed steps)."""
    shape = f"{args.micro_batch} x {args.seq_len}"
    results = [
        Result(f"packed ({shape} / micro)", 1, 1),
        Result(f"padded ({args.padded_pairs} pairs / micro)", 1, 1),
    ]
    steps = [lora_dpo(SMALL_VOCAB, mesh, THROUGHPUT_CHECKPOINTING) for _ in results]
    attention: dict[str, list[int]] = {r.name: [] for r in results}
    for i, batch in enumerate(batches):
        walls = []
        layouts = (batch, padded(batch, args.padded_pairs, pad_id, np.random.default_rng([SEED, i])))
        for result, step, layout in zip(results, steps, layouts):
            _, wall, cpu = timed(step, layout)
            if i >= args.warmup:
                result.record(batch.global_real_tokens, packed_slots(layout), wall, cpu)
                attention[result.name].append(attention_entries(layout))
            walls.append(f"{result.name.split()[0]} {wall:.2f} s")
        warm_up = " (warm-up)" if i < args.warmup else ""
        print(f"  step {i + 1}{warm_up}: {', '.join(walls)} (wall)", flush=True)
    return results, {name: round(statistics.mean(entries)) for name, entries in attention.items()}


def throughput(args: argparse.Namespace) -> None:
    """Part 1: packed against padded, with the layouts' agreement checked first."""
    torch.set_num_threads(1)
    shape = Shape(args.seq_len, args.rows, args.micro_batch)
    dataset, pad_id = preference_dataset(shape.seq_len)
    batches = packed_batches(dataset, pad_id, shape, args.warmup + args.steps)
    mesh = one_process_mesh()
    model = lora_model(SMALL_VOCAB, mesh, THROUGHPUT_CHECKPOINTING).eval()
    check = max_logprob_difference(model, batches[0], padded(batches[0], args.padded_pairs, pad_id))
    load = os.getloadavg()[0]
    results, attention = time_layouts(batches, pad_id, mesh, args)
    pairs = statistics.mean(len(b.global_sample_lengths) // 2 for b in batches[args.warmup :])
    print(
        f"\nPart 1: LoRA-DPO step, one process, 1 thread, float32; {pairs:.1f} pairs per step "
        f"({shape.rows} packed rows x {shape.seq_len}), {args.warmup} warm-up + {args.steps} timed steps "
        f"(median); load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'layout':<30}{'tok/step':>9}{'slots/step':>11}{'real':>6}{'attn M':>8}{'tok/s wall':>11}"
        f"{'tok/s CPU':>10}"
    )
    for r in results:
        tokens, slots = statistics.mean(r.tokens), statistics.mean(r.slots)
        print(
            f"{r.name:<30}{tokens:>9.0f}{slots:>11.0f}{tokens / slots:>6.0%}{attention[r.name] / 1e6:>8.1f}"
            f"{r.tokens_per_s('wall'):>11.0f}{r.tokens_per_s('cpu'):>10.0f}"
        )
    packed_result, padded_result = results
    ratios = [packed_result.tokens_per_s(c) / padded_result.tokens_per_s(c) for c in ("wall", "cpu")]
    print(f"packed / padded: {ratios[0]:.2f}x wall, {ratios[1]:.2f}x CPU")
    print(f"check: per-sample log-probabilities of batch 1 agree between the layouts to {check:.1e}")


# Part 2: memory ------------------------------------------------------------------------------------------


def predicted_bytes(config: LlamaConfig | str, lora: bool, **setup: object) -> int:
    """Planner bytes per rank of a DPO step: `plan` of the policy's step, plus for full weights the
    reference copy's parameters (sharded like the policy, in the compute dtype)."""
    result = plan(config, lora=lora, optimizer=(LORA_OPTIMIZER if lora else FULL_OPTIMIZER).name, **setup)
    shards = result.setup["dp_shard"] * result.setup["tp"]
    reference = 0 if lora else result.parameters * DTYPE_BYTES[result.setup["param_dtype"]] / shards
    return round(result.gpu_bytes_per_rank + reference)


PLANNED_8B = {
    "1 node (8 GPUs)": {"gpus_per_node": 8},
    "1 GPU": {"gpus_per_node": 1},
}
"""Llama 3.1 8B setups planned in part 2; the rest is the planner's defaults (8K tokens, bfloat16 compute,
float32 masters, full activation checkpointing, LoRA r 32)."""


def planner_table() -> None:
    print("Llama 3.1 8B, 8K tokens: predicted GiB per GPU")
    print(
        f"{'setup':<20}{'LoRA-DPO':>10}{'full DPO + ref':>16}{'full / LoRA':>13}{'fits 80 GiB (LoRA/full)':>25}"
    )
    for name, setup in PLANNED_8B.items():
        lora, full = (predicted_bytes("llama3.1-8b", lora, **setup) for lora in (True, False))
        fits = "/".join("yes" if b <= 80 * GIB else "no" for b in (lora, full))
        print(f"{name:<20}{lora / GIB:>10.1f}{full / GIB:>16.1f}{full / lora:>12.2f}x{fits:>25}")
    print(
        "LoRA-DPO: python -m hermes.plan --preset llama3.1-8b --lora --optimizer rmsprop [--gpus-per-node 1]\n"
        "full DPO + ref: python -m hermes.plan --preset llama3.1-8b [--gpus-per-node 1], plus the reference "
        "copy: 8.03B parameters x 2 bytes / GPUs"
    )


def _resident_peak_bytes() -> int:
    """This process's resident-set high-water mark (VmHWM; unlike `ru_maxrss`, not inherited from the
    parent that spawned it)."""
    line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _measure_variant(variant: str, batches: list[StepBatch], how: str) -> tuple[int | None, int]:
    """In a fresh process: the peak growth (bytes) of building `variant` and running its steps, by `how`
    ("rss" or "allocator"; None where the RSS mark cannot be reset), and the process's peak resident set."""
    mesh = one_process_mesh()

    def run() -> None:
        step = VARIANTS[variant](SMALL_VOCAB, mesh, MEMORY_CHECKPOINTING)
        for batch in batches:
            step(batch)

    growth = rss_peak(run) if how == "rss" else allocator_peak(run)
    dist.destroy_process_group()
    return growth, _resident_peak_bytes()


def memory(args: argparse.Namespace) -> None:
    shape = Shape(args.seq_len, rows=1, micro_batch=1)
    dataset, pad_id = preference_dataset(shape.seq_len)
    batches = packed_batches(dataset, pad_id, shape, args.memory_steps)
    small_setup = {
        "gpus_per_node": 1,
        "seq_len": shape.seq_len,
        "param_dtype": "float32",
        "activation_checkpointing": MEMORY_CHECKPOINTING,
        "gpu_overhead_gib": 0.0,
    }
    print(
        f"\nPart 2: memory of LoRA-DPO (one model, adapter r {LORA.rank}, RMSProp) against full-weights DPO "
        "(policy + frozen reference copy, AdamW)\n"
    )
    planner_table()
    print(
        f"\nSmall model on CPU, float32, 1 process: building the model(s) and optimizer, then "
        f"{args.memory_steps} steps of 1 packed row x {shape.seq_len}; MiB, each in a fresh process\n"
    )
    columns = ("predicted", "allocator", "RSS growth", "peak RSS")
    print(f"{'variant':<22}" + "".join(f"{c:>11}" for c in columns))
    measured = {}
    for variant in VARIANTS:
        allocator, _ = run_on_processes(_measure_variant, 1, variant, batches, "allocator")[0]
        rss, peak = run_on_processes(_measure_variant, 1, variant, batches, "rss")[0]
        predicted = predicted_bytes(SMALL_VOCAB, variant == "LoRA-DPO", **small_setup)
        measured[variant] = (predicted, allocator, rss, peak)
        print(f"{variant:<22}" + "".join(_mib(v) for v in measured[variant]), flush=True)
    lora, full = measured.values()
    ratios = [f"{f / lo:>10.2f}x" if f and lo else f"{'n/a':>11}" for f, lo in zip(full, lora)]
    print(f"{'full / LoRA':<22}" + "".join(ratios))


def _mib(size: int | None) -> str:
    return f"{size / MIB:>11.1f}" if size is not None else f"{'n/a':>11}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per packed row (default 1024)")
    parser.add_argument("--rows", type=int, default=4, help="packed rows per step (default 4)")
    parser.add_argument("--micro-batch", type=int, default=2, help="packed rows per forward (default 2)")
    parser.add_argument(
        "--padded-pairs", type=int, default=4, help="pairs per padded forward (default 4: 8 rows)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    parser.add_argument(
        "--memory-steps", type=int, default=2, help="steps of the memory measurement (default 2)"
    )
    parser.add_argument("--skip-throughput", action="store_true", help="part 2 only")
    parser.add_argument("--skip-memory", action="store_true", help="part 1 only")
    args = parser.parse_args()
    if args.rows % args.micro_batch:
        parser.error(f"--rows ({args.rows}) must be a multiple of --micro-batch ({args.micro_batch})")
    if args.steps < 1 or args.warmup < 0 or args.memory_steps < 1:
        parser.error("--steps and --memory-steps must be at least 1 and --warmup at least 0")
    if not args.skip_throughput:
        throughput(args)
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()
