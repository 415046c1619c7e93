"""Throughput of the SFT training step (forward + backward + AdamW step), in real (non-pad) tokens per second.

CPU (the default), three variants on the same global batches of the bundled example data (rendered with
the Llama 3 tokenizer and the Hermes ChatML format, packed best-fit into rows of --seq-len tokens by
`PackedLoader`), all from the same initial weights:

- "hermes": the real step, `sft_step` over packed micro-batches of --micro-batch rows, then AdamW
  (`build_optimizer`), in this process with --threads threads;
- "transformers": the same samples through transformers' `LlamaForCausalLM` (float32, eager attention,
  same configuration and weights: `transformers_twin` of benchmarks/model_cpu.py), one sample per row padded to the longest of its micro-batch of
  --hf-micro-batch samples, labels -100 on prompt and pad, the loss summed over the micro-batches and
  divided by the step's labelled-token count (as the Trainer's gradient accumulation does), then
  `torch.optim.AdamW` with the same settings; in this process, interleaved step by step with "hermes" so
  that a change of load on the machine touches both alike;
- "hermes FSDP2": the real step on 2 processes (FSDP2 over gloo, 1 thread each), each computing its share
  of the same global batches.

Each variant runs --warmup steps, then --steps timed ones. Per timed step, tokens/s = the step's real
tokens / its time, on two clocks: wall time, and CPU time (`time.process_time`, the slower rank's for
2 processes), which time spent waiting for a CPU that other programs hold does not inflate (waits on the
other rank do not count either, so the 2-process CPU figure is an upper bound). The table gives the
median over timed steps. The step-1 losses of the three agree (same data and weights), which checks that
they compute the same thing.

CUDA (--device cuda): an "8B-shaped slice" (Llama 3.1 8B's shapes with --layers blocks, the full
vocabulary and head, bfloat16 weights, fused AdamW) on packed rows of --seq-len tokens, once per
attention backend in `available_backends` (each from the same weights), reporting tokens/s, MFU
(`training_flops`, with each sample's own length as the attention span, over `H100_BF16_PEAK_FLOPS`),
"MFU labelled" (the same less the output head on unlabelled tokens, which hermes does not compute; with
few layers the head is a large share of the FLOPs) and peak memory. A backend that runs out of memory is
reported as such and skipped.

Usage (defaults shown):
    python benchmarks/train_step.py [--preset tiny] [--seq-len 512] [--rows 2] [--warmup 1] [--steps 3]
    python benchmarks/train_step.py --device cuda [--preset llama3.1-8b] [--layers 4] [--seq-len 8192] \
        [--rows 1] [--warmup 2] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hermes.config import OptimConfig
from hermes.data.chat import ChatFormat
from hermes.data.dataset import TokenizedDataset
from hermes.data.loader import PackedLoader, StepBatch
from hermes.data.packing import fit_to_capacity
from hermes.data.pipeline import bundled_example
from hermes.data.records import read_conversations
from hermes.data.sample import IGNORE_INDEX
from hermes.data.tokenizer import Tokenizer
from hermes.model import Llama, LlamaConfig
from hermes.model.attention import available_backends
from hermes.parallel.fsdp import apply_fsdp
from hermes.parallel.mesh import ParallelDims, build_mesh, init_distributed
from hermes.parallel.processes import run_on_processes
from hermes.train.metrics import H100_BF16_PEAK_FLOPS, training_flops
from hermes.train.optim import build_optimizer, parameter_groups
from hermes.train.sft import sft_step
from hermes.train.trainer import micro_batches

SEED = 0
FSDP_PROCESSES = 2


# Data ----------------------------------------------------------------------------------------------------


def bundled_dataset(seq_len: int) -> tuple[TokenizedDataset, int]:
    """The bundled SFT example rendered as Hermes ChatML with the Llama 3 tokenizer, samples over `seq_len`
    truncated and those left with no trained token dropped. Returns the dataset and the pad id."""
    chat = ChatFormat(Tokenizer.default())
    rendered = [chat.render(c) for c in read_conversations([bundled_example("sft.jsonl")])]
    samples = [s for s in fit_to_capacity(rendered, seq_len).samples if s.trained_tokens]
    return TokenizedDataset.from_samples(samples), chat.tokenizer.pad_id


@dataclass(frozen=True)
class Shape:
    """How the benchmark batches the data."""

    seq_len: int
    rows: int
    """Packed rows per optimizer step (the global batch)."""
    micro_batch: int
    """Packed rows per forward/backward on one process."""


def step_batches(
    dataset: TokenizedDataset, pad_id: int, shape: Shape, count: int, rank: int = 0, world: int = 1
) -> list[StepBatch]:
    """This rank's share of the first `count` global batches (the same global batches for any world)."""
    loader = PackedLoader(dataset, shape.seq_len, shape.rows, shape.micro_batch, rank, world, SEED, pad_id)
    return [loader.next_batch() for _ in range(count)]


