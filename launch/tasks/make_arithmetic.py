"""Write the local lm-eval task `hermes_arithmetic` (arithmetic.yaml, arithmetic.jsonl): 60 multiple-choice
questions in the bundled SFT data's arithmetic form, each answer "a op b = c." against three wrong results.

    python launch/tasks/make_arithmetic.py [--out DIRECTORY] [--seed N]

The prompt is the ChatML turn the bundled data trains on (the user's question, then the assistant's header),
so that `python -m hermes.select --run RUN_DIR --tasks hermes_arithmetic --include-path launch/tasks`, run
from the repository root (the data file is named from there), scores the epochs of a run on the bundled
data offline. The questions are drawn like the bundled ones (small
integers, + - *), so some also occur in the training data: it shows the flow, it is no held-out benchmark.
The output is a pure function of the seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 1
QUESTIONS = 60
FORMS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?")
PROMPT = "<|im_start|>user\n{{question}}<|im_end|>\n<|im_start|>assistant\n"


def question(rng: random.Random) -> dict:
    """One item: the question, four choices (the right result and three near misses, shuffled), the answer."""
    op = rng.choice("+-*")
    a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(1, 99), rng.randint(1, 99))
    if op == "-" and b > a:
        a, b = b, a
    right = {"+": a + b, "-": a - b, "*": a * b}[op]
    wrong: set[int] = set()
    while len(wrong) < 3:
        miss = right + rng.choice([-10, -2, -1, 1, 2, 10, a, -b])
        if miss != right and miss >= 0:
            wrong.add(miss)
    results = [right, *sorted(wrong)]
    rng.shuffle(results)
    return {
        "question": rng.choice(FORMS).format(a=a, op=op, b=b),
        "choices": [f"{a} {op} {b} = {c}." for c in results],
        "answer": results.index(right),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    items = [question(rng) for _ in range(QUESTIONS)]
    data = args.out / "arithmetic.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    task = {
        "task": "hermes_arithmetic",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "launch/tasks/arithmetic.jsonl"}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": PROMPT,
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": "",
        "metric_list": [
            {"metric": metric, "aggregation": "mean", "higher_is_better": True}
            for metric in ("acc", "acc_norm")
        ],
    }
    (args.out / "arithmetic.yaml").write_text(json.dumps(task, indent=2) + "\n")  # JSON is YAML


if __name__ == "__main__":
    main()
