"""SFT step throughput on 1, 2 and 4 CPU processes (gloo) under FSDP2 and tensor parallelism, as ratios
against 1 process measured in the same run.

Every layout trains the same global batches (the bundled SFT example, Hermes ChatML with the Llama 3
tokenizer, packed by `PackedLoader` into --rows rows of --seq-len tokens, micro-batches of 1 row) from the
same initial weights, with hermes' own step (`sft_step`, then AdamW from `build_optimizer`). The model is
`SMALL_VOCAB` of benchmarks/_common.py (dim 512, 4 blocks, 8 heads, 4 kv heads, FFN 1536, a 4,096-token
vocabulary; token ids folded into it), parallelised in the order of `hermes.train.build.model`: tensor
parallel (with sequence and loss parallelism), then FSDP2 over the data-parallel ranks (over a mesh of 1
where there are none, as hermes does); activation checkpointing off (hermes' default). Each layout runs in
freshly spawned processes, 1 torch thread each.

Layouts: FSDP 1 (the baseline), FSDP 2, FSDP 4, TP 2, TP 4, FSDP 2 x TP 2.

Per timed step, over the ranks: wall time (the slowest rank's, after a barrier), CPU time of the slowest
rank (`time.process_time`: what the step would take if every rank had a core of its own and never waited
for another; an upper bound on the speed-up), and CPU time summed over the ranks (the whole job's cost).
The table gives medians over the timed steps of real tokens / those times. Where the machine has fewer
cores than a layout has processes (4 on the 2-core machine of benchmarks/README.md), wall-clock ratios
measure overheads, not speed-up.

Usage: python benchmarks/scaling.py [--seq-len 512] [--rows 4] [--warmup 1] [--steps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from _common import SMALL_VOCAB, fold_vocabulary
from train_step import SEED, Shape, bundled_dataset, hermes_step, step_batches, timed

from hermes.config import OptimConfig
from hermes.data.dataset import TokenizedDataset
from hermes.model import Llama, LlamaConfig
from hermes.parallel.fsdp import apply_fsdp
from hermes.parallel.mesh import Meshes, ParallelDims, build_mesh, init_distributed
from hermes.parallel.processes import run_on_processes
from hermes.parallel.tensor_parallel import apply_tensor_parallel
from hermes.train.optim import build_optimizer


@dataclass(frozen=True)
class Layout:
    processes: int
    tp: int = 1

    @property
    def dp(self) -> int:
        return self.processes // self.tp

    @property
    def name(self) -> str:
        if self.tp == 1:
            return f"FSDP {self.dp}"
        return f"TP {self.tp}" if self.dp == 1 else f"FSDP {self.dp} x TP {self.tp}"


LAYOUTS = (Layout(1), Layout(2), Layout(4), Layout(2, tp=2), Layout(4, tp=4), Layout(4, tp=2))
"""The first is the baseline."""


@dataclass
class RankTimes:
    """One rank's timed steps."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    first_loss: float = float("nan")
    """The step-1 loss of the whole global batch."""


@dataclass
class LayoutResult:
    layout: Layout
    tokens: list[int]
    """Real tokens of each timed step."""
    ranks: list[RankTimes]

    def _tokens_per_s(self, seconds_per_step: list[float]) -> float:
        return statistics.median(t / s for t, s in zip(self.tokens, seconds_per_step))

    @property
    def wall(self) -> float:
        """Tokens per second of wall time (the slowest rank's)."""
        return self._tokens_per_s([max(step) for step in zip(*(r.wall for r in self.ranks))])

    @property
    def cpu_slowest(self) -> float:
        """Tokens per CPU second of the rank that used the most."""
        return self._tokens_per_s([max(step) for step in zip(*(r.cpu for r in self.ranks))])

    @property
    def cpu_total(self) -> float:
        """Tokens per CPU second summed over the ranks."""
        return self._tokens_per_s([sum(step) for step in zip(*(r.cpu for r in self.ranks))])


def parallel_model(config: LlamaConfig, mesh: Meshes) -> Llama:
    """A freshly initialised model (the same weights on every rank), parallelised as
    `hermes.train.build.model` does with activation checkpointing off: tensor parallel, then FSDP2."""
    torch.manual_seed(SEED)
    model = Llama(config).train()
    if mesh.tp.size() > 1:
        apply_tensor_parallel(model, mesh.tp)
    return apply_fsdp(model, mesh.fsdp)


