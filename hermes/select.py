"""Pick the epoch (checkpoint) to keep from per-epoch benchmark scores, as the Hermes 3 report did.

The rule. Each benchmark group's scores are min-max normalised across the epochs, from the unrounded
scores: the group's worst epoch gets 0, its best 100, the others their linear position in between.
The epoch's total is the mean of its normalised scores over the groups; the epoch with the highest total
is chosen. Scores are "higher is better"; their scale does not matter (fractions and percentages give
the same choice).

Worked example, 3 epochs and 2 groups::

    raw scores     epoch 1  epoch 2  epoch 3
    MMLU              60.0     64.0     62.0    min 60, max 64: 100 * (s - 60) / 4
    GSM8K             40.0     41.0     46.0    min 40, max 46: 100 * (s - 40) / 6
    normalised
    MMLU               0.0    100.0     50.0
    GSM8K              0.0     16.7    100.0
    total              0.0     58.3     75.0    mean of the two rows
    -> epoch 3 is chosen (1-based), although epoch 2 has the best MMLU score.

Ties. Totals within `TIE_TOLERANCE` of the highest (floating-point noise, e.g. 50 reached as
(100 + 0) / 2 in one epoch and (33.3... + 66.6...) / 2 in another) count as equal, and the earliest of
them is chosen: it is the cheaper checkpoint and the less over-fitted one.

Constant groups. A group whose scores are equal in every epoch tells nothing about which epoch is better:
it is left out of the average (and listed under `constant`) rather than counted as 0 or 100 in every
epoch, which would only shrink or inflate every total alike and make the totals depend on how many
uninformative groups were evaluated. If no group varies (a single epoch, for one), every total is 0 and
epoch 1 is chosen.

In one command (`python -m hermes.select --run RUN_DIR --tasks TASKS [--include-path DIR] [--groups GROUPS]`):
every epoch model a run exported (`train.export_every_epoch`: RUN_DIR/epochs/epoch-K/hf) is evaluated with
lm-evaluation-harness (the optional `eval` extra, `lm_eval.simple_evaluate` with the `hf` model, in float32
unless `--dtype` says otherwise, on `--device`, default the GPU when there is one), its result written to
RUN_DIR/epochs/epoch-K/lm_eval.json, and the table below is printed from those files. `--include-path` adds
a folder of task YAMLs (a local task over a local JSONL file works offline). `evaluate_epoch` does the same
for one model directory, e.g. after each epoch's export while training.

Inputs (`python -m hermes.select FILE [FILE ...] [--groups GROUPS] [--json]`):

- One scores file: a JSON object ``{"group name": [score at epoch 1, epoch 2, ...], ...}``.
- lm-evaluation-harness result files, one per epoch, given in epoch order (a shell glob sorts lexically,
  so ``epoch-10`` comes before ``epoch-2``: list them or name them ``epoch-02``). From each file's
  ``results`` section, each task's metric is the first of `METRIC_PREFERENCE` it reports, under the
  ``none`` filter when it has one, else under its only filter (two filters, as gsm8k's ``strict-match``
  and ``flexible-extract``, must be chosen explicitly, see below). lm-eval 0.3 keys without a filter
  (``"acc"``) are read too.
- Groups. Without ``--groups``, every top-level task of the results is its own group: tasks listed as
  subtasks in the file's ``group_subtasks`` (the 57 MMLU subjects, say) are skipped, since their group's
  aggregate (``mmlu``) is already a task of the results. With ``--groups GROUPS``, a JSON object
  ``{"group name": ["task", "task:metric,filter", ...], ...}`` names the groups; a group's score is the
  unweighted mean of its tasks' metrics, and ``task:metric,filter`` picks a metric explicitly, e.g.
  ``"gsm8k:exact_match,strict-match"`` or ``"ifeval:prompt_level_strict_acc,none"``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import random
import statistics
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIE_TOLERANCE = 1e-9
"""Totals (on the 0-100 scale) closer than this to the highest count as tied with it."""

METRIC_PREFERENCE = ("acc_norm", "acc", "exact_match")
"""Metric taken from an lm-eval task that names none explicitly: the first of these it reports."""

_SCORES_SHAPE = '{"group name": [score at epoch 1, score at epoch 2, ...], ...}'


class SelectionError(ValueError):
    """Scores that cannot be compared; the message names the file or group at fault and the fix."""


@dataclass(frozen=True)
class Selection:
    """The outcome of `select_epoch`; epochs are list positions, `best_epoch` is 1-based."""

    scores: dict[str, list[float]]
    """Raw scores per group, one per epoch."""
    normalized: dict[str, list[float]]
    """Min-max normalised scores (0 = the group's worst epoch, 100 = its best) of the varying groups."""
    constant: list[str]
    """Groups with equal scores in every epoch, left out of the total."""
    total: list[float]
    """Mean normalised score per epoch over the varying groups (0 everywhere when none varies)."""
    best_epoch: int
    """The earliest epoch whose total is the highest (within TIE_TOLERANCE), 1-based."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def min_max_normalize(values: Sequence[float]) -> list[float] | None:
    """Map `values` linearly onto 0 (the minimum) .. 100 (the maximum); None when all are equal."""
    low, high = min(values), max(values)
    if low == high:
        return None
    return [100.0 * (value - low) / (high - low) for value in values]


def select_epoch(scores: Mapping[str, Sequence[float]], source: str = "scores") -> Selection:
    """Normalise each group across epochs, average the groups, and pick the best epoch.

    Args:
        scores: {group: [score at epoch 1, epoch 2, ...]}, higher is better, same length for every group.
        source: where the scores came from, for error messages (a file name).

    Returns:
        The normalised scores, the totals and the chosen epoch (see the module docstring for the rule).

    Raises:
        SelectionError: no groups, ragged lists, or a score that is not a finite number.
    """
    checked = _check_scores(scores, source)
    normalized: dict[str, list[float]] = {}
    constant: list[str] = []
    for group, values in checked.items():
        row = min_max_normalize(values)
        if row is None:
            constant.append(group)
        else:
            normalized[group] = row
    epochs = len(next(iter(checked.values())))
    if normalized:
        total = [statistics.fmean(column) for column in zip(*normalized.values())]
    else:
        total = [0.0] * epochs
    highest = max(total)
    best_epoch = next(epoch for epoch, value in enumerate(total, 1) if value >= highest - TIE_TOLERANCE)
    return Selection(checked, normalized, constant, total, best_epoch)


def _check_scores(scores: Any, source: str) -> dict[str, list[float]]:
    """The scores as {group: [float, ...]}, after checking their shape."""
    if not isinstance(scores, Mapping) or not scores:
        raise SelectionError(f"{source}: no benchmark groups; expected a JSON object {_SCORES_SHAPE}.")
    checked: dict[str, list[float]] = {}
    for group, values in scores.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise SelectionError(
                f"{source}: group {group!r} holds {values!r}, not a list of scores; give it one score per "
                f"epoch, as in {_SCORES_SHAPE}."
            )
        for epoch, value in enumerate(values, 1):
            if not _is_number(value):
                raise SelectionError(
                    f"{source}: group {group!r}, epoch {epoch}: {value!r} is not a finite number; every score "
                    f"must be a number (higher is better)."
                )
        checked[group] = [float(value) for value in values]
    first, epochs = next((group, len(values)) for group, values in checked.items())
    for group, values in checked.items():
        if len(values) != epochs:
            raise SelectionError(
                f"{source}: group {group!r} has {len(values)} scores but group {first!r} has {epochs}; give "
                f"every group one score per epoch, in epoch order."
            )
    return checked


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_scores(paths: Sequence[str | Path], groups: str | Path | None = None) -> dict[str, list[float]]:
    """Read per-epoch group scores from one scores file or from lm-eval result files (one per epoch).

    Args:
        paths: one JSON scores file, or lm-evaluation-harness result files in epoch order.
        groups: optional JSON file {group: ["task", "task:metric,filter", ...]} (lm-eval files only).

    Returns:
        {group: [score at epoch 1, epoch 2, ...]}.

    Raises:
        SelectionError: a missing or malformed file, a task or metric absent from a file, files of both
            kinds mixed, or epochs that do not cover the same tasks.
    """
    if not paths:
        raise SelectionError("No score files given; pass one scores JSON file or lm-eval result files.")
    documents = [(Path(path), _read_json(Path(path))) for path in paths]
    is_lm_eval = [isinstance(doc, dict) and "results" in doc for _, doc in documents]
    if not any(is_lm_eval):
        if len(documents) > 1:
            raise SelectionError(
                f"{documents[1][0]}: a second scores file; one scores file holds every epoch "
                f"({_SCORES_SHAPE}): pass only one, or pass lm-eval result files, one per epoch."
            )
        if groups is not None:
            raise SelectionError(
                f"{documents[0][0]}: --groups applies to lm-eval result files only; a scores file already "
                f"names its groups."
            )
        path, doc = documents[0]
        return _check_scores(doc, str(path))
    if not all(is_lm_eval):
        odd = documents[is_lm_eval.index(False)][0]
        lm_eval = documents[is_lm_eval.index(True)][0]
        raise SelectionError(
            f'{odd}: not an lm-evaluation-harness result file (no "results" section) while {lm_eval} is; '
            f"pass either one scores file or one lm-eval result file per epoch."
        )
    spec = _read_groups(Path(groups)) if groups is not None else None
    per_epoch = [_lm_eval_groups(path, doc, spec) for path, doc in documents]
    first_path, first = documents[0][0], per_epoch[0]
    for (path, _), epoch in zip(documents, per_epoch):
        if epoch.keys() != first.keys():
            raise SelectionError(
                f"{path}: tasks {sorted(epoch.keys() ^ first.keys())} are in only one of {path} and "
                f"{first_path}; every epoch must be evaluated on the same tasks (rerun with the same --tasks, "
                f"or choose the tasks with --groups)."
            )
    return {group: [epoch[group] for epoch in per_epoch] for group in first}


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SelectionError(
            f"{path}: no such file; pass an existing scores JSON file or lm-eval result files."
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise SelectionError(f"{path}: line {error.lineno}: not valid JSON ({error.msg}).") from None


def _read_groups(path: Path) -> dict[str, list[tuple[str, str | None]]]:
    """{group: [(task, metric or None), ...]} from a groups file."""
    raw = _read_json(path)
    shape = '{"group name": ["task", "task:metric,filter", ...], ...}'
    if not isinstance(raw, dict) or not raw:
        raise SelectionError(f"{path}: no groups; a groups file is a JSON object {shape}.")
    spec: dict[str, list[tuple[str, str | None]]] = {}
    for group, tasks in raw.items():
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise SelectionError(
                f"{path}: group {group!r} holds {tasks!r}; give it a non-empty list of task names, as in {shape}."
            )
        spec[group] = [(task, metric or None) for task, _, metric in (t.partition(":") for t in tasks)]
    return spec


def _lm_eval_groups(
    path: Path, doc: dict[str, Any], spec: dict[str, list[tuple[str, str | None]]] | None
) -> dict[str, float]:
    """{group: score} of one epoch's lm-eval result file."""
    results = doc["results"]
    if not isinstance(results, dict) or not results:
        raise SelectionError(f'{path}: the "results" section holds no tasks; rerun the evaluation.')
    if spec is None:
        subtasks = {task for tasks in doc.get("group_subtasks", {}).values() for task in tasks}
        spec = {task: [(task, None)] for task in results if task not in subtasks}
    return {
        group: statistics.fmean(_task_score(path, doc, task, metric) for task, metric in tasks)
        for group, tasks in spec.items()
    }


def _task_score(path: Path, doc: dict[str, Any], task: str, metric: str | None) -> float:
    results = doc["results"]
    if task not in results:
        raise SelectionError(
            f"{path}: task {task!r} is not in its results (tasks: {', '.join(results)}); fix the name in the "
            f"groups file or evaluate that task."
        )
    entry = results[task]
    available = [key for key, value in entry.items() if _is_number(value) and "_stderr" not in key]
    if metric is None:
        metric = _default_metric(path, task, available)
    elif metric not in available:
        raise SelectionError(
            f"{path}: task {task!r} has no numeric metric {metric!r} (it has {available}); name one of "
            f"those after the colon in the groups file."
        )
    higher_is_better = doc.get("higher_is_better", {}).get(task, {}).get(metric.split(",")[0])
    if higher_is_better is False:
        raise SelectionError(
            f"{path}: task {task!r}, metric {metric!r} is lower-is-better; selection needs higher-is-better "
            f'scores: choose another metric in the groups file as "{task}:METRIC".'
        )
    return float(entry[metric])


def _default_metric(path: Path, task: str, available: list[str]) -> str:
    """The first METRIC_PREFERENCE name the task reports: its `none` filter, else its only filter."""
    for name in METRIC_PREFERENCE:
        keys = [key for key in available if key.split(",")[0] == name]
        if f"{name},none" in keys:
            return f"{name},none"
        if len(keys) == 1:
            return keys[0]
        if keys:
            raise SelectionError(
                f"{path}: task {task!r} reports {name} under several filters ({', '.join(keys)}); choose one "
                f'in a --groups file, e.g. {{"{task}": ["{task}:{keys[0]}"]}}.'
            )
    raise SelectionError(
        f"{path}: task {task!r} reports none of {', '.join(METRIC_PREFERENCE)} (it has {available}); choose "
        f'its metric in a --groups file, e.g. {{"{task}": ["{task}:METRIC"]}}.'
    )


def epoch_models(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(epoch, model directory) of every RUN_DIR/epochs/epoch-K/hf, in epoch order.

    Raises:
        SelectionError: the run exported no epoch model.
    """
    found = []
    for directory in Path(run_dir).glob("epochs/epoch-*/hf"):
        number = directory.parent.name.removeprefix("epoch-")
        if number.isdigit():
            found.append((int(number), directory))
    if not found:
        raise SelectionError(
            f"{run_dir}: no epochs/epoch-K/hf model; train with --train.export_every_epoch true."
        )
    return sorted(found)


def evaluate_epoch(
    model_dir: str | Path,
    tasks: Sequence[str],
    output: str | Path,
    *,
    include_path: str | Path | None = None,
    device: str | None = None,
    dtype: str = "float32",
    batch_size: int | str = 1,
) -> Path | None:
    """Evaluate one exported model with lm-evaluation-harness and write the result file `load_scores` reads.

    It runs `lm_eval.simple_evaluate` with lm-eval's `hf` model, which loads `model_dir` afresh, so it can also
    be called during training, after each epoch's export. lm-eval seeds Python's, NumPy's and torch's random
    generators; their states are restored afterwards, so the caller's random streams go on as if it had not
    run.

    Args:
        model_dir: a Hugging Face model directory with its tokenizer files (RUN_DIR/epochs/epoch-K/hf).
        tasks: lm-eval task or group names, or paths of task YAML files.
        output: the JSON file to write (RUN_DIR/epochs/epoch-K/lm_eval.json); its folder must exist.
        include_path: a folder of extra task YAMLs (a local task over a local JSONL file runs offline). When
            it defines every one of `tasks`, lm-eval's built-in tasks are not indexed at all (that takes
            seconds).
        device: "cpu", "cuda", "cuda:1", ...; None: "cuda" when torch sees a GPU, else "cpu" (lm-eval's own
            default is "cuda", which fails on a machine without one).
        dtype: the dtype the model is evaluated in.
        batch_size: lm-eval's batch size, a number or "auto".

    Returns:
        `output`, or None where lm-eval returns no results (in every process but the first of a multi-GPU
        data-parallel evaluation, where lm-eval shards the items over the processes).

    Raises:
        ImportError: lm-eval is not installed.
        SelectionError: a task lm-eval does not know, or an `include_path` that is not a folder.
    """
    import torch

    try:
        import lm_eval
        from lm_eval.utils import handle_non_serializable
    except ImportError as error:
        raise ImportError("--run needs lm-evaluation-harness: pip install 'hermes[eval]'") from error
    manager = _task_manager(list(tasks), include_path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with _random_state_kept():
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": dtype},
            tasks=list(tasks),
            task_manager=manager,
            device=device,
            batch_size=batch_size,
            log_samples=False,
        )
    if results is None:
        return None
    output = Path(output)
    output.write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    return output


def check_tasks(tasks: Sequence[str], include_path: str | Path | None = None) -> None:
    """Fail now, before any work, when lm-eval is missing or does not know one of `tasks`.

    Raises:
        ImportError: lm-eval is not installed.
        SelectionError: as `evaluate_epoch` would raise it for these tasks.
    """
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise ImportError("evaluating with lm-eval needs it installed: pip install 'hermes[eval]'") from error
    _task_manager(list(tasks), include_path)


def _task_manager(tasks: list[str], include_path: str | Path | None) -> Any:
    """An lm-eval TaskManager that knows every one of `tasks`; only `include_path`'s when it defines them all.

    Raises:
        SelectionError: `include_path` is not a folder, or a task is in neither index (named, with close
            matches).
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise SelectionError(
                f"--include-path {include_path}: no such folder; pass the folder that holds the task YAMLs."
            )
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(tasks) <= set(local.all_subtasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    known = set(manager.all_tasks)
    where = (
        f"lm-eval's built-in tasks or those under {include_path}"
        if include_path
        else "lm-eval's built-in tasks"
    )
    for task in tasks:
        if task not in known and not Path(task).is_file():
            close = difflib.get_close_matches(task, known, n=3)
            hint = f" (close names: {', '.join(close)})" if close else ""
            raise SelectionError(
                f"task {task!r} is none of {where}{hint}; fix the name in --tasks, or pass the folder of its "
                f"task YAML with --include-path DIR."
            )
    return manager


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's random generator states (torch's CUDA one of the current device,
    when CUDA is in use) on leaving."""
    import numpy
    import torch

    python_state, numpy_state = random.getstate(), numpy.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            numpy.random.set_state(numpy_state)


def evaluate_run(
    run_dir: str | Path,
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    *,
    device: str | None = None,
    dtype: str = "float32",
    batch_size: int | str = 1,
) -> list[Path]:
    """Evaluate every epoch model of `run_dir` (`epoch_models`) with `evaluate_epoch`, in this one process.

    Returns:
        The result files RUN_DIR/epochs/epoch-K/lm_eval.json, in epoch order.
    """
    files = []
    for _, directory in epoch_models(run_dir):
        output = directory.parent / "lm_eval.json"
        evaluate_epoch(
            directory,
            tasks,
            output,
            include_path=include_path,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
        )
        files.append(output)
    return files


def format_table(selection: Selection) -> str:
    """The normalised scores per group and epoch, the totals, and the chosen epoch, as text."""
    epochs = len(selection.total)
    rows = [("epoch", [str(epoch) for epoch in range(1, epochs + 1)])]
    rows += [(group, [f"{value:.1f}" for value in values]) for group, values in selection.normalized.items()]
    rows += [(group, ["const"] * epochs) for group in selection.constant]
    rows += [("total", [f"{value:.1f}" for value in selection.total])]
    name_width = max(len(name) for name, _ in rows)
    cell_width = max(len(cell) for _, cells in rows for cell in cells) + 2
    lines = [
        name.ljust(name_width) + "".join(cell.rjust(cell_width) for cell in cells) for name, cells in rows
    ]
    if selection.constant:
        lines.append(f"const: equal in every epoch, left out of the total ({', '.join(selection.constant)})")
    best = selection.best_epoch
    lines.append(f"best epoch: {best} (total {selection.total[best - 1]:.1f})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hermes.select",
        description="Choose the epoch whose benchmark scores, min-max normalised per group, average highest.",
    )
    parser.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help=f"one scores JSON file {_SCORES_SHAPE}, or lm-eval result files, one per epoch, in epoch order",
    )
    parser.add_argument(
        "--groups",
        metavar="GROUPS",
        help='JSON file {"group": ["task", "task:metric,filter", ...]} (lm-eval)',
    )
    parser.add_argument(
        "--run", metavar="RUN_DIR", help="evaluate RUN_DIR/epochs/epoch-K/hf with lm-eval first"
    )
    parser.add_argument("--tasks", help="lm-eval tasks for --run, comma-separated")
    parser.add_argument("--include-path", metavar="DIR", help="folder of extra lm-eval task YAMLs (--run)")
    parser.add_argument(
        "--device", help='where lm-eval runs the models (--run; default "cuda" if any, else "cpu")'
    )
    parser.add_argument(
        "--dtype", default="float32", help="dtype lm-eval evaluates in (--run; default float32)"
    )
    parser.add_argument("--batch-size", default="1", help='lm-eval batch size, a number or "auto" (--run)')
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if bool(args.run) == bool(args.files) or bool(args.run) != bool(args.tasks):
        parser.error("pass either score files, or --run RUN_DIR with --tasks TASKS")
    try:
        files = args.files
        if args.run:
            tasks = [task for task in args.tasks.split(",") if task]
            files = evaluate_run(
                args.run,
                tasks,
                args.include_path,
                device=args.device,
                dtype=args.dtype,
                batch_size=args.batch_size,
            )
        selection = select_epoch(load_scores(files, args.groups), source=str(files[0]))
    except (SelectionError, ImportError) as error:
        parser.error(str(error))
    print(json.dumps(selection.to_dict(), indent=2) if args.json else format_table(selection))
    return 0


if __name__ == "__main__":
    sys.exit(main())
