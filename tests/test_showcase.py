"""The showcase: held-out prompts, the format and answer scoring, the plain copy of the run's model, an SFT
run's showcase.json and report, and the DPO summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hermes.config import ConfigError, DataConfig, load_config
from hermes.data.holdout import held_out
from hermes.data.pipeline import build_sft_samples
from hermes.data.records import parse_conversation
from hermes.model import Llama, LlamaConfig
from hermes.model.lora import apply_lora
from hermes.train.build import chat_format
from hermes.train.showcase import (
    dpo_summary,
    final_answer,
    held_out_prompts,
    plain_copy,
    score_reply,
    shape,
)
from tests.launching import debug_overrides, metrics, run_launch, small_sft_data

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>'
SCRATCHPAD = "<SCRATCHPAD>\n6 * 7: 6, 12, 18, 24, 30, 36, 42.\n</SCRATCHPAD>\n6 * 7 = 42"


@pytest.mark.parametrize(
    ("reply", "expected", "finished", "form", "answer"),
    [
        (CALL, CALL, True, True, True),  # the expected call
        (CALL.replace("\n", ""), CALL, True, True, True),  # the same call, laid out otherwise
        (CALL.replace("get_weather", "get_time"), CALL, True, False, False),  # a wrong tool name
        (CALL.replace("Paris", "Rome"), CALL, True, True, False),  # wrong arguments
        (CALL.replace('"Paris"}', '"Paris", "unit": "C"}'), CALL, True, True, False),  # an extra argument
        ("Sure! " + CALL, CALL, True, False, False),  # extra text around the call
        (CALL + "\n" + CALL, CALL, True, False, False),  # one call too many
        (CALL[:-12], CALL, True, False, False),  # never closed
        ('<tool_call>\n{"name": "get_weather"}\n</tool_call>', CALL, True, False, False),  # no arguments
        (CALL + "\n" + TIME_CALL, CALL + "\n" + TIME_CALL, True, True, True),  # two calls, in order
        (TIME_CALL + "\n" + CALL, CALL + "\n" + TIME_CALL, True, False, False),  # in the wrong order
        ("It is sunny in Paris.", CALL, True, False, False),  # text where a call is expected
        ("6 * 7 = 42.", "6 * 7 = 42.", True, True, True),  # the right arithmetic answer
        ("6 * 7 = 48.", "6 * 7 = 42.", True, True, False),  # a wrong one
        ("6 * 7 = 42.", "6 * 7 = 42.", False, False, False),  # cut off at the token limit
        ("6 * 7 = 42. Anything else?", "6 * 7 = 42.", True, False, False),  # extra text
        ("Units: 1.", "5 * 12 = 60.", True, False, False),  # a reply of another form
        ("elppa", "ognam", True, True, False),  # a reversed word, the wrong one
        ("6", "ognam", True, False, False),  # a number where a word is expected
        ("", "6 * 7 = 42.", True, False, False),  # nothing
        ("<SCRATCHPAD>", "6 * 7 = 42.", True, False, False),  # a scratchpad tag alone
        (CALL, "6 * 7 = 42.", True, False, False),  # a call where text is expected
        (SCRATCHPAD, SCRATCHPAD, True, True, True),  # reasoning first, then the answer
        (SCRATCHPAD.replace("6, 12", "6, 13"), SCRATCHPAD, True, True, True),  # only the answer counts
        ("6 * 7 = 42", SCRATCHPAD, True, False, False),  # the answer without the expected reasoning
        (SCRATCHPAD, "6 * 7 = 42", True, False, False),  # reasoning where none is expected
        ("<SCRATCHPAD>\n6 * 7: 42.\n</SCRATCHPAD>\n", SCRATCHPAD, True, False, False),  # no answer after it
        ("The answer is 10.", "THE ANSWER IS 10.", True, False, False),  # steering: uppercase asked
        ("THE ANSWER IS 12.", "THE ANSWER IS 10.", True, True, False),  # the style, the wrong sum
        ("<co: 24>It is red.</co>", "<co: 24>It is red.</co>", True, True, True),  # a citation
        ("<co: 25>It is red.</co>", "<co: 24>It is red.</co>", True, True, False),  # the wrong document
        ("It is red.", "<co: 24>It is red.</co>", True, False, False),  # no citation
    ],
)
def test_format_and_answer_scores(reply, expected, finished, form, answer):
    score = score_reply(reply, expected, finished)
    assert (score.format, score.answer) == (form, answer)


def test_the_final_answer_follows_the_scratchpad_and_has_a_shape():
    assert final_answer(SCRATCHPAD) == "6 * 7 = 42"
    assert final_answer(" 6 *  7\n= 42. ") == "6 * 7 = 42."
    assert shape("Ada is 7.") == "Aa a 0." and shape("<co: 31>HI</co>") == "<a: 0>A</a>"


def test_held_out_prompts_are_the_first_usable_held_out_records(tmp_path: Path):
    data = small_sft_data(tmp_path / "data.jsonl", records=80)
    options = DataConfig(train=[str(data)], validation_fraction=0.25)
    prompts = held_out_prompts(options, 8)
    lines = data.read_text().splitlines()
    held = [n for n in range(1, len(lines) + 1) if held_out(0, str(n), 0.25)]
    assert len(prompts) == 8
    # in file order, skipping held-out records the filters drop (line 1 has an empty assistant turn)
    assert [int(p.source.rsplit(":", 1)[1]) for p in prompts] == [n for n in held if n != 1][:8]
    for prompt in prompts:
        conversation = parse_conversation(json.loads(lines[int(prompt.source.rsplit(":", 1)[1]) - 1]), "")
        first = next(i for i, m in enumerate(conversation.messages) if m.role == "assistant")
        assert prompt.messages == conversation.messages[:first]
        assert prompt.expected == conversation.messages[first].content
        assert prompt.tools == conversation.tools
    assert len(held_out_prompts(options, 1000)) < 80 * 0.5  # no more than the split holds


def test_showcase_prompts_need_a_validation_split():
    with pytest.raises(ConfigError, match="set data.validation_fraction"):
        held_out_prompts(DataConfig(), 5)


def test_the_plain_copy_computes_what_the_model_computes_with_its_adapter_merged():
    torch.manual_seed(0)
    model = apply_lora(
        Llama(LlamaConfig.preset("debug")), rank=4, alpha=8.0, dropout=0.0, targets=["wq", "w2"]
    )
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)  # a trained adapter
    tokens = torch.randint(0, 1000, (2, 12))
    copy = plain_copy(model.eval(), torch.device("cpu"))
    assert not any("lora" in name for name in copy.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(copy(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_dpo_summary_means_the_first_and_last_steps(tmp_path: Path):
    records = [
        {"step": s, "loss": 0.7 - s / 100, "rewards/accuracies": s / 10, "rewards/margins": s / 5}
        for s in range(1, 11)
    ]
    records.insert(3, {"step": 3, "epoch": 1, "val_loss": 0.6, "val_rewards/margins": 9.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = dpo_summary(tmp_path, steps=3)
    assert summary["first"]["steps"] == [1, 3] and summary["last"]["steps"] == [8, 10]
    assert summary["first"]["rewards/accuracies"] == pytest.approx(0.2)
    assert summary["last"]["rewards/margins"] == pytest.approx(1.8)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    short = dpo_summary(tmp_path)  # two steps: one at each end
    assert short["first"]["steps"] == [1, 1] and short["last"]["steps"] == [2, 2]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(records[3]) + "\n")
    with pytest.raises(ValueError, match="holds no DPO step"):
        dpo_summary(tmp_path)


def _showcase_args(root: Path, steps: int) -> list[str]:
    """Debug-model SFT steps on 60 records, a fifth held out, 6 of them shown."""
    data = root / "data.jsonl"
    if not data.exists():
        small_sft_data(data, records=60)
    args = debug_overrides(root / "run", data, root / "cache", steps)
    return [*args, "--data.validation_fraction", "0.2", "--logging.showcase_prompts", "6"]


@pytest.fixture(scope="module")
def showcase_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two SFT steps on two processes with the showcase; the run's root and its standard output."""
    root = tmp_path_factory.mktemp("showcase")
    return root, run_launch("sft.py", 2, _showcase_args(root, 2)).stdout


