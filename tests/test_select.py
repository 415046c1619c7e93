import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermes.select import SelectionError, load_scores, main, select_epoch

REPO = Path(__file__).resolve().parent.parent


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_hand_worked_three_epochs_two_groups():
    # A: min 0.52, max 0.61, range 0.09 -> (0, 9/9, 6/9) * 100 = 0, 100, 66.667
    # B: min 0.36, max 0.45, range 0.09 -> (4/9, 0, 9/9) * 100 = 44.444, 0, 100
    # totals: (0 + 44.444) / 2 = 22.222, (100 + 0) / 2 = 50, (66.667 + 100) / 2 = 83.333 -> epoch 3
    selection = select_epoch({"A": [0.52, 0.61, 0.58], "B": [0.40, 0.36, 0.45]})
    assert selection.normalized["A"] == pytest.approx([0.0, 100.0, 200 / 3])
    assert selection.normalized["B"] == pytest.approx([400 / 9, 0.0, 100.0])
    assert selection.total == pytest.approx([200 / 9, 50.0, 250 / 3])
    assert selection.best_epoch == 3
    assert selection.constant == []


def test_choice_ignores_each_groups_scale():
    # Percentages in one group, fractions in the other: the same normalised scores as in the test above.
    selection = select_epoch({"A": [52.0, 61.0, 58.0], "B": [0.40, 0.36, 0.45]})
    assert selection.total == pytest.approx([200 / 9, 50.0, 250 / 3])


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5).flatmap(
        lambda epochs: st.lists(
            st.lists(st.integers(0, 4), min_size=epochs, max_size=epochs), min_size=1, max_size=4
        )
    )
)
def test_totals_and_choice_match_a_numpy_reference(rows):
    scores = np.array(rows, dtype=float) / 4  # [groups, epochs]
    low, high = scores.min(axis=1, keepdims=True), scores.max(axis=1, keepdims=True)
    varying = (high > low)[:, 0]
    normalized = 100 * (scores[varying] - low[varying]) / (high[varying] - low[varying])
    total = normalized.mean(axis=0) if varying.any() else np.zeros(scores.shape[1])
    best = int(np.flatnonzero(np.isclose(total, total.max(), rtol=0, atol=1e-9))[0]) + 1

    selection = select_epoch({f"g{i}": list(row) for i, row in enumerate(scores)})
    assert selection.total == pytest.approx(total.tolist())
    assert selection.best_epoch == best
    assert selection.constant == [f"g{i}" for i in np.flatnonzero(~varying)]


def test_exact_tie_picks_the_earliest_epoch():
    # A normalises to 100, 0; B to 0, 100: both totals are 50.
    selection = select_epoch({"A": [0.7, 0.5], "B": [0.3, 0.4]})
    assert selection.total == [50.0, 50.0]
    assert selection.best_epoch == 1


def test_tie_up_to_rounding_noise_picks_the_earliest_epoch():
    # A: range 0.21 -> 100, 0, 3/21*100 = 14.29; B: range 0.21 -> 0, 100, 18/21*100 = 85.71.
    # Every total is 50 exactly on paper; in floats epoch 3 lands a few ulps above 50.
    selection = select_epoch({"A": [0.31, 0.10, 0.13], "B": [0.10, 0.31, 0.28]})
    assert selection.total[2] > selection.total[0] == 50.0  # the noise a strict max would follow
    assert selection.total == pytest.approx([50.0, 50.0, 50.0])
    assert selection.best_epoch == 1


def test_constant_group_is_left_out_of_the_average():
    with_constant = select_epoch({"A": [0.52, 0.61, 0.58], "B": [0.40, 0.36, 0.45], "C": [0.3, 0.3, 0.3]})
    without = select_epoch({"A": [0.52, 0.61, 0.58], "B": [0.40, 0.36, 0.45]})
    assert with_constant.constant == ["C"]
    assert "C" not in with_constant.normalized
    assert with_constant.total == without.total
    assert with_constant.best_epoch == 3


