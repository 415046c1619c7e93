"""Multiple-choice evaluation by log-likelihood, scored the way lm-evaluation-harness scores ARC, HellaSwag and
PIQA.

    python -m hermes.evaluate --model DIR [--adapter DIR] ITEMS.jsonl [--json] [--fp8 | --compare-fp8]

Each line of ITEMS.jsonl is an item {"context": str, "choices": [str, ...], "answer": int}. A choice is scored
as lm-eval's `hf` model scores a continuation: whitespace that ends the context is first moved to the front
of the choice ("Answer: " + "Paris" becomes "Answer:" + " Paris"); the choice's tokens are those of BOS +
context + choice, tokenized whole, past the tokens of BOS + context alone; its score is the sum of their
log-probabilities.

Where the separating space belongs. lm-eval's ARC and HellaSwag tasks score their prompt, then their
`target_delimiter` " ", then the choice, and `acc_norm` divides by `len(choice)`, the choice without that
space. Write such an item with the space at the end of the context ("Question: ...\nAnswer: " + "Paris"):
the tokens and the divisor are then lm-eval's, and so are `acc` and `acc_norm`. With the space inside the
choice ("Question: ...\nAnswer:" + " Paris") the tokens are the same, so `acc` does not change, but
`acc_norm` divides by one more character than lm-eval's ARC does.

- `acc`: the choice with the highest summed log-probability is the answer.
- `acc_norm`: the same with each sum divided by the choice's length in characters (`len(choice)`, the string
  as given, before any moved whitespace) — lm-eval's `acc_norm`; its `acc_bytes` would divide by UTF-8 bytes.

All choices of an item go through the model in one batched forward pass.

`--fp8` scores the model as its FP8 export runs (hermes.model.fp8_linear: float8 block projections with
per-channel scales, activations quantised per token; LoRA adapters merged first). `--compare-fp8` scores
the model as loaded and then its FP8 simulation, and prints them side by side with the mean change of
each choice's log-likelihood and the size of the FP8 export against the 16-bit one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hermes.data.chat_files import check_vocabulary
from hermes.data.sample import IGNORE_INDEX
from hermes.data.tokenizer import Tokenizer
from hermes.generate import load_chat_format, load_model
from hermes.model import Llama
from hermes.model.fp8_checkpoint import export_bytes
from hermes.model.fp8_linear import apply_fp8


@dataclass(frozen=True)
class Item:
    """One multiple-choice question; `source` is "file:line"."""

    context: str
    choices: tuple[str, ...]
    answer: int
    source: str = ""


@dataclass(frozen=True)
class ItemScore:
    """Per choice: summed log-probability and the per-character one; the picks under both."""

    logprobs: list[float]
    normalized: list[float]
    answer: int

    @property
    def predicted(self) -> int:
        return max(range(len(self.logprobs)), key=self.logprobs.__getitem__)

    @property
    def predicted_norm(self) -> int:
        return max(range(len(self.normalized)), key=self.normalized.__getitem__)


def read_items(path: str | os.PathLike) -> list[Item]:
    """The items of a JSONL file (blank lines skipped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not a JSON object, lacks a key or has a wrong value (file and line named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Items file {path} not found; pass a JSONL file of multiple-choice items")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            items.append(_parse_item(line, f"{path}:{number}"))
    if not items:
        raise ValueError(f"{path} holds no items; write one JSON object per line")
    return items


def _parse_item(line: str, source: str) -> Item:
    shape = 'write {"context": "...", "choices": ["...", "..."], "answer": <index>}'
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not valid JSON ({err.msg} at column {err.colno}); {shape}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{source}: the line is a JSON {type(record).__name__}, not an object; {shape}")
    context, choices, answer = record.get("context"), record.get("choices"), record.get("answer")
    if not isinstance(context, str):
        raise ValueError(f'{source}: "context" must be a string (got {context!r}); {shape}')
    if not isinstance(choices, list) or not choices:
        raise ValueError(f'{source}: "choices" must be a non-empty list of strings (got {choices!r})')
    if not all(isinstance(choice, str) and choice.strip() for choice in choices):
        raise ValueError(f"{source}: every choice must be a non-blank string (got {choices!r})")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(
            f'{source}: "answer" must be the index of the right choice, an integer in [0, {len(choices) - 1}] '
            f"(got {answer!r})"
        )
    return Item(context, tuple(choices), answer, source)


def _encode_pair(tokenizer: Tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """Context tokens (BOS first) and choice tokens, split as lm-eval splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, choice = context[:-spaces], context[-spaces:] + choice
    context_ids = tokenizer.encode(context, bos=True)
    whole = tokenizer.encode(context + choice, bos=True)
    return context_ids, whole[len(context_ids) :]


@torch.inference_mode()
def score_item(model: Llama, tokenizer: Tokenizer, item: Item) -> ItemScore:
    """Log-likelihood of each choice of `item` after its context (one forward pass over all choices).

    Raises:
        ValueError: a choice that adds no token after the context.
    """
    pairs = [_encode_pair(tokenizer, item.context, choice) for choice in item.choices]
    empty = [item.choices[i] for i, (_, ids) in enumerate(pairs) if not ids]
    if empty:
        raise ValueError(f"{item.source}: choices {empty!r} add no token after the context; rewrite them")
    width = max(len(context) + len(choice) for context, choice in pairs) - 1
    tokens = torch.zeros(len(pairs), width, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (context, choice) in enumerate(pairs):
        ids = torch.tensor(context + choice)
        tokens[row, : len(ids) - 1] = ids[:-1]  # right padding: causal attention never sees it
        labels[row, len(context) - 1 : len(ids) - 1] = ids[len(context) :]  # the target of position t
    device = model.output.weight.device
    logprobs = model(tokens.to(device), labels=labels.to(device)).sum(dim=1).tolist()
    normalized = [lp / len(choice) for lp, choice in zip(logprobs, item.choices)]
    return ItemScore(logprobs, normalized, item.answer)


def accuracy(scores: Sequence[ItemScore]) -> dict[str, float]:
    """{"acc", "acc_norm"}: the fraction of items whose pick (by sum, by per-character) is the answer."""
    return {
        "acc": sum(s.predicted == s.answer for s in scores) / len(scores),
        "acc_norm": sum(s.predicted_norm == s.answer for s in scores) / len(scores),
    }


def compare_fp8(model: Llama, tokenizer: Tokenizer, items: Sequence[Item]) -> dict[str, Any]:
    """Score `items` with `model`, then with its FP8 simulation (the model's projections are swapped in place).

    Returns:
        {"items", "dtype": the model's dtype, "reference" and "fp8": their `accuracy`,
        "mean_logprob_change": the mean over all choices of (FP8 - reference) summed log-probability,
        "size_ratio": FP8 export bytes / 16-bit export bytes (`export_bytes`), "scores": per item, both}.
    """
    reference = [score_item(model, tokenizer, item) for item in items]
    dense_bytes, fp8_bytes = export_bytes(model)
    dtype = str(model.output.weight.dtype).removeprefix("torch.")
    apply_fp8(model)
    quantized = [score_item(model, tokenizer, item) for item in items]
    changes = [q - r for a, b in zip(quantized, reference) for q, r in zip(a.logprobs, b.logprobs)]
    return {
        "items": len(items),
        "dtype": dtype,
        "reference": accuracy(reference),
        "fp8": accuracy(quantized),
        "mean_logprob_change": sum(changes) / len(changes),
        "size_ratio": fp8_bytes / dense_bytes,
        "scores": [
            {"reference": r.logprobs, "fp8": q.logprobs, "answer": r.answer}
            for r, q in zip(reference, quantized)
        ],
    }


def format_comparison(comparison: dict[str, Any], source: str) -> str:
    """The rows `--compare-fp8` prints: the 16-bit model and its FP8 simulation side by side."""
    ref, fp8 = comparison["reference"], comparison["fp8"]
    return "\n".join(
        [
            f"{source}: {comparison['items']} items",
            f"{'weights':<10} {'acc':>7} {'acc_norm':>9} {'mean dlogp':>11} {'size':>7}",
            f"{comparison['dtype']:<10} {ref['acc']:>7.4f} {ref['acc_norm']:>9.4f} {0.0:>11.4f} {1.0:>7.3f}",
            f"{'fp8':<10} {fp8['acc']:>7.4f} {fp8['acc_norm']:>9.4f} "
            f"{comparison['mean_logprob_change']:>11.4f} {comparison['size_ratio']:>7.3f}",
            "mean dlogp: mean change of a choice's summed log-likelihood; size: export bytes over the first row's",
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Score an items file; print the accuracies (or, with --json, a JSON report with every item's scores);
    with --compare-fp8, print (and return) `compare_fp8`'s comparison instead."""
    parser = argparse.ArgumentParser(prog="python -m hermes.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run directory or checkpoint directory")
    parser.add_argument("--adapter", help="PEFT LoRA adapter directory to apply on top")
    parser.add_argument("items", help="JSONL file of multiple-choice items")
    parser.add_argument("--json", action="store_true", help="print a JSON report")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    fp8 = parser.add_mutually_exclusive_group()
    fp8.add_argument("--fp8", action="store_true", help="score the FP8 simulation of the model")
    fp8.add_argument("--compare-fp8", action="store_true", help="score the model and its FP8 simulation")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    items = read_items(args.items)
    model = load_model(args.model, args.adapter, device=args.device, fp8=args.fp8)
    tokenizer = load_chat_format(args.model).tokenizer
    check_vocabulary(tokenizer, model.config.vocab_size, str(args.model))
    if args.compare_fp8:
        comparison = compare_fp8(model, tokenizer, items)
        print(json.dumps(comparison) if args.json else format_comparison(comparison, args.items))
        return comparison
    scores = [score_item(model, tokenizer, item) for item in items]
    result = {"items": len(scores), **accuracy(scores)}
    if args.json:
        report = {
            **result,
            "scores": [
                {"logprobs": s.logprobs, "normalized": s.normalized, "answer": s.answer} for s in scores
            ],
        }
        print(json.dumps(report))
    else:
        print(
            f"{args.items}: {len(scores)} items, acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f}"
        )
    return result


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
