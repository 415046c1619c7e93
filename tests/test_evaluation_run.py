"""Evaluation inside an SFT run: validation loss, the held-out split, per-epoch exports, and choosing the epoch
from per-epoch lm-eval result files (`python -m hermes.select --run`)."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from hermes import select
from hermes.config import DataConfig, load_config
from hermes.data.dataset import TokenizedDataset
from hermes.data.pipeline import build_sft_samples, prepare_sft_dataset
from hermes.data.sample import IGNORE_INDEX
from hermes.model.hf import load_pretrained
from hermes.train.build import chat_format
from tests.launching import debug_overrides, metrics, run_launch, small_sft_data
from tests.lm_eval_tasks import PROMPT, write_task

FRACTION = 0.25


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two one-step epochs of the debug model, a quarter of the records held out, each epoch exported. The
    learning rate is ten times the debug one, so that the two epochs' models rank multiple-choice answers
    differently."""
    root = tmp_path_factory.mktemp("evaluation-run")
    data = small_sft_data(root / "data.jsonl", records=24)
    run_dir = root / "run"
    args = debug_overrides(run_dir, data, root / "cache", steps=0)
    args[args.index("--optim.lr") + 1] = "3e-2"
    args += ["--train.epochs", "2", "--data.validation_fraction", str(FRACTION)]
    args += ["--train.export_every_epoch", "true", "--train.micro_batch", "2"]
    # Each epoch's export is also evaluated during the run, on a local task with every answer 0.
    write_task(root / "in-run-tasks", "in_run", [{**doc, "answer": 0} for doc in _documents(2)], ("acc",))
    args += ["--train.epoch_tasks", "in_run", "--train.epoch_tasks_include", str(root / "in-run-tasks")]
    run_launch("sft.py", 1, args, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    for epoch in (1, 2):  # kept aside: `hermes.select --run` below writes the same files again
        written = run_dir / "epochs" / f"epoch-{epoch}" / "lm_eval.json"
        written.rename(root / f"in-run-epoch-{epoch}.json")
    return run_dir


def _naive_nll(model: torch.nn.Module, tokens: list[int], labels: list[int]) -> tuple[float, int]:
    """Summed NLL of one sample's labelled tokens in one plain forward pass, and their count."""
    logits = model(torch.tensor([tokens]))[0].double().log_softmax(-1)  # [seq, vocab]
    targets = torch.tensor(labels[1:])
    trained = targets != IGNORE_INDEX
    picked = logits[:-1][trained].gather(1, targets[trained][:, None])
    return -picked.sum().item(), int(trained.sum())


def test_validation_loss_equals_a_plain_forward_over_the_held_out_samples(run: Path) -> None:
    config = load_config(run / "config.toml")
    samples = build_sft_samples(
        config.data.train, chat_format(config), config.data, config.run.seed, split="validation"
    ).samples
    assert samples
    validations = [r for r in metrics(run) if "val_loss" in r]
    assert [r["step"] for r in validations] == [1, 2]  # one per epoch end, each step once
    for record in validations:
        model = load_pretrained(run / "epochs" / f"epoch-{record['epoch']}" / "hf").eval()
        with torch.no_grad():
            sums = [_naive_nll(model, s.tokens, s.labels) for s in samples]
        expected = sum(nll for nll, _ in sums) / sum(count for _, count in sums)
        assert record["val_loss"] == pytest.approx(expected, rel=1e-5)


def _token_sequences(dataset: TokenizedDataset) -> set[tuple[int, ...]]:
    return {tuple(dataset[i].tokens) for i in range(len(dataset))}


def test_held_out_records_never_reach_the_training_cache(tmp_path: Path) -> None:
    data = small_sft_data(tmp_path / "data.jsonl", records=40)
    chat = chat_format(load_config())
    options = DataConfig(train=[str(data)], seq_len=256, validation_fraction=FRACTION)
    train_dir = prepare_sft_dataset(chat, options, 0, tmp_path / "cache")
    validation_dir = prepare_sft_dataset(chat, options, 0, tmp_path / "cache", split="validation")
    assert train_dir != validation_dir
    whole = build_sft_samples([data], chat, DataConfig(train=[str(data)], seq_len=256), 0).samples
    train, held = TokenizedDataset.load(train_dir), TokenizedDataset.load(validation_dir)
    assert len(held) > 0 and len(train) > 0
    assert not _token_sequences(train) & _token_sequences(held)
    assert len(train) + len(held) == len(whole)


def test_epoch_exports_load_in_transformers(run: Path) -> None:
    transformers = pytest.importorskip("transformers")
    for epoch in (1, 2):
        directory = run / "epochs" / f"epoch-{epoch}" / "hf"
        model = transformers.AutoModelForCausalLM.from_pretrained(directory)
        assert model.config.num_hidden_layers == load_pretrained(directory).config.n_layers
        assert (directory / "tokenizer_config.json").is_file()
        assert "chat_template" in json.loads((directory / "tokenizer_config.json").read_text())


def _result(mmlu: float, gsm8k: float) -> dict:
    """An lm-eval result file's shape, with two tasks."""
    return {
        "results": {
            "mmlu": {"alias": "mmlu", "acc,none": mmlu, "acc_stderr,none": 0.01},
            "gsm8k": {"alias": "gsm8k", "exact_match,none": gsm8k},
        },
        "higher_is_better": {"mmlu": {"acc": True}, "gsm8k": {"exact_match": True}},
    }


def test_select_run_picks_the_epoch_of_the_report_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # raw          epoch 1  epoch 2  epoch 3
    # mmlu            0.60     0.64     0.62   normalised   0  100   50
    # gsm8k           0.40     0.41     0.46   normalised   0  16.7 100
    # total                                                 0  58.3  75  -> epoch 3
    scores = {1: (0.60, 0.40), 2: (0.64, 0.41), 3: (0.62, 0.46)}
    for epoch in (3, 1, 2, 10):
        (tmp_path / "epochs" / f"epoch-{epoch}" / ("hf" if epoch != 10 else "adapter")).mkdir(parents=True)
    evaluated = []

    def fake_evaluate(model_dir: Path, tasks: list[str], output: Path, **options: Any) -> Path:
        epoch = int(model_dir.parent.name.removeprefix("epoch-"))
        evaluated.append((epoch, tasks, options))
        output.write_text(json.dumps(_result(*scores[epoch])))
        return output

    monkeypatch.setattr(select, "evaluate_epoch", fake_evaluate)
    select.main(["--run", str(tmp_path), "--tasks", "mmlu,gsm8k", "--include-path", "tasks", "--json"])
    chosen = json.loads(capsys.readouterr().out)
    options = {"include_path": "tasks", "device": None, "dtype": "float32", "batch_size": "1"}
    assert evaluated == [(epoch, ["mmlu", "gsm8k"], options) for epoch in (1, 2, 3)]
    assert chosen["best_epoch"] == 3
    assert chosen["total"] == pytest.approx([0.0, 175 / 3, 75.0])
    assert all((tmp_path / "epochs" / f"epoch-{e}" / "lm_eval.json").is_file() for e in (1, 2, 3))


WORDS = [
    "blue", "rain", "cats", "dogs", "tree", "fish", "moon", "star", "wind", "fire", "snow", "rock", "gold",
    "iron", "salt", "milk", "corn", "rice", "wolf", "bear", "a lion", "the sea", "red sky", "an old oak", "ice",
    "owl", "photosynthesis", "Mount Everest",
]  # fmt: skip


def _documents(seed: int) -> list[dict[str, Any]]:
    """12 questions of 4 choices of 3 to 14 characters, their answers not set yet."""
    rng = random.Random(seed)
    return [{"question": f"Which word fits blank {n}?", "choices": rng.sample(WORDS, 4)} for n in range(12)]


@torch.no_grad()
def _naive_loglikelihoods(
    model_dir: Path, tasks: dict[str, list[dict[str, Any]]]
) -> dict[str, list[list[float]]]:
    """Per task, per document, each choice's log-likelihood the way lm-eval's `hf` model splits it, written
    out with transformers: the tokens of PROMPT + " " + choice (BOS first) past those of PROMPT, one plain
    forward per choice."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    scores: dict[str, list[list[float]]] = {}
    for task, docs in tasks.items():
        scores[task] = []
        for doc in docs:
            prompt = PROMPT.format(question=doc["question"])
            start = len(tokenizer(prompt).input_ids)
            row = []
            for choice in doc["choices"]:
                ids = tokenizer(f"{prompt} {choice}").input_ids
                logprobs = model(torch.tensor([ids])).logits[0, start - 1 : -1].double().log_softmax(-1)
                row.append(float(logprobs.gather(1, torch.tensor(ids[start:])[:, None]).sum()))
            scores[task].append(row)
    return scores


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _report_rule(scores: dict[str, list[float]]) -> int:
    """The 1-based epoch the Hermes 3 report's rule picks: each group min-max normalised across epochs (groups
    equal in every epoch left out), the mean over groups, its highest, the earliest on a tie."""
    normalized = [
        [100 * (s - min(row)) / (max(row) - min(row)) for s in row]
        for row in scores.values()
        if max(row) > min(row)
    ]
    epochs = len(next(iter(scores.values())))
    total = [statistics.fmean(column) for column in zip(*normalized)] if normalized else [0.0] * epochs
    return _argmax(total) + 1


def test_epoch_tasks_evaluate_each_export_during_the_run_as_a_hand_computation_scores_it(run: Path) -> None:
    docs = _documents(2)
    for epoch in (1, 2):
        rows = _naive_loglikelihoods(run / "epochs" / f"epoch-{epoch}" / "hf", {"in_run": docs})["in_run"]
        expected = statistics.fmean(_argmax(row) == 0 for row in rows)
        written = json.loads((run.parent / f"in-run-epoch-{epoch}.json").read_text())
        assert written["results"]["in_run"]["acc,none"] == pytest.approx(expected)


@pytest.mark.slow
def test_select_run_evaluates_each_epoch_with_lm_eval_and_picks_the_epoch_of_a_hand_computation(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (it is in the test extra)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = [run / "epochs" / f"epoch-{epoch}" / "hf" for epoch in (1, 2)]
    # Two tasks (two groups): "by_char" reports acc_norm (what select reads first), "by_sum" only acc. Each
    # item's answer is epoch 2's pick, so epoch 2 scores 1.0 and epoch 1 less, wherever its pick differs.
    tasks = {"by_char": _documents(0), "by_sum": _documents(1)}
    loglikelihoods = [_naive_loglikelihoods(model, tasks) for model in models]
    expected: dict[str, list[float]] = {}
    for task, docs in tasks.items():
        per_char = task == "by_char"
        picks = [
            [
                _argmax([ll / len(c) for ll, c in zip(row, doc["choices"])] if per_char else row)
                for row, doc in zip(epoch[task], docs)
            ]
            for epoch in loglikelihoods
        ]
        assert picks[0] != picks[1], f"{task}: both epochs pick alike; the run's epochs do not differ enough"
        for doc, answer in zip(docs, picks[1]):
            doc["answer"] = answer
        write_task(tmp_path / "tasks", task, docs, metrics=("acc", "acc_norm") if per_char else ("acc",))
        expected[task] = [
            statistics.fmean(p == doc["answer"] for p, doc in zip(epoch, docs)) for epoch in picks
        ]
    torch.manual_seed(7)
    random.seed(7)
    select.main(
        ["--run", str(run), "--tasks", "by_char,by_sum", "--include-path", str(tmp_path / "tasks"), "--json"]
    )
    chosen = json.loads(capsys.readouterr().out)
    assert chosen["scores"] == {task: pytest.approx(scores) for task, scores in expected.items()}
    assert chosen["best_epoch"] == _report_rule(expected) == 2
    for model, (by_char, by_sum) in zip(models, zip(*expected.values())):
        written = json.loads((model.parent / "lm_eval.json").read_text())
        assert written["results"]["by_char"]["acc_norm,none"] == pytest.approx(by_char)
        assert written["results"]["by_sum"]["acc,none"] == pytest.approx(by_sum)
        assert str(model) in json.dumps(written["config"]["model_args"])
    # lm-eval seeds the global generators; evaluate_epoch leaves the caller's streams where they were.
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(7)))
    assert random.random() == random.Random(7).random()


@pytest.mark.slow  # lm-eval indexes its built-in tasks to tell that the name is none of them
def test_select_run_names_an_unknown_task_and_the_include_path_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (it is in the test extra)")
    (tmp_path / "epochs" / "epoch-1" / "hf").mkdir(parents=True)
    docs = [{"question": "Which?", "choices": ["this", "that"], "answer": 0}]
    write_task(tmp_path / "tasks", "local_task", docs)
    argv = [
        "--run",
        str(tmp_path),
        "--tasks",
        "local_task,arc_easz",
        "--include-path",
        str(tmp_path / "tasks"),
    ]
    with pytest.raises(SystemExit) as exit_info:
        select.main(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "'arc_easz'" in message and "arc_easy" in message and "--include-path" in message
    assert not (tmp_path / "epochs" / "epoch-1" / "lm_eval.json").exists()


def test_epoch_tasks_without_epoch_exports_are_refused_before_any_work() -> None:
    from hermes.config import ConfigError
    from hermes.train.epoch_evaluation import EpochEvaluation

    config = load_config(overrides=["--train.epoch_tasks", "arc_easy"])
    with pytest.raises(ConfigError, match="set --train.export_every_epoch true"):
        EpochEvaluation(config, torch.device("cpu"))
