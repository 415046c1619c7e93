"""Forward + backward on CPU: hermes' Llama against transformers' LlamaForCausalLM and torchtitan's Llama 3.

All models hold the same weights (hermes' initialisation, copied under each one's names: Hugging Face's for
transformers; Meta's, with q and k rows permuted back to interleaved pairs, for torchtitan) and see the same
batch, in float32. Each timed run is one forward and backward of the mean token cross-entropy, as a training
step computes it (optimizer excluded).

Part 1, the variants:
- "hermes (labels)": the training path, `model(tokens, labels=...)`: the output head and float32
  log-softmax run on labelled tokens only (in one chunk here: float32 logits kept for backward);
- "hermes (logits)": full logits, then `F.cross_entropy` (what transformers and torchtitan do);
- "transformers eager" / "transformers sdpa": LlamaForCausalLM with each attention implementation;
- "torchtitan": torchtitan's Llama 3 `Transformer` (torchtitan 0.2.0, the `bench` extra) with its SDPA
  attention, full logits, then `F.cross_entropy` as torchtitan's loss computes it.
each on two label sets: every next token labelled, and SFT labels: each row a prompt (IGNORE_INDEX) then a
response, the response holding the fraction of labelled tokens that the bundled SFT data has under the
default configuration (`bundled_labelled_fraction`).
Part 2, hermes alone: the same samples as packed rows (`PackedBatch.from_rows`, attention kept inside each
sample) and padded, one sample per row right-padded to the longest (plain causal attention).

The runs are rotated: repetition r starts with the r-th variant, so a load change on this shared machine
touches every variant alike. Each timed run comes right after an untimed run of the same variant, as a
training step follows the previous step: in a plain rotation every variant would always follow the same
other one and start on the allocator and cache state that one left. Each variant reports its median and
fastest wall time and its median process CPU time (both distorted less than the median wall time when
other work shares the machine), and, for part 1, the FLOPs of one step (torch's FlopCounterMode; it does
not count the CPU flash-attention kernel behind SDPA, so every SDPA variant's figure leaves attention out,
while transformers' eager attention products are counted). The ratios come last.

--changes times hermes' training path alone instead, with each change to the step alone on the formulas it
replaced (as tests/test_model_numerics.py writes them, patched back in): all previous formulas, each change
alone on them, all changes (the model as it is), and all changes with fused q/k/v projections.

Shapes (--preset): any hermes preset ("tiny": dim 256, 4 blocks, the 128,256-token vocabulary), or "mid":
dim 512, 8 blocks, 8 heads / 4 kv heads, FFN 1,536, a 32,768-token vocabulary, where the blocks carry 60%
of the FLOPs instead of 11%.

Usage: python benchmarks/model_cpu.py [--preset tiny] [--batch 2] [--seq 512] [--runs 5] [--threads N]
    [--skip-packing] [--changes]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import math
import os
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hermes.config import Config
from hermes.data.packing import PackedBatch
from hermes.data.pipeline import build_sft_samples, bundled_example
from hermes.data.sample import IGNORE_INDEX, Sample
from hermes.model import Llama, LlamaConfig, RopeScaling
from hermes.model import llama as llama_module
from hermes.model import rope as rope_module
from hermes.model.hf import hf_state_dict
from hermes.model.llama import OutputHead, RMSNorm
from hermes.model.rope import RopeCache
from hermes.train.build import chat_format

MID = LlamaConfig(
    dim=512, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=1536, vocab_size=32768, max_seq_len=8192
)
"""58.7M parameters, 25.2M of them in the blocks, which do 60% of a step's FLOPs (the `tiny` preset's
128,256-token head does 89% of its)."""

SHAPES = {"mid": MID}


def model_config(name: str) -> LlamaConfig:
    return SHAPES[name] if name in SHAPES else LlamaConfig.preset(name)


# Peers ---------------------------------------------------------------------------------------------------


def transformers_twin(model: Llama, attention: str = "eager") -> transformers.LlamaForCausalLM:
    """transformers' LlamaForCausalLM with the same configuration and weights."""
    config = transformers.LlamaConfig(**model.config.to_hf())
    config._attn_implementation = attention
    twin = transformers.LlamaForCausalLM(config)
    twin.load_state_dict(hf_state_dict(model.state_dict()))
    return twin.train()


