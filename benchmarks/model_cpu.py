"""Forward + backward on CPU: hermes' Llama against transformers' LlamaForCausalLM.

Both models hold the same weights (hermes' initialisation, copied under Hugging Face names) and see the same
batch; transformers runs eager attention, both run float32. Each timed run is one forward and backward of
the mean token cross-entropy, as a training step computes it (optimizer excluded). The runs of the variants
are interleaved, so a load change on the machine touches all of them alike; the median of each is reported
with its ratio to transformers, beside the fastest run and the median process CPU time (both
distorted less than the median wall time when other work shares the machine), and the FLOPs of one step
(torch's FlopCounterMode; it does not count the CPU flash-attention kernel of hermes' SDPA call, so
hermes' figures leave attention out while transformers' eager attention products are counted).

hermes variants:
- "labels": the training path, `model(tokens, labels=...)`: the output head and float32 log-softmax run in
  chunks of LOGPROB_CHUNK_TOKENS, recomputed in backward, so full float32 logits never exist at once;
- "logits": full logits, then `F.cross_entropy` (what transformers does).

Usage: python benchmarks/model_cpu.py [--preset tiny] [--batch 2] [--seq 512] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers
from torch.utils.flop_counter import FlopCounterMode

from hermes.data.sample import IGNORE_INDEX
from hermes.model import Llama, LlamaConfig
from hermes.model.hf import hf_state_dict


def transformers_twin(model: Llama) -> transformers.LlamaForCausalLM:
    """transformers' LlamaForCausalLM with the same configuration and weights, eager attention."""
    config = transformers.LlamaConfig(**model.config.to_hf())
    config._attn_implementation = "eager"
    twin = transformers.LlamaForCausalLM(config)
    twin.load_state_dict(hf_state_dict(model.state_dict()))
    return twin.train()


def steps(model: Llama, twin: transformers.LlamaForCausalLM, tokens: torch.Tensor) -> dict[str, Callable]:
    """One forward + backward of the mean token cross-entropy per variant; each returns the loss."""
    labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], IGNORE_INDEX)], dim=1)
    labelled = int((labels != IGNORE_INDEX).sum())

    def hermes_labels() -> float:
        loss = -model(tokens, labels=labels).sum() / labelled
        loss.backward()
        return loss.item()

    def hermes_logits() -> float:
        logits = model(tokens).float()
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        return loss.item()

    def hf() -> float:
        loss = twin(input_ids=tokens, labels=tokens).loss
        loss.backward()
        return loss.item()

    return {"hermes (labels)": hermes_labels, "hermes (logits)": hermes_logits, "transformers": hf}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant, after one warm-up")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()

    torch.manual_seed(0)
    config = LlamaConfig.preset(args.preset)
    model = Llama(config).train()
    twin = transformers_twin(model)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    variants = steps(model, twin, tokens)

    # Warm-up, untimed: counts each variant's FLOPs and checks that all compute the same loss.
    losses, gflops = {}, {}
    for name, step in variants.items():
        with FlopCounterMode(display=False) as counter:
            losses[name] = step()
        gflops[name] = counter.get_total_flops() / 1e9
    spread = max(losses.values()) - min(losses.values())
    assert spread < 1e-4, f"the variants disagree on the loss: {losses}"
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.runs):
        for name, step in variants.items():
            model.zero_grad(set_to_none=True)
            twin.zero_grad(set_to_none=True)
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)

    params = sum(p.numel() for p in model.parameters())
    print(
        f"preset {args.preset} ({params / 1e6:.1f}M parameters), batch {args.batch} x {args.seq} tokens, "
        f"float32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {args.runs} runs, loss {losses['transformers']:.4f}"
    )
    summary = {
        name: (statistics.median(wall[name]), min(wall[name]), statistics.median(cpu[name]))
        for name in variants
    }
    reference = summary["transformers"]
    print(
        f"{'variant':<16}{'GFLOP':>6}{'wall median s':>14}{'wall min s':>11}{'CPU median s':>13}"
        "   / transformers (wall median, wall min, CPU median)"
    )
    for name, figures in summary.items():
        ratios = ", ".join(f"{ours / theirs:.2f}" for ours, theirs in zip(figures, reference))
        median, fastest, cpu_median = figures
        print(f"{name:<16}{gflops[name]:>6.0f}{median:>14.3f}{fastest:>11.3f}{cpu_median:>13.3f}   {ratios}")


if __name__ == "__main__":
    main()