def unpacked_samples(batch: StepBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The samples of a packed step as (tokens, labels) in Hugging Face's convention: labels unshifted
    (the model shifts them), IGNORE_INDEX where untrained."""
    samples = []
    for micro in batch.micro_batches:
        for row, lengths in enumerate(micro.row_lengths):
            start = 0
            for length in lengths:
                tokens = micro.tokens[row, start : start + length]
                # Packed labels are already shifted: labels[t] is the target of token t, i.e. the sample's
                # label of token t + 1; nothing predicts the first token.
                shifted = micro.labels[row, start : start + length - 1]
                samples.append((tokens, torch.cat([shifted.new_full((1,), IGNORE_INDEX), shifted])))
                start += length
    return samples


@dataclass(frozen=True)
class PaddedBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def padded_micro_batches(
    samples: list[tuple[torch.Tensor, torch.Tensor]], micro_batch: int, pad_id: int
) -> list[PaddedBatch]:
    """Consecutive groups of `micro_batch` samples, each sample its own row, right-padded to the longest
    of its group (labels IGNORE_INDEX and attention mask 0 on pad)."""
    batches = []
    for start in range(0, len(samples), micro_batch):
        group = samples[start : start + micro_batch]
        width = max(len(tokens) for tokens, _ in group)
        input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        labels = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, (tokens, targets) in enumerate(group):
            input_ids[row, : len(tokens)] = tokens
            labels[row, : len(targets)] = targets
            mask[row, : len(tokens)] = 1
        batches.append(PaddedBatch(input_ids, mask, labels))
    return batches


# Steps ---------------------------------------------------------------------------------------------------


def hermes_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: StepBatch) -> float:
    """`sft_step` then the optimizer step; returns this rank's share of the step's loss."""
    loss = sft_step(model, batch, micro_batches(model, batch, torch.device("cpu")))["loss"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def transformers_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[PaddedBatch], labelled: int
) -> float:
    """Forward + backward of each padded micro-batch (summed token NLL over the step's `labelled` count),
    then the optimizer step; returns the step's mean token loss."""
    total = 0.0
    for b in batches:
        out = model(
            input_ids=b.input_ids,
            attention_mask=b.attention_mask,
            labels=b.labels,
            num_items_in_batch=labelled,
        )
        out.loss.backward()
        total += out.loss.item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def same_adamw(model: nn.Module, settings: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW with hermes' settings (decay on matrices only, foreach kernels)."""
    return torch.optim.AdamW(
        parameter_groups(model, settings.weight_decay),
        lr=settings.lr,
        betas=tuple(settings.betas),
        eps=settings.eps,
        foreach=True,
    )


# Measurement ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    """Timed steps of one variant."""

    name: str
    processes: int
    threads: int
    tokens: list[int] = field(default_factory=list)
    """Real tokens of each timed step."""
    slots: list[int] = field(default_factory=list)
    """Token positions computed in each timed step (pad included)."""
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    first_loss: float = float("nan")

    def record(self, tokens: int, slots: int, wall: float, cpu: float) -> None:
        """Add one timed step."""
        self.tokens.append(tokens)
        self.slots.append(slots)
        self.wall.append(wall)
        self.cpu.append(cpu)

    def tokens_per_s(self, clock: str) -> float:
        """Median over timed steps of real tokens / seconds on `clock` ("wall" or "cpu")."""
        seconds = self.wall if clock == "wall" else self.cpu
        return statistics.median(t / s for t, s in zip(self.tokens, seconds))


def timed(fn: Callable[..., float], *args: Any) -> tuple[float, float, float]:
    """Run `fn(*args)`; return its value, wall seconds and this process's CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn(*args)
    return value, time.perf_counter() - wall, time.process_time() - cpu


def packed_slots(batch: StepBatch) -> int:
    return sum(micro.tokens.numel() for micro in batch.micro_batches)


def run_single_process(
    dataset: TokenizedDataset, pad_id: int, config: LlamaConfig, shape: Shape, args: argparse.Namespace
) -> list[Result]:
    """hermes and (unless --skip-transformers) transformers in this process, interleaved step by step."""
    torch.manual_seed(SEED)
    model = Llama(config).train()
    settings = OptimConfig()
    optimizer = build_optimizer(model, settings)
    threads = torch.get_num_threads()
    hermes = Result("hermes (packed)", 1, threads)
    baseline = Result(f"transformers (padded, {args.hf_micro_batch}/micro)", 1, threads)
    twin = twin_optimizer = None
    if not args.skip_transformers:
        import transformers
        from model_cpu import transformers_twin  # the sibling benchmark's: same weights, eager attention

        transformers.logging.set_verbosity_error()
        twin = transformers_twin(model)
        twin_optimizer = same_adamw(twin, settings)
    for i, batch in enumerate(step_batches(dataset, pad_id, shape, args.warmup + args.steps)):
        runs = [(hermes, timed(hermes_step, model, optimizer, batch), packed_slots(batch))]
        if twin is not None:
            padded = padded_micro_batches(unpacked_samples(batch), args.hf_micro_batch, pad_id)
            labelled = batch.global_labelled_tokens
            outcome = timed(transformers_step, twin, twin_optimizer, padded, labelled)
            runs.append((baseline, outcome, sum(b.input_ids.numel() for b in padded)))
        for result, (loss, wall, cpu), slots in runs:
            if i == 0:
                result.first_loss = loss
            if i >= args.warmup:
                result.record(batch.global_real_tokens, slots, wall, cpu)
        warm_up = " (warm-up)" if i < args.warmup else ""
        walls = ", ".join(f"{r.name.split()[0]} {wall:.2f} s" for r, (_, wall, _), _ in runs)
        print(f"  step {i + 1}{warm_up}: {walls} (wall)", flush=True)
    return [hermes] if twin is None else [hermes, baseline]


def _fsdp_worker(
    dataset: TokenizedDataset, pad_id: int, config: LlamaConfig, shape: Shape, steps: tuple[int, int]
) -> dict:
    """One of FSDP_PROCESSES processes: the real step on this rank's share; returns the timings (each
    step's slowest rank)."""
    init_distributed()
    mesh = build_mesh(ParallelDims(1, -1, 1, FSDP_PROCESSES))
    torch.manual_seed(SEED)
    model = apply_fsdp(Llama(config).train(), mesh.fsdp)
    optimizer = build_optimizer(model, OptimConfig())
    warmup, timed_steps = steps
    batches = step_batches(dataset, pad_id, shape, warmup + timed_steps, mesh.dp_rank, FSDP_PROCESSES)
    result = Result("hermes FSDP2 gloo (packed)", FSDP_PROCESSES, 1)
    for i, batch in enumerate(batches):
        dist.barrier()
        loss, wall, cpu = timed(hermes_step, model, optimizer, batch)
        slowest = torch.tensor([wall, cpu])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        total_loss = torch.tensor([loss])
        dist.all_reduce(total_loss)
        if i == 0:
            result.first_loss = float(total_loss)
        if i >= warmup:
            result.record(batch.global_real_tokens, shape.rows * shape.seq_len, *slowest.tolist())
    dist.barrier()
    dist.destroy_process_group()
    return result.__dict__


def run_fsdp(
    dataset: TokenizedDataset, pad_id: int, config: LlamaConfig, shape: Shape, args: argparse.Namespace
) -> Result:
    """The hermes step on FSDP_PROCESSES spawned processes (gloo)."""
    steps = (args.warmup, args.steps)
    results = run_on_processes(_fsdp_worker, FSDP_PROCESSES, dataset, pad_id, config, shape, steps)
    return Result(**results[0])


def print_cpu_table(results: list[Result], header: str) -> None:
    """The table, then the ratios: hermes / transformers (1 process) and 2 processes / 1 process."""
    print(header)
    print(
        f"{'variant':<34}{'procs':>6}{'thr':>4}{'tok/step':>9}{'slots/step':>11}"
        f"{'tok/s wall':>11}{'tok/s CPU':>10}{'loss step 1':>12}"
    )
    for r in results:
        print(
            f"{r.name:<34}{r.processes:>6}{r.threads:>4}{statistics.mean(r.tokens):>9.0f}"
            f"{statistics.mean(r.slots):>11.0f}{r.tokens_per_s('wall'):>11.0f}{r.tokens_per_s('cpu'):>10.0f}"
            f"{r.first_loss:>12.4f}"
        )

    def ratio(a: Result, b: Result) -> str:
        wall = a.tokens_per_s("wall") / b.tokens_per_s("wall")
        return f"{wall:.2f}x wall, {a.tokens_per_s('cpu') / b.tokens_per_s('cpu'):.2f}x CPU"

    hermes, fsdp = results[0], results[-1]
    if len(results) == 3:
        print(f"hermes / transformers (1 process): {ratio(hermes, results[1])}")
    print(f"hermes 2 processes / 1 process:    {ratio(fsdp, hermes)}")
    losses = [r.first_loss for r in results]
    if max(losses) - min(losses) > 1e-3:
        print(f"WARNING: the step-1 losses differ ({losses}): the variants do not compute the same step")


def model_config(args: argparse.Namespace) -> LlamaConfig:
    config = LlamaConfig.preset(args.preset)
    return config.replace(n_layers=args.layers) if args.layers else config


def cpu_main(args: argparse.Namespace) -> None:
    """hermes on 1 and on FSDP_PROCESSES processes against transformers, float32."""
    torch.set_num_threads(args.threads)
    config = model_config(args)
    shape = Shape(args.seq_len, args.rows, args.micro_batch)
    dataset, pad_id = bundled_dataset(shape.seq_len)
    load = os.getloadavg()[0]
    print("1 process:", flush=True)
    results = run_single_process(dataset, pad_id, config, shape, args)
    print(f"hermes FSDP2, {FSDP_PROCESSES} processes ...", flush=True)
    results.append(run_fsdp(dataset, pad_id, config, shape, args))
    import transformers

    with torch.device("meta"):
        params = sum(p.numel() for p in Llama(config).parameters())
    print_cpu_table(
        results,
        f"\nSFT step on CPU, float32: preset {args.preset} ({params / 1e6:.1f}M parameters), "
        f"{shape.rows} packed rows x {shape.seq_len} per step (micro-batch {shape.micro_batch} rows), "
        f"{args.warmup} warm-up + {args.steps} timed steps (median), torch {torch.__version__}, "
        f"transformers {transformers.__version__}, load average {load:.1f} -> {os.getloadavg()[0]:.1f}",
    )


# CUDA ----------------------------------------------------------------------------------------------------


def cuda_main(args: argparse.Namespace) -> None:
    """Each available attention backend on an 8B-shaped slice, one process, bfloat16. Every backend starts
    from the same weights and a fresh optimizer, so their step-1 losses agree (to bfloat16 precision)."""
    device = torch.device("cuda")
    config = model_config(args)
    shape = Shape(args.seq_len, args.rows, args.micro_batch)
    dataset, pad_id = bundled_dataset(shape.seq_len)
    batches = step_batches(dataset, pad_id, shape, args.warmup + args.steps)
    torch.manual_seed(SEED)
    with device:
        model = Llama(config).to(torch.bfloat16).train()
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.preset} slice: {config.n_layers} layers, dim {config.dim}, {params / 1e9:.2f}B parameters, "
        f"bfloat16 weights and AdamW, {shape.rows} packed rows x {shape.seq_len} per step, {args.warmup} "
        f"warm-up + {args.steps} timed steps (median), {torch.cuda.get_device_name()}, torch {torch.__version__}"
    )
    print(
        f"{'backend':<12}{'tok/s':>10}{'MFU':>8}{'MFU labelled':>14}{'step s':>9}{'peak GiB':>10}"
        f"{'loss step 1':>13}"
    )
    for backend in available_backends(device, torch.bfloat16):
        model.load_state_dict(initial)
        model.set_attention_backend(backend)
        optimizer = build_optimizer(model, OptimConfig())
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        seconds, first_loss = [], float("nan")
        try:
            for i, batch in enumerate(batches):
                torch.cuda.synchronize()
                start = time.perf_counter()
                loss = hermes_step(model, optimizer, batch)
                torch.cuda.synchronize()
                first_loss = loss if i == 0 else first_loss
                if i >= args.warmup:
                    seconds.append(time.perf_counter() - start)
        except torch.cuda.OutOfMemoryError:
            print(f"{backend:<12}out of memory", flush=True)
            continue
        finally:
            optimizer.zero_grad(set_to_none=True)
            del optimizer
        timed_batches = batches[args.warmup :]
        tokens_per_s = median_rate(timed_batches, seconds, lambda b: b.global_real_tokens)
        flops = median_rate(timed_batches, seconds, lambda b: training_flops(config, b.global_sample_lengths))
        needed = median_rate(timed_batches, seconds, lambda b: labelled_head_flops(config, b))
        mfu, mfu_labelled = flops / H100_BF16_PEAK_FLOPS, needed / H100_BF16_PEAK_FLOPS
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(
            f"{backend:<12}{tokens_per_s:>10.0f}{mfu:>8.1%}{mfu_labelled:>14.1%}"
            f"{statistics.median(seconds):>9.3f}{peak:>10.1f}{first_loss:>13.4f}",
            flush=True,
        )


def median_rate(batches: list[StepBatch], seconds: list[float], work: Callable[[StepBatch], float]) -> float:
    """Median over steps of work(batch) / seconds."""
    return statistics.median(work(b) / s for b, s in zip(batches, seconds))


def labelled_head_flops(config: LlamaConfig, batch: StepBatch) -> float:
    """`training_flops` less the output head's 6 * dim * vocab FLOPs on every unlabelled token: the model
    FLOPs of hermes' step, which runs the head on labelled positions only."""
    unlabelled = batch.global_real_tokens - batch.global_labelled_tokens
    return (
        training_flops(config, batch.global_sample_lengths) - 6 * config.dim * config.vocab_size * unlabelled
    )


DEFAULTS = {
    "cpu": {"preset": "tiny", "layers": 0, "seq_len": 512, "rows": 2, "warmup": 1, "steps": 3},
    "cuda": {"preset": "llama3.1-8b", "layers": 4, "seq_len": 8192, "rows": 1, "warmup": 2, "steps": 5},
}
"""Per-device values of the options left unset on the command line."""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=tuple(DEFAULTS), default="cpu")
    parser.add_argument("--preset", help='model preset (default: "tiny" on CPU, "llama3.1-8b" on CUDA)')
    parser.add_argument(
        "--layers", type=int, help="transformer blocks (default: the preset's on CPU, 4 on CUDA)"
    )
    parser.add_argument(
        "--seq-len", type=int, help="tokens per packed row (default: 512 on CPU, 8192 on CUDA)"
    )
    parser.add_argument(
        "--rows", type=int, help="packed rows per optimizer step (default: 2 on CPU, 1 on CUDA)"
    )
    parser.add_argument(
        "--micro-batch", type=int, default=1, help="packed rows per forward/backward (default: 1)"
    )
    parser.add_argument(
        "--hf-micro-batch",
        type=int,
        default=4,
        help="samples per padded transformers micro-batch (default: 4)",
    )
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 1 on CPU, 2 on CUDA)")
    parser.add_argument("--steps", type=int, help="timed steps (default: 3 on CPU, 5 on CUDA)")
    parser.add_argument(
        "--skip-transformers", action="store_true", help="time hermes only (1 and 2 processes)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the 1-process CPU variants")
    args = parser.parse_args()
    for name, value in DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    if args.device == "cpu" and args.rows % (FSDP_PROCESSES * args.micro_batch):
        parser.error(
            f"--rows ({args.rows}) must be a multiple of {FSDP_PROCESSES} processes x --micro-batch "
            f"({args.micro_batch}) for the FSDP variant"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    (cuda_main if args.device == "cuda" else cpu_main)(args)


if __name__ == "__main__":
    main()