def _import_torchtitan_llama3() -> types.ModuleType:
    """torchtitan's Llama 3 model module, imported without the package `__init__`s above it.

    Those register torchtitan's training stack (float8 and MoE kernels that import triton, a GPU compiler
    with no use on CPU); the model module itself needs only torch and a few small packages. Each skipped
    package is entered in sys.modules as a bare namespace over its own folder, so the submodules the model
    imports load as usual.
    """
    spec = importlib.util.find_spec("torchtitan")
    if spec is None:
        raise SystemExit("torchtitan is not installed: see benchmarks/README.md, 'Model forward + backward'")
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, folder in (
        ("torchtitan", root),
        ("torchtitan.models", root / "models"),
        ("torchtitan.models.llama3", root / "models" / "llama3"),
    ):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules.setdefault(name, package)
    return importlib.import_module("torchtitan.models.llama3.model.model")


def halves_to_pairs(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k weight [n_heads * head_dim, dim] from the halves (i, i + head_dim/2) that hermes
    rotates to Meta's interleaved pairs (2i, 2i+1), which torchtitan rotates (the inverse of
    `hermes.model.hf.meta_qk_to_hf`)."""
    rows, dim = weight.shape
    head_dim = rows // n_heads
    # [heads, 2 halves, head_dim/2, dim] -> [heads, head_dim/2 pairs, 2 members, dim]
    return weight.view(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(rows, dim)


def torchtitan_twin(model: Llama) -> nn.Module:
    """torchtitan's Llama 3 Transformer with the same configuration and weights, SDPA attention.

    Raises:
        ValueError: a shape torchtitan 0.2.0's Llama 3 cannot express (tied head, head_dim other than
            dim / heads, RoPE without Llama 3.1 scaling, an FFN narrower than 8/3 dim).
    """
    llama3 = _import_torchtitan_llama3()
    c = model.config
    # torchtitan derives the FFN width: multiple_of * ceil(int(8 dim / 3) / multiple_of); with multiple_of
    # = hidden_dim that is hidden_dim itself whenever int(8 dim / 3) <= hidden_dim.
    fits = (
        not c.tie_word_embeddings
        and c.attention_head_dim * c.n_heads == c.dim
        and isinstance(c.rope_scaling, RopeScaling)
        and int(8 * c.dim / 3) <= c.hidden_dim
    )
    if not fits:
        raise ValueError(f"torchtitan 0.2.0's Llama 3 cannot express this shape: {c}")
    scaling = c.rope_scaling
    args = llama3.TransformerModelArgs(
        dim=c.dim,
        n_layers=c.n_layers,
        n_heads=c.n_heads,
        n_kv_heads=c.n_kv_heads,
        vocab_size=c.vocab_size,
        multiple_of=c.hidden_dim,
        ffn_dim_multiplier=None,
        norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        rope_scaling_args=llama3.RoPEScalingArgs(
            scaling_factor=scaling.factor,
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        ),
        max_seq_len=c.max_seq_len,
    )
    twin = llama3.Transformer(args)
    heads = {"attention.wq.weight": c.n_heads, "attention.wk.weight": c.n_kv_heads}
    state = {}
    for name, tensor in model.state_dict().items():
        n = next((n for suffix, n in heads.items() if name.endswith(suffix)), None)
        state[name] = halves_to_pairs(tensor, n) if n else tensor.clone()
    twin.load_state_dict(state, strict=True)
    return twin.train()


# Part 1: one step of each model ---------------------------------------------------------------------------


def shifted(targets: torch.Tensor) -> torch.Tensor:
    """Labels already shifted (the label of position t is target t + 1), IGNORE_INDEX at each row's end."""
    return torch.cat([targets[:, 1:], torch.full_like(targets[:, :1], IGNORE_INDEX)], dim=1)