@pytest.mark.slow
def test_an_sft_run_reports_held_out_answers_before_and_after_training(showcase_run):
    root, stdout = showcase_run
    run_dir, data = root / "run", root / "data.jsonl"
    assert "Showcase: 6 held-out prompts" in stdout and "expected:" in stdout
    showcase = json.loads((run_dir / "showcase.json").read_text())
    losses = [r for r in metrics(run_dir) if "val_loss" in r]
    assert [r["step"] for r in losses] == [0, 2]  # before the first step, and after the last
    assert showcase["val_loss"]["start"] == {"step": 0, "value": losses[0]["val_loss"]}
    assert showcase["val_loss"]["end"] == {"step": 2, "value": losses[1]["val_loss"]}
    for stage, step in (("before", 0), ("after", 2)):
        assert showcase[stage]["step"] == step and len(showcase[stage]["replies"]) == 6
        assert 0 <= showcase[stage]["answer_rate"] <= showcase[stage]["format_rate"] <= 1
    # The prompts were never trained on: no training sample holds their conversation.
    config = load_config(run_dir / "config.toml")
    chat = chat_format(config)
    trained = {tuple(s.tokens) for s in build_sft_samples(config.data.train, chat, config.data, 0).samples}
    lines = data.read_text().splitlines()
    for prompt in showcase["prompts"]:
        path, line = prompt["source"].rsplit(":", 1)
        assert path == str(data) and held_out(0, line, 0.2)
        conversation = parse_conversation(json.loads(lines[int(line) - 1]), prompt["source"])
        assert tuple(chat.render(conversation).tokens) not in trained


@pytest.mark.slow
def test_a_resumed_run_keeps_the_figures_of_step_0(showcase_run):
    root, _ = showcase_run
    first = json.loads((root / "run" / "showcase.json").read_text())
    args = [*_showcase_args(root, 4), "--run.allow_changes", "train.max_steps"]
    assert "Showcase: 6 held-out prompts" in run_launch("sft.py", 2, args).stdout
    resumed = json.loads((root / "run" / "showcase.json").read_text())
    assert resumed["before"] == first["before"] and resumed["val_loss"]["start"] == first["val_loss"]["start"]
    assert resumed["after"]["step"] == resumed["val_loss"]["end"]["step"] == 4
    steps = [r["step"] for r in metrics(root / "run") if "val_loss" in r]
    assert steps[:2] == [0, 2] and steps[-1] == 4 and len(set(steps)) == len(steps)  # each step once


def test_showcase_prompts_in_a_dpo_run_are_refused_naming_the_key(tmp_path) -> None:
    from hermes.config import ConfigError
    from hermes.train.dpo import main

    with pytest.raises(ConfigError, match="set --logging.showcase_prompts 0"):
        main(["--logging.showcase_prompts", "5", "--run.dir", str(tmp_path / "run")])