@pytest.mark.parametrize("scores", [{"A": [0.5, 0.5], "B": [2.0, 2.0]}, {"A": [0.5]}])
def test_no_varying_group_gives_zero_totals_and_epoch_one(scores):
    selection = select_epoch(scores)
    assert selection.total == [0.0] * len(scores["A"])
    assert selection.best_epoch == 1
    assert selection.constant == list(scores)


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        ({}, "no benchmark groups; expected a JSON object"),
        ([0.5, 0.6], "no benchmark groups; expected a JSON object"),
        (
            {"A": [0.5, 0.6], "B": [0.5]},
            "group 'B' has 1 scores but group 'A' has 2; give every group one score per epoch",
        ),
        ({"A": "0.5"}, "group 'A' holds '0.5', not a list of scores"),
        ({"A": []}, "group 'A' holds [], not a list of scores"),
        ({"A": [0.5, "0.6"]}, "group 'A', epoch 2: '0.6' is not a finite number"),
        ({"A": [0.5, True]}, "group 'A', epoch 2: True is not a finite number"),
        ({"A": [math.nan, 0.6]}, "group 'A', epoch 1: nan is not a finite number"),
    ],
)
def test_bad_scores_name_the_group_and_the_fix(scores, message):
    with pytest.raises(SelectionError, match="^scores.json: ") as error:
        select_epoch(scores, source="scores.json")
    assert message in str(error.value)


def lm_eval_result(arc, hellaswag, mmlu, gsm8k=None, extra=None) -> dict:
    """A results file in the shape lm-evaluation-harness 0.4 writes, with the noise it carries."""
    arc_acc, arc_norm = arc
    results = {
        "arc_challenge": {
            "alias": "arc_challenge",
            "acc,none": arc_acc,
            "acc_stderr,none": 0.014,
            "acc_norm,none": arc_norm,
            "acc_norm_stderr,none": 0.014,
        },
        "hellaswag": {
            "alias": "hellaswag",
            "acc,none": hellaswag - 0.2,
            "acc_stderr,none": 0.005,
            "acc_norm,none": hellaswag,
            "acc_norm_stderr,none": 0.004,
        },
        "mmlu": {"acc,none": mmlu, "acc_stderr,none": 0.003, "alias": "mmlu"},
        "mmlu_humanities": {"acc,none": 0.9, "acc_stderr,none": 0.006, "alias": " - humanities"},
        "mmlu_formal_logic": {"alias": "  - formal_logic", "acc,none": 0.1, "acc_stderr,none": 0.04},
    }
    if gsm8k is not None:
        results["gsm8k"] = {
            "alias": "gsm8k",
            "exact_match,strict-match": gsm8k[0],
            "exact_match_stderr,strict-match": 0.013,
            "exact_match,flexible-extract": gsm8k[1],
            "exact_match_stderr,flexible-extract": 0.013,
        }
    results.update(extra or {})
    return {
        "results": results,
        "groups": {"mmlu": results["mmlu"], "mmlu_humanities": results["mmlu_humanities"]},
        "group_subtasks": {
            "mmlu_humanities": ["mmlu_formal_logic"],
            "mmlu": ["mmlu_humanities"],
            "hellaswag": [],
            "arc_challenge": [],
        },
        "configs": {"arc_challenge": {"task": "arc_challenge", "num_fewshot": 25}},
        "versions": {"arc_challenge": 1.0, "hellaswag": 1.0, "mmlu": 2},
        "n-shot": {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5},
        "higher_is_better": {"arc_challenge": {"acc": True, "acc_norm": True}, "mmlu": {"acc": True}},
        "config": {"model": "hf", "model_args": "pretrained=runs/sft/hf"},
        "git_hash": "abc1234",
    }


