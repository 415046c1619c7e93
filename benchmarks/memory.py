"""The memory planner against measured memory, and its answers for the Hermes 3 report's setups.

Part 1, on CPU: for each step below, on 1, 2 and 4 gloo processes (FSDP2 over all of them, 1 or 2 threads
each), one forward + backward is measured by `hermes.planning.measure` and compared with the planner's
`step_increase_bytes` for the same step (what the step adds on top of the resident parameters and optimizer
states). "allocator" is the peak of live bytes in torch's CPU allocator during the step (from torch.profiler's
memory records; the number the planner is checked against), "RSS" the growth of the resident set (the
kernel's high-water mark, reset before the step). Every rank is measured; the table gives the median and the
largest allocator peak over ranks, and the largest RSS growth.

- tiny (full): the `tiny` preset, 1 x 1024 tokens, full checkpointing: the 128,256-token output head and the
  gathered root unit (embedding + head) dominate.
- small (none) / small (selective): the `tiny` shape with a 4,096-token vocabulary, 1 x 2048 tokens, no /
  selective checkpointing: the blocks' activations dominate.
- wide (full): dim 1024, FFN 4096, 3 blocks, vocabulary 4,096, 1 x 256 tokens, full checkpointing: FSDP's
  gathered blocks, unsharded gradients and reduce-scatter buffers dominate.
- small LoRA r8 (none, dropout 0 / 0.05): LoRA of rank 8 on every projection, 1 x 1024 tokens.
- small bf16 (none): compute in bfloat16 (FSDP mixed precision), 1 x 1024 tokens.

Part 2: `python -m hermes.plan` for the report's setups (H100 80 GB, 8 per node, 2 TiB of RAM per node).

Usage: python benchmarks/memory.py [--ranks 1 2 4] [--no-rss]
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

from hermes.model import LlamaConfig
from hermes.plan import plan
from hermes.planning.measure import StepSpec, measure

MIB = 2**20
GIB = 2**30

TINY = LlamaConfig.preset("tiny")
SMALL = TINY.replace(vocab_size=4096)
WIDE = LlamaConfig(
    dim=1024, n_layers=3, n_heads=8, n_kv_heads=2, hidden_dim=4096, vocab_size=4096, max_seq_len=8192
)

STEPS = {
    "tiny (full)": StepSpec(TINY, 1024, "full"),
    "small (none)": StepSpec(SMALL, 2048, "none"),
    "small (selective)": StepSpec(SMALL, 2048, "selective"),
    "wide (full)": StepSpec(WIDE, 256, "full"),
    "small LoRA r8 dropout 0 (none)": StepSpec(SMALL, 1024, "none", lora_rank=8, lora_dropout=0.0),
    "small LoRA r8 dropout 0.05 (none)": StepSpec(SMALL, 1024, "none", lora_rank=8, lora_dropout=0.05),
    "small bf16 (none)": StepSpec(SMALL, 1024, "none", param_dtype="bfloat16"),
}
MULTI_RANK = ("tiny (full)", "small (none)", "wide (full)")
"""Steps also measured on 2 and 4 processes (the others on 1)."""

REPORT_SETUPS = {
    "405B, 7 nodes": {"preset": "llama3.1-405b", "nodes": 7},
    "405B, 7 nodes, CPU offload": {"preset": "llama3.1-405b", "nodes": 7, "cpu_offload": True},
    "405B, 7 nodes, offload, reduce bf16": {
        "preset": "llama3.1-405b",
        "nodes": 7,
        "cpu_offload": True,
        "reduce_dtype": "bfloat16",
    },
    "405B, 16 nodes": {"preset": "llama3.1-405b", "nodes": 16},
    "405B, 16 nodes, CPU offload": {"preset": "llama3.1-405b", "nodes": 16, "cpu_offload": True},
    "405B, 16 nodes, TP 8": {"preset": "llama3.1-405b", "nodes": 16, "tp": 8},
    "405B, 7 nodes, TP 8": {"preset": "llama3.1-405b", "nodes": 7, "tp": 8},
    "405B, 7 nodes, LoRA r32": {"preset": "llama3.1-405b", "nodes": 7, "lora": True},
    "70B, 6 nodes (48 GPUs)": {"preset": "llama3.1-70b", "nodes": 6},
    "8B, 6 nodes (48 GPUs)": {"preset": "llama3.1-8b", "nodes": 6},
    "8B, 1 node, no checkpointing": {"preset": "llama3.1-8b", "nodes": 1, "activation_checkpointing": "none"},
}


def measured_table(ranks_list: list[int], rss: bool) -> None:
    header = (
        f"{'step':<36}{'ranks':>6}{'predicted':>10}{'allocator':>10}{'max':>8}{'pred/alloc':>11}"
        f"{'pred/max':>9}{'RSS':>8}"
    )
    print(
        "MiB per rank; allocator = median over ranks, max = largest rank, RSS = largest rank's RSS growth\n"
    )
    print(header)
    print("-" * len(header))
    for ranks in ranks_list:
        names = list(STEPS) if ranks == 1 else list(MULTI_RANK)
        results = measure([STEPS[n] for n in names], ranks=ranks, rss=rss)
        for name, per_rank in zip(names, results):
            predicted = STEPS[name].plan(ranks).step_increase_bytes
            peaks = [r.allocator_peak for r in per_rank]
            median, largest = statistics.median(peaks), max(peaks)
            rss_text = f"{max(r.rss_peak for r in per_rank) / MIB:8.1f}" if rss else f"{'-':>8}"
            print(
                f"{name:<36}{ranks:>6}{predicted / MIB:10.1f}{median / MIB:10.1f}{largest / MIB:8.1f}"
                f"{predicted / median:11.3f}{predicted / largest:9.3f}{rss_text}"
            )


def report_table() -> None:
    header = (
        f"{'setup':<38}{'fits':>5}{'GPU GiB':>9}{'peak phase':>22}{'states':>8}{'activ.':>8}{'FSDP buf':>9}"
        f"{'node RAM GiB':>13}"
    )
    print(header)
    print("-" * len(header))
    for name, args in REPORT_SETUPS.items():
        result = plan(**args)
        g = result.gpu_breakdown
        states = g["parameters"] + g["gradients"] + g["optimizer_states"]
        print(
            f"{name:<38}{'yes' if result.fits else 'no':>5}{result.gpu_bytes_per_rank / GIB:9.1f}"
            f"{result.peak_phase:>22}{states / GIB:8.1f}{g['activations'] / GIB:8.1f}{g['fsdp_buffers'] / GIB:9.1f}"
            f"{result.cpu_bytes_per_node / GIB:13.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="process counts to measure")
    parser.add_argument("--no-rss", action="store_true", help="skip the resident-set measurement")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.processor() or platform.machine()}"
    )
    print(
        "\nPart 1: predicted vs measured growth of one forward + backward on CPU (FSDP2 on gloo, float32)\n"
    )
    measured_table(args.ranks, not args.no_rss)
    print(
        "\nPart 2: the planner on the Hermes 3 report's setups (H100 80 GiB, 8 GPUs and 2 TiB per node, 8K)\n"
    )
    report_table()


if __name__ == "__main__":
    main()