def bundled_labelled_fraction() -> float:
    """The fraction of the bundled SFT data's tokens that carry a label, as the default configuration
    builds its samples (chat format, tool prompt, data.seq_len): the rest are prompt tokens."""
    config = Config()
    built = build_sft_samples(
        [bundled_example("sft.jsonl")], chat_format(config), config.data, config.run.seed
    )
    return sum(s.trained_tokens for s in built.samples) / sum(len(s) for s in built.samples)


def sft_targets(tokens: torch.Tensor, fraction: float) -> torch.Tensor:
    """Targets (unshifted, as transformers takes them) of rows that are a prompt then a response: each row's
    last `fraction` of positions labelled, the prompt before them IGNORE_INDEX."""
    targets = tokens.clone()
    targets[:, : tokens.shape[1] - round(fraction * tokens.shape[1])] = IGNORE_INDEX
    return targets


def model_steps(
    model: Llama, twins: dict[str, nn.Module], tokens: torch.Tensor, targets: torch.Tensor
) -> dict[str, Callable[[], float]]:
    """One forward + backward of the mean cross-entropy of the labelled tokens per variant; each returns the
    loss. `targets` [batch, seq] are the unshifted labels (the tokens themselves, IGNORE_INDEX where
    untrained)."""
    labels = shifted(targets)
    labelled = int((labels != IGNORE_INDEX).sum())

    def hermes_labels() -> float:
        loss = -model(tokens, labels=labels).sum() / labelled
        loss.backward()
        return loss.item()

    def logits_step(net: nn.Module) -> Callable[[], float]:
        def step() -> float:
            logits = net(tokens)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
            loss.backward()
            return loss.item()

        return step

    def transformers_step(twin: nn.Module) -> Callable[[], float]:
        def step() -> float:
            loss = twin(input_ids=tokens, labels=targets).loss  # transformers shifts the labels itself
            loss.backward()
            return loss.item()

        return step

    variants = {"hermes (labels)": hermes_labels, "hermes (logits)": logits_step(model)}
    for name, twin in twins.items():
        is_transformers = isinstance(twin, transformers.PreTrainedModel)
        variants[name] = transformers_step(twin) if is_transformers else logits_step(twin)
    return variants


# Changes to the step, each alone ---------------------------------------------------------------------------

CHANGES = ("RoPE table", "roll rotation", "one-op norm", "in-place log-softmax")
"""hermes' changes to the step, each with its previous formula in tests/test_model_numerics.py: RoPE tables
built once (per-forward rebuild), the rolled rotation with the signed sin (slice and concatenate), RMSNorm
as one op (three), the label log-softmax in the logits' buffer (`F.cross_entropy`)."""

FUSED_QKV = "fused qkv"