EPOCHS = [
    dict(arc=(0.50, 0.55), hellaswag=0.80, mmlu=0.60, gsm8k=(0.40, 0.45)),
    dict(arc=(0.52, 0.58), hellaswag=0.82, mmlu=0.64, gsm8k=(0.44, 0.47)),
    dict(arc=(0.56, 0.57), hellaswag=0.81, mmlu=0.62, gsm8k=(0.46, 0.43)),
]


def write_epochs(tmp_path: Path, gsm8k: bool = False) -> list[Path]:
    paths = []
    for epoch, scores in enumerate(EPOCHS, 1):
        scores = dict(scores) if gsm8k else {k: v for k, v in scores.items() if k != "gsm8k"}
        paths.append(write_json(tmp_path / f"results_epoch{epoch}.json", lm_eval_result(**scores)))
    return paths


def test_lm_eval_files_give_one_group_per_top_level_task_with_acc_norm_first(tmp_path):
    scores = load_scores(write_epochs(tmp_path))
    # The MMLU subtasks are skipped (their aggregate `mmlu` is there); acc_norm is taken where present.
    assert scores == {
        "arc_challenge": [0.55, 0.58, 0.57],
        "hellaswag": [0.80, 0.82, 0.81],
        "mmlu": [0.60, 0.64, 0.62],
    }


def test_groups_file_averages_tasks_and_picks_named_metrics(tmp_path):
    groups = write_json(
        tmp_path / "groups.json",
        {"reasoning": ["arc_challenge", "hellaswag"], "math": ["gsm8k:exact_match,strict-match"]},
    )
    scores = load_scores(write_epochs(tmp_path, gsm8k=True), groups)
    assert scores["reasoning"] == pytest.approx([(0.55 + 0.80) / 2, (0.58 + 0.82) / 2, (0.57 + 0.81) / 2])
    assert scores["math"] == [0.40, 0.44, 0.46]
    # reasoning 0.675, 0.70, 0.69 -> 0, 100, 60; math 0.40, 0.44, 0.46 -> 0, 66.7, 100
    # totals 0, 83.3, 80 -> epoch 2
    selection = select_epoch(scores)
    assert selection.total == pytest.approx([0.0, 250 / 3, 80.0])
    assert selection.best_epoch == 2


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hermes.select", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_cli_json_holds_normalized_total_and_best_epoch(tmp_path):
    path = write_json(tmp_path / "scores.json", {"A": [0.52, 0.61, 0.58], "B": [0.40, 0.36, 0.45]})
    result = run_cli(str(path), "--json")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["best_epoch"] == 3
    assert output["total"] == pytest.approx([200 / 9, 50.0, 250 / 3])
    assert output["normalized"]["B"] == pytest.approx([400 / 9, 0.0, 100.0])


def test_cli_reports_bad_input_and_exits_2(tmp_path):
    result = run_cli(str(tmp_path / "missing.json"))
    assert result.returncode == 2
    assert f"{tmp_path / 'missing.json'}: no such file" in result.stderr


def test_table_shows_normalized_rows_constant_groups_and_the_choice(tmp_path, capsys):
    path = write_json(
        tmp_path / "scores.json", {"MMLU": [60, 64, 62], "GSM8K": [40, 41, 46], "BBH": [3, 3, 3]}
    )
    assert main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["epoch", "1", "2", "3"]
    assert lines[1].split() == ["MMLU", "0.0", "100.0", "50.0"]
    assert lines[2].split() == ["GSM8K", "0.0", "16.7", "100.0"]
    assert lines[3].split() == ["BBH", "const", "const", "const"]
    assert lines[4].split() == ["total", "0.0", "58.3", "75.0"]
    assert lines[-1] == "best epoch: 3 (total 75.0)"


