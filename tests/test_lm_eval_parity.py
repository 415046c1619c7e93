"""hermes.evaluate against lm-evaluation-harness itself: the same tiny saved model (random weights, the Llama 3
tokenizer) scored on the same local items, by lm-eval's `hf` model and by `python -m hermes.evaluate`.

lm-eval scores the items through a local task written as its ARC task is (prompt "Question: ...\\nAnswer:",
`target_delimiter` " "); hermes reads them written the way its docstring says matches that: the separating
space at the end of the context."""

from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from hermes.data.chat import ChatFormat
from hermes.data.chat_files import save_chat_format
from hermes.data.tokenizer import Tokenizer
from hermes.evaluate import Item, accuracy, score_item
from hermes.evaluate import main as evaluate_main
from hermes.generate import load_chat_format, load_model
from hermes.model import Llama, LlamaConfig
from hermes.model.hf import save_pretrained
from tests.lm_eval_tasks import PROMPT, choice_loglikelihoods, hermes_context, write_task

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (it is in the test extra)")
pytestmark = pytest.mark.slow

TASK = "hermes_parity"
QUESTIONS = [
    "What colour is a clear sky?",
    "Which is the tallest mountain?",
    "What is water made of?",
    "Where is the Eiffel Tower?",
    "What do plants do with light?",
    "How much is a coffee?",
    "Which way does a compass needle point?",
    "What year did Orwell write about?",
]
CHOICES = [
    "7", "x", "no", "yes", "blue", "Paris", "1984", "café", "naïve", "über", "—", "42%", "H2O", "$3.50",
    "it's fine", "the dog", "(b) neither", "Mount Everest", "ten thousand", "a deep shade of red",
    "an elephant in the room", "photosynthesis", "oxygen and hydrogen", "north-west", "日本",
]  # fmt: skip
"""Choices of 1 to 23 characters: one or several tokens, digits, punctuation, and characters of 2 or 3 UTF-8
bytes (acc_norm divides by characters, not bytes)."""


def _documents() -> list[dict[str, Any]]:
    """32 items of 2 to 5 choices."""
    rng = random.Random(0)
    docs = []
    for number in range(32):
        choices = rng.sample(CHOICES, rng.randint(2, 5))
        docs.append(
            {"question": QUESTIONS[number % len(QUESTIONS)], "choices": choices, "answer": number % 2}
        )
    return docs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-layer Llama with Llama 3's vocabulary, saved with its tokenizer files (tokenizer.json,
    tokenizer_config.json). The output head is scaled up so that tokens' log-probabilities differ by nats,
    not hundredths: the choices' ranking then depends on the model, not on token counts alone."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)).eval()
    with torch.no_grad():
        model.output.weight.mul_(5.0)
    directory = tmp_path_factory.mktemp("parity") / "model"
    save_pretrained(model, directory)
    save_chat_format(ChatFormat(Tokenizer.default()), directory)
    return directory


@pytest.fixture(scope="module")
def lm_eval_results(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """lm-eval's evaluation of the items, offline, on CPU, in float32, with every sample logged."""
    from lm_eval.tasks import TaskManager

    tasks = tmp_path_factory.mktemp("tasks")
    write_task(tasks, TASK, _documents())
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.setenv("HF_HUB_OFFLINE", "1")
        return lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": "float32"},
            tasks=[TASK],
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            device="cpu",
            batch_size=1,
            log_samples=True,
        )


@pytest.fixture(scope="module")
def hermes_report(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`python -m hermes.evaluate --json` on the same items, written with the space at the end of the context."""
    items = tmp_path_factory.mktemp("items") / "items.jsonl"
    lines = [
        {"context": hermes_context(doc["question"]), "choices": doc["choices"], "answer": doc["answer"]}
        for doc in _documents()
    ]
    items.write_text("".join(json.dumps(line) + "\n" for line in lines))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluate_main(["--model", str(model_dir), str(items), "--json", "--device", "cpu"])
    return json.loads(printed.getvalue())


def test_each_choice_loglikelihood_is_lm_evals(
    lm_eval_results: dict[str, Any], hermes_report: dict[str, Any]
) -> None:
    theirs = choice_loglikelihoods(lm_eval_results, TASK)
    ours = [score["logprobs"] for score in hermes_report["scores"]]
    assert [len(row) for row in ours] == [len(doc["choices"]) for doc in _documents()]
    for number, (their_row, our_row) in enumerate(zip(theirs, ours)):
        assert our_row == pytest.approx(their_row, abs=1e-4, rel=1e-6), f"item {number}"


def test_acc_and_acc_norm_are_lm_evals_item_by_item(
    lm_eval_results: dict[str, Any], hermes_report: dict[str, Any]
) -> None:
    samples = sorted(lm_eval_results["samples"][TASK], key=lambda sample: sample["doc_id"])
    hits = [
        {"acc": float(s["predicted"] == s["answer"]), "acc_norm": float(s["predicted_norm"] == s["answer"])}
        for s in map(_picks, hermes_report["scores"])
    ]
    assert hits == [{"acc": s["acc"], "acc_norm": s["acc_norm"]} for s in samples]
    # The items tell the two metrics apart: a scorer that normalised wrongly (or not at all) would fail.
    assert any(s["acc"] != s["acc_norm"] for s in samples)
    result = lm_eval_results["results"][TASK]
    assert hermes_report["acc"] == result["acc,none"]
    assert hermes_report["acc_norm"] == result["acc_norm,none"]
    assert result["acc,none"] != result["acc_norm,none"]


def _picks(score: dict[str, Any]) -> dict[str, Any]:
    def best(values: list[float]) -> int:
        return max(range(len(values)), key=values.__getitem__)

    return {"predicted": best(score["logprobs"]), "predicted_norm": best(score["normalized"]), **score}


def test_space_inside_the_choice_divides_by_one_more_character(
    model_dir: Path, lm_eval_results: dict[str, Any], hermes_report: dict[str, Any]
) -> None:
    """Written " choice" after "...Answer:", the tokens scored are the same, but acc_norm divides each sum by
    len(choice) + 1, so it is no longer lm-eval's acc_norm."""
    model, tokenizer = load_model(model_dir), load_chat_format(model_dir).tokenizer
    docs = _documents()
    inside = [
        score_item(
            model,
            tokenizer,
            Item(
                PROMPT.format(question=doc["question"]), tuple(" " + c for c in doc["choices"]), doc["answer"]
            ),
        )
        for doc in docs
    ]
    for doc, score, arc_way in zip(docs, inside, hermes_report["scores"]):
        assert score.logprobs == pytest.approx(arc_way["logprobs"], abs=1e-5)
        assert score.normalized == pytest.approx(
            [lp / (len(choice) + 1) for lp, choice in zip(score.logprobs, doc["choices"])], rel=1e-12
        )
    assert accuracy(inside)["acc"] == lm_eval_results["results"][TASK]["acc,none"]
    assert accuracy(inside)["acc_norm"] != lm_eval_results["results"][TASK]["acc_norm,none"]