class FusedQKV:
    """One block's q, k and v projections as one matmul, as a fused wqkv weight would compute them, the
    three parameters kept as they are (so concatenated at every forward). Patched in as the forward of wq,
    which computes all three, and of wk and wv, which hand out theirs."""

    def __init__(self, attention: nn.Module) -> None:
        self.linears = (attention.wq, attention.wk, attention.wv)
        self.pending: list[torch.Tensor] = []

    def q(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.cat([linear.weight for linear in self.linears])
        q, *self.pending = F.linear(x, weight).split([linear.out_features for linear in self.linears], -1)
        return q

    def k_or_v(self, x: torch.Tensor) -> torch.Tensor:
        return self.pending.pop(0)


def _previous_formulas() -> types.ModuleType:
    """tests/test_model_numerics.py, where the previous formulas are written (and tested against the model's)."""
    sys.path.append(str(Path(__file__).resolve().parents[1]))
    return importlib.import_module("tests.test_model_numerics")


def with_changes(
    model: Llama, changes: frozenset[str], previous: types.ModuleType
) -> Callable[[], contextlib.AbstractContextManager]:
    """A context in which `model` computes with `changes` (of CHANGES and FUSED_QKV) and the `previous`
    formulas (`_previous_formulas`) of the other CHANGES. Each context keeps its own RoPE tables."""
    c = model.config
    roll = "roll rotation" in changes
    if "RoPE table" in changes:
        rope = RopeCache(c.attention_head_dim, c.rope_theta, c.rope_scaling)  # its table: rope_cos_sin's
    else:
        rope = previous.PerForwardRope(c, rope_module.rope_cos_sin if roll else previous.plain_cos_sin)

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with contextlib.ExitStack() as stack:

            def patch(target: object, name: str, value: object) -> None:
                stack.enter_context(mock.patch.object(target, name, value))

            patch(model, "rope", rope)
            if not roll:
                patch(llama_module, "apply_rope", previous.rotate_halves)
                patch(rope_module, "rope_cos_sin", previous.plain_cos_sin)  # the table RopeCache builds
            if "one-op norm" not in changes:
                patch(RMSNorm, "forward", lambda norm, x: previous.recipe_rmsnorm(x, norm.weight, norm.eps))
            if "in-place log-softmax" not in changes:
                patch(OutputHead, "chunk_logprobs", previous.cross_entropy_logprobs)
            if FUSED_QKV in changes:
                for layer in model.layers:
                    fused = FusedQKV(layer.attention)
                    patch(layer.attention.wq, "forward", fused.q)
                    patch(layer.attention.wk, "forward", fused.k_or_v)
                    patch(layer.attention.wv, "forward", fused.k_or_v)
            yield

    return context


def change_steps(model: Llama, tokens: torch.Tensor) -> dict[str, Callable[[], float]]:
    """hermes' training step on every next token: with the previous formulas, each change alone on them, all
    changes, and all with fused q/k/v projections; each returns the loss."""
    new = frozenset(CHANGES)
    sets = {"previous": frozenset()}
    sets |= {f"+ {change}": frozenset({change}) for change in CHANGES}
    sets |= {"all (new)": new, f"new + {FUSED_QKV}": new | {FUSED_QKV}}
    step = model_steps(model, {}, tokens, tokens)["hermes (labels)"]
    previous = _previous_formulas()

    def within(context: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], float]:
        def run() -> float:
            with context():
                return step()

        return run

    return {name: within(with_changes(model, changes, previous)) for name, changes in sets.items()}


# Part 2: packed rows against the same samples padded -----------------------------------------------------


def packed_and_padded(
    vocab_size: int, rows: int, seq: int, seed: int = 0
) -> tuple[PackedBatch, torch.Tensor, torch.Tensor]:
    """`rows` packed rows of `seq` tokens filled with random samples (lognormal lengths, median seq / 4,
    at least 16 tokens, every token trained), and the same samples one per row, right-padded to the longest.

    Returns:
        the packed batch, and the padded tokens and labels (shifted within each sample, IGNORE_INDEX on the
        last token and on padding: the targets of the packed batch).
    """
    rng = np.random.default_rng(seed)
    packed_rows: list[list[Sample]] = []
    for _ in range(rows):
        row, room = [], seq
        while room:
            length = min(room, max(16, int(rng.lognormal(math.log(seq / 4), 1.0))))
            length = room if room - length < 16 else length
            ids = rng.integers(0, vocab_size, length).tolist()
            row.append(Sample(ids, ids))
            room -= length
        packed_rows.append(row)
    samples = [sample for row in packed_rows for sample in row]
    width = max(len(sample) for sample in samples)
    tokens = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for i, sample in enumerate(samples):
        tokens[i, : len(sample)] = torch.tensor(sample.tokens)
        labels[i, : len(sample) - 1] = torch.tensor(sample.tokens[1:])
    return PackedBatch.from_rows(packed_rows, seq, pad_id=0), tokens, labels


