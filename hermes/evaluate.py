"""Multiple-choice evaluation by log-likelihood, scored the way lm-evaluation-harness scores ARC, HellaSwag and
PIQA.

    python -m hermes.evaluate --model DIR [--adapter DIR] ITEMS.jsonl [--json]

Each line of ITEMS.jsonl is an item {"context": str, "choices": [str, ...], "answer": int}. Every choice is
scored as the log-probability of its tokens after the context: BOS, the context, then the choice, with the text
concatenated as written (put the separating space in the choice, " Paris", or at the end of the context). As
lm-eval does, whitespace that ends the context is moved to the front of the choice before tokenizing (so
"Answer: " + "Paris" is scored as "Answer:" then " Paris"), and the choice's tokens are those of the whole
text after the context's own tokens.

- `acc`: the choice with the highest summed log-probability is the answer.
- `acc_norm`: the same with each sum divided by the choice's length in characters (`len(choice)`, the string
  as given, before any moved whitespace) — lm-eval's `acc_norm`; its `acc_bytes` would divide by UTF-8 bytes.

All choices of an item go through the model in one batched forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hermes.data.chat_files import check_vocabulary
from hermes.data.sample import IGNORE_INDEX
from hermes.data.tokenizer import Tokenizer
from hermes.generate import load_chat_format, load_model
from hermes.model import Llama


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


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Score an items file; print the accuracies (or, with --json, a JSON report with every item's scores)."""
    parser = argparse.ArgumentParser(prog="python -m hermes.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run directory or checkpoint directory")
    parser.add_argument("--adapter", help="PEFT LoRA adapter directory to apply on top")
    parser.add_argument("items", help="JSONL file of multiple-choice items")
    parser.add_argument("--json", action="store_true", help="print a JSON report")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    items = read_items(args.items)
    model = load_model(args.model, args.adapter, device=args.device)
    tokenizer = load_chat_format(args.model).tokenizer
    check_vocabulary(tokenizer, model.config.vocab_size, str(args.model))
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