def test_file_errors_name_the_file_and_the_fix(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"A": [0.5,\n 0.6')
    with pytest.raises(SelectionError, match=r"broken.json: line 2: not valid JSON"):
        load_scores([broken])
    with pytest.raises(
        SelectionError, match=r"missing.json: no such file; pass an existing scores JSON file"
    ):
        load_scores([tmp_path / "missing.json"])
    scores = write_json(tmp_path / "scores.json", {"A": [0.5, 0.6]})
    with pytest.raises(SelectionError, match=r"second.json: a second scores file; .* pass only one"):
        load_scores([scores, write_json(tmp_path / "second.json", {"A": [0.5, 0.6]})])
    with pytest.raises(SelectionError, match=r"scores.json: --groups applies to lm-eval result files only"):
        load_scores([scores], write_json(tmp_path / "groups.json", {"g": ["arc_challenge"]}))
    epoch1 = write_epochs(tmp_path)[0]
    with pytest.raises(
        SelectionError, match=r"scores.json: not an lm-evaluation-harness result file .* while"
    ):
        load_scores([epoch1, scores])


def test_lm_eval_errors_name_the_file_task_and_fix(tmp_path):
    paths = write_epochs(tmp_path, gsm8k=True)
    with pytest.raises(
        SelectionError,
        match=r"results_epoch1.json: task 'gsm8k' reports exact_match under several filters "
        r"\(exact_match,strict-match, exact_match,flexible-extract\); choose one in a --groups file",
    ):
        load_scores(paths)

    ifeval = {
        "ifeval": {"alias": "ifeval", "prompt_level_strict_acc,none": 0.7, "inst_level_strict_acc,none": 0.8}
    }
    path = write_json(tmp_path / "ifeval.json", lm_eval_result(**EPOCHS[0] | {"gsm8k": None}, extra=ifeval))
    with pytest.raises(
        SelectionError, match=r"ifeval.json: task 'ifeval' reports none of acc_norm, acc, exact_match"
    ):
        load_scores([path])
    groups = write_json(tmp_path / "groups.json", {"follow": ["ifeval:prompt_level_strict_acc,none"]})
    assert load_scores([path], groups) == {"follow": [0.7]}

    groups = write_json(tmp_path / "typo.json", {"follow": ["ifeval:prompt_strict,none"]})
    with pytest.raises(SelectionError, match=r"task 'ifeval' has no numeric metric 'prompt_strict,none'"):
        load_scores([path], groups)
    groups = write_json(tmp_path / "arc_easy.json", {"easy": ["arc_easy"]})
    with pytest.raises(
        SelectionError, match=r"ifeval.json: task 'arc_easy' is not in its results \(tasks: arc_ch"
    ):
        load_scores([path], groups)
    groups = write_json(tmp_path / "empty.json", {"easy": []})
    with pytest.raises(
        SelectionError, match=r"empty.json: group 'easy' holds \[\]; give it a non-empty list"
    ):
        load_scores([path], groups)


def test_epochs_evaluated_on_different_tasks_are_refused(tmp_path):
    first, second, _ = write_epochs(tmp_path)
    extra = {"piqa": {"alias": "piqa", "acc,none": 0.8}}
    second = write_json(second, lm_eval_result(**EPOCHS[1] | {"gsm8k": None}, extra=extra))
    with pytest.raises(SelectionError, match=r"results_epoch2.json: tasks \['piqa'\] are in only one of"):
        load_scores([first, second])


def test_lower_is_better_metric_is_refused(tmp_path):
    extra = {"wikitext": {"alias": "wikitext", "word_perplexity,none": 9.5}}
    doc = lm_eval_result(**EPOCHS[0] | {"gsm8k": None}, extra=extra)
    doc["higher_is_better"]["wikitext"] = {"word_perplexity": False}
    path = write_json(tmp_path / "wiki.json", doc)
    groups = write_json(tmp_path / "groups.json", {"lm": ["wikitext:word_perplexity,none"]})
    with pytest.raises(
        SelectionError, match=r"wiki.json: task 'wikitext', metric 'word_perplexity,none' is lower-is"
    ):
        load_scores([path], groups)