def packing_steps(
    model: Llama, packed: PackedBatch, tokens: torch.Tensor, labels: torch.Tensor
) -> dict[str, Callable[[], float]]:
    """The training step of hermes on the packed rows and on the padded samples; each returns the loss."""
    labelled = packed.num_labelled

    def packed_step() -> float:
        loss = -model(packed.tokens, packed.packing, labels=packed.labels).sum() / labelled
        loss.backward()
        return loss.item()

    def padded_step() -> float:
        loss = -model(tokens, labels=labels).sum() / labelled
        loss.backward()
        return loss.item()

    return {"packed": packed_step, "padded": padded_step}


# Measurement ---------------------------------------------------------------------------------------------

Figures = tuple[float, float, float]
"""Median wall seconds, fastest wall seconds, median process CPU seconds."""


def warm_up(
    variants: dict[str, Callable[[], float]], reset: Callable[[], None]
) -> dict[str, tuple[float, float]]:
    """One untimed run of each variant: its loss and GFLOP; raises if the losses disagree."""
    results = {}
    for name, step in variants.items():
        reset()
        with FlopCounterMode(display=False) as counter:
            loss = step()
        results[name] = (loss, counter.get_total_flops() / 1e9)
    losses = [loss for loss, _ in results.values()]
    if max(losses) - min(losses) > 1e-4:
        raise AssertionError(f"the variants disagree on the loss: {results}")
    return results


