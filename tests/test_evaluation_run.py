"""Evaluation inside an SFT run: validation loss, the held-out split, per-epoch exports, and choosing the epoch
from per-epoch lm-eval result files (`python -m hermes.select --run`)."""

from __future__ import annotations

import json
from pathlib import Path

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

FRACTION = 0.25


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two one-step epochs of the debug model, a quarter of the records held out, each epoch exported."""
    root = tmp_path_factory.mktemp("evaluation-run")
    data = small_sft_data(root / "data.jsonl", records=24)
    run_dir = root / "run"
    args = debug_overrides(run_dir, data, root / "cache", steps=0)
    args += ["--train.epochs", "2", "--data.validation_fraction", str(FRACTION)]
    args += ["--train.export_every_epoch", "true", "--train.micro_batch", "2"]
    run_launch("sft.py", 1, args)
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

    def fake_evaluate(model_dir: Path, tasks: list[str], include_path: str | None, output: Path) -> Path:
        epoch = int(model_dir.parent.name.removeprefix("epoch-"))
        evaluated.append((epoch, tasks, include_path))
        output.write_text(json.dumps(_result(*scores[epoch])))
        return output

    monkeypatch.setattr(select, "evaluate_epoch", fake_evaluate)
    select.main(["--run", str(tmp_path), "--tasks", "mmlu,gsm8k", "--include-path", "tasks", "--json"])
    chosen = json.loads(capsys.readouterr().out)
    assert evaluated == [(epoch, ["mmlu", "gsm8k"], "tasks") for epoch in (1, 2, 3)]
    assert chosen["best_epoch"] == 3
    assert chosen["total"] == pytest.approx([0.0, 175 / 3, 75.0])
    assert all((tmp_path / "epochs" / f"epoch-{e}" / "lm_eval.json").is_file() for e in (1, 2, 3))
