"""Local lm-evaluation-harness tasks for tests: a JSONL of multiple-choice documents and its task YAML, written
the way lm-eval's ARC task is (the prompt ends in "Answer:" and lm-eval's `target_delimiter` " " comes
before each choice), so nothing is downloaded."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROMPT = "Question: {question}\nAnswer:"
"""lm-eval's ARC prompt; the task YAML writes it as a Jinja template."""


def write_task(
    folder: Path, name: str, docs: Sequence[dict[str, Any]], metrics: Sequence[str] = ("acc", "acc_norm")
) -> Path:
    """Write folder/NAME.jsonl (`docs`: {"question", "choices", "answer"}) and folder/NAME.yaml, the task
    `name` over it reporting `metrics`. Returns the YAML's path; `folder` is the `include_path`."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    config = {
        "task": name,
        "dataset_path": "json",
        # A datasets cache of the task's own, so that no run reads another's cached copy.
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / f"{name}-cache")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": PROMPT.replace("{question}", "{{question}}"),
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": " ",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
    }
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def hermes_context(question: str) -> str:
    """The context of the hermes.evaluate item lm-eval scores as PROMPT + " " + choice: the separating space
    at the end of the context, the choice as lm-eval's `doc_to_choice` gives it."""
    return PROMPT.format(question=question) + " "


def choice_loglikelihoods(results: dict[str, Any], task: str) -> list[list[float]]:
    """Per document (in document order), lm-eval's log-likelihood of each choice, from a
    `simple_evaluate(..., log_samples=True)` result."""
    samples = sorted(results["samples"][task], key=lambda sample: sample["doc_id"])
    return [[float(loglikelihood) for loglikelihood, _ in sample["filtered_resps"]] for sample in samples]