def rotated_runs(
    variants: dict[str, Callable[[], float]], runs: int, reset: Callable[[], None]
) -> dict[str, Figures]:
    """`runs` timed runs of every variant, repetition r starting with the r-th variant (mod their count),
    each timed run right after an untimed one of the same variant."""
    names = list(variants)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            reset()
            variants[name]()
            reset()
            start, start_cpu = time.perf_counter(), time.process_time()
            variants[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {n: (statistics.median(wall[n]), min(wall[n]), statistics.median(cpu[n])) for n in names}


def ratios(ours: Figures, theirs: Figures) -> str:
    return "".join(f"{a / b:>11.3f}" for a, b in zip(ours, theirs))


def print_figures(figures: dict[str, Figures], extra: dict[str, str], extra_header: str) -> None:
    print(f"{'variant':<24}{extra_header}{'wall median s':>14}{'wall min s':>11}{'CPU median s':>13}")
    for name, (median, fastest, cpu_median) in figures.items():
        print(f"{name:<24}{extra[name]}{median:>14.3f}{fastest:>11.3f}{cpu_median:>13.3f}")


# Main ----------------------------------------------------------------------------------------------------

RATIO_HEADER = f"{'wall median':>11}{'wall min':>11}{'CPU median':>11}"


def ratio_lines(title: str, figures: dict[str, Figures], pairs: list[tuple[str, str]]) -> list[str]:
    """A table of figures[a] / figures[b] for each pair (a, b), headed by `title`."""
    names = [f"{a} / {b}" for a, b in pairs]
    width = max(len(name) for name in [title, *names]) + 2
    lines = [f"{title:<{width}}{RATIO_HEADER}"]
    return lines + [f"{name:<{width}}{ratios(figures[a], figures[b])}" for name, (a, b) in zip(names, pairs)]


def run_models(config: LlamaConfig, args: argparse.Namespace) -> list[str]:
    """Part 1 on both label sets; returns the lines of its ratio tables."""
    torch.manual_seed(0)
    model = Llama(config).train()
    twins: dict[str, nn.Module] = {
        "transformers eager": transformers_twin(model, "eager"),
        "transformers sdpa": transformers_twin(model, "sdpa"),
        "torchtitan": torchtitan_twin(model),
    }
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    fraction = bundled_labelled_fraction()
    label_sets = {
        "all labelled": (tokens, "every next token"),
        "SFT labels": (
            sft_targets(tokens, fraction),
            f"each row's last {fraction:.1%}, the bundled data's share",
        ),
    }

    def reset() -> None:
        for net in (model, *twins.values()):
            net.zero_grad(set_to_none=True)

    params = sum(p.numel() for p in model.parameters())
    print(
        f"Part 1: {args.preset} ({params / 1e6:.1f}M parameters), batch {args.batch} x {args.seq} tokens, "
        f"float32, {torch.get_num_threads()} threads, {args.runs} rotated runs"
    )
    pairs = [(ours, peer) for ours in ("hermes (labels)", "hermes (logits)") for peer in twins]
    lines: list[str] = []
    for title, (targets, which) in label_sets.items():
        variants = model_steps(model, twins, tokens, targets)
        warm = warm_up(variants, reset)
        figures = rotated_runs(variants, args.runs, reset)
        labelled = int((shifted(targets) != IGNORE_INDEX).sum())
        print(f"\n{title} ({which}): {labelled} labelled tokens, loss {warm['torchtitan'][0]:.4f}")
        print_figures(figures, {name: f"{gflop:>6.0f}" for name, (_, gflop) in warm.items()}, f"{'GFLOP':>6}")
        lines += ["", *ratio_lines(f"hermes / peer, {title}", figures, pairs)]
    return lines


def run_packing(config: LlamaConfig, args: argparse.Namespace) -> list[str]:
    """Part 2; returns the line of its ratio."""
    torch.manual_seed(0)
    model = Llama(config).train()
    packed, tokens, labels = packed_and_padded(config.vocab_size, args.batch, args.seq)
    variants = packing_steps(model, packed, tokens, labels)

    def reset() -> None:
        model.zero_grad(set_to_none=True)

    warm = warm_up(variants, reset)
    figures = rotated_runs(variants, args.runs, reset)
    lengths = packed.sample_lengths
    print(
        f"\nPart 2: hermes, {len(lengths)} samples of {min(lengths)}-{max(lengths)} tokens "
        f"({packed.num_real_tokens} in all), {args.runs} rotated runs, loss {warm['packed'][0]:.4f}"
    )
    shapes = {
        "packed": f"{f'{packed.rows} x {packed.seq_len}':>12}{packed.tokens.numel():>7}",
        "padded": f"{f'{tokens.shape[0]} x {tokens.shape[1]}':>12}{tokens.numel():>7}",
    }
    print_figures(figures, shapes, f"{'rows x width':>12}{'slots':>7}")
    return ["", *ratio_lines("packed / padded", figures, [("packed", "padded")])]


def run_changes(config: LlamaConfig, args: argparse.Namespace) -> list[str]:
    """hermes' training step with each change alone; returns the lines of its ratio table."""
    torch.manual_seed(0)
    model = Llama(config).train()
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    variants = change_steps(model, tokens)

    def reset() -> None:
        model.zero_grad(set_to_none=True)

    warm = warm_up(variants, reset)
    figures = rotated_runs(variants, args.runs, reset)
    print(
        f"Changes: hermes (labels), {args.preset}, batch {args.batch} x {args.seq} tokens, every next token "
        f"labelled, float32, {torch.get_num_threads()} threads, {args.runs} rotated runs, "
        f"loss {warm['previous'][0]:.4f}"
    )
    print_figures(figures, {name: "" for name in figures}, "")
    pairs = [(name, "previous") for name in list(figures)[1:-1]] + [(f"new + {FUSED_QKV}", "all (new)")]
    return ["", *ratio_lines("variant / baseline", figures, pairs)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help='a hermes preset or "mid" (default: tiny)')
    parser.add_argument("--batch", type=int, default=2, help="rows (default: 2)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per row (default: 512)")
    parser.add_argument(
        "--runs",
        type=int,
        default=5,
        help="timed runs per variant (each after an untimed one), after one warm-up",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--skip-packing", action="store_true", help="part 1 only")
    parser.add_argument("--changes", action="store_true", help="each change to hermes' step alone, only")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = model_config(args.preset)
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    print(f"{versions}, torchtitan {importlib.metadata.version('torchtitan')}, load average {_load()}")
    if args.changes:
        lines = run_changes(config, args)
    else:
        lines = run_models(config, args)
        if not args.skip_packing:
            lines += run_packing(config, args)
    print("\n".join(lines))
    print(f"load average at the end {_load()}")


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