def _rank(
    layout: Layout,
    dataset: TokenizedDataset,
    pad_id: int,
    config: LlamaConfig,
    shape: Shape,
    steps: tuple[int, int],
) -> RankTimes:
    """One rank of `layout`: warm-up, then timed steps."""
    init_distributed()
    dims = ParallelDims(1, -1, layout.tp, layout.processes)
    mesh = build_mesh(dims)
    model = parallel_model(config, mesh)
    optimizer = build_optimizer(model, OptimConfig())
    warmup, timed_steps = steps
    batches = step_batches(dataset, pad_id, shape, warmup + timed_steps, mesh.dp_rank, dims.dp_size)
    times = RankTimes()
    for i, batch in enumerate(batches):
        dist.barrier()
        loss, wall, cpu = timed(hermes_step, model, optimizer, batch)
        if i == 0:  # each data-parallel rank holds its share; the tensor-parallel ranks of one agree
            total = torch.tensor([loss])
            dist.all_reduce(total, group=mesh.batch.get_group())
            times.first_loss = float(total)
        if i >= warmup:
            times.wall.append(wall)
            times.cpu.append(cpu)
    dist.barrier()
    dist.destroy_process_group()
    return times


def measure(
    layout: Layout, dataset: TokenizedDataset, pad_id: int, shape: Shape, args: argparse.Namespace
) -> LayoutResult:
    steps = (args.warmup, args.steps)
    ranks = run_on_processes(_rank, layout.processes, layout, dataset, pad_id, SMALL_VOCAB, shape, steps)
    tokens = [b.global_real_tokens for b in step_batches(dataset, pad_id, shape, args.warmup + args.steps)]
    return LayoutResult(layout, tokens[args.warmup :], ranks)


def print_table(results: list[LayoutResult]) -> None:
    """Throughput of each layout and its ratio to the baseline (the first), then a one-line reading."""
    base = results[0]
    print(f"{'':<22}{'tokens/s':<31}ratio to {base.layout.name}")
    print(
        f"{'layout':<16}{'procs':>6}{'wall':>7}{'CPU slowest':>12}{'CPU all':>9}   {'wall':>6}{'CPU slowest':>12}"
        f"{'CPU all':>9}{'loss step 1':>13}"
    )
    for r in results:
        print(
            f"{r.layout.name:<16}{r.layout.processes:>6}{r.wall:>7.0f}{r.cpu_slowest:>12.0f}{r.cpu_total:>9.0f}"
            f"   {r.wall / base.wall:>5.2f}x{r.cpu_slowest / base.cpu_slowest:>11.2f}x"
            f"{r.cpu_total / base.cpu_total:>8.2f}x{r.ranks[0].first_loss:>13.4f}"
        )
    print(reading(results))
    losses = [r.ranks[0].first_loss for r in results]
    if max(losses) - min(losses) > 1e-3:
        print(f"WARNING: the step-1 losses differ ({losses}): the layouts do not compute the same step")


def reading(results: list[LayoutResult]) -> str:
    """One line: the CPU cost of splitting, the best use of the ranks, and what wall time means here."""
    base, others = results[0], results[1:]
    best = max(others, key=lambda r: r.cpu_slowest / base.cpu_slowest / r.layout.processes)
    overheads = [base.cpu_total / r.cpu_total for r in others]
    oversubscribed = max(r.layout.processes for r in results) > (os.cpu_count() or 1)
    return (
        f"Reading: per token the ranks together spend {min(overheads):.2f}-{max(overheads):.2f}x the CPU time "
        f"of 1 rank (the cost of splitting the step); at best ({best.layout.name}) the slowest rank's CPU "
        f"time gives {best.cpu_slowest / base.cpu_slowest:.2f}x of an ideal {best.layout.processes}x"
        + (
            f"; {os.cpu_count()} cores are oversubscribed, so wall-clock ratios measure overheads, not speed-up."
            if oversubscribed
            else "."
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per packed row (default 512)")
    parser.add_argument(
        "--rows", type=int, default=4, help="packed rows per step, the global batch (default 4)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    args = parser.parse_args()
    largest_dp = max(layout.dp for layout in LAYOUTS)
    if args.rows % largest_dp or args.seq_len % max(layout.tp for layout in LAYOUTS):
        parser.error(f"--rows must divide by {largest_dp} data-parallel ranks and --seq-len by 4 TP ranks")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    shape = Shape(args.seq_len, args.rows, micro_batch=1)
    dataset, pad_id = fold_vocabulary(*bundled_dataset(shape.seq_len), SMALL_VOCAB.vocab_size)
    with torch.device("meta"):
        params = sum(p.numel() for p in Llama(SMALL_VOCAB).parameters())
    load = os.getloadavg()[0]
    results = []
    for layout in LAYOUTS:
        print(f"{layout.name} ({layout.processes} processes) ...", flush=True)
        results.append(measure(layout, dataset, pad_id, shape, args))
    print(
        f"\nSFT step on CPU ranks (gloo, 1 thread each), float32: dim {SMALL_VOCAB.dim}, {SMALL_VOCAB.n_layers} "
        f"blocks, vocabulary {SMALL_VOCAB.vocab_size} ({params / 1e6:.1f}M parameters), {shape.rows} packed "
        f"rows x {shape.seq_len} per step, {args.warmup} warm-up + {args.steps} timed steps (median), "
        f"torch {torch.__version__}, {os.cpu_count()} cores, load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print_table(results)


if __name__ == "__main__":
    main()
