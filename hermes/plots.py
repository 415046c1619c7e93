"""PNG plots of a run's `metrics.jsonl`: loss, learning rate, throughput, and the DPO rewards.

`plot_run(run_dir)` writes them to `run_dir/plots/`; `python -m hermes.plots RUN_DIR` does the same from
the shell. Every plot is drawn against the optimizer step, with alternate epochs shaded. A plot is drawn
when the log holds any of its keys (the DPO plots only for DPO runs). matplotlib is imported only when
plotting; figures are rendered with the Agg backend without touching pyplot's global state, so plotting works on headless nodes and inside
notebooks alike.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

FIGSIZE_INCHES = (8.0, 4.5)
DPI = 100
"""Every PNG is FIGSIZE_INCHES * DPI pixels: 800 x 450."""


class Plot(NamedTuple):
    name: str
    """File name without `.png`."""
    title: str
    ylabel: str
    keys: tuple[str, ...]
    """metrics.jsonl keys drawn as lines; the plot is skipped when none of them is logged."""


PLOTS = (
    Plot("loss", "Training and validation loss", "loss", ("loss", "val_loss")),
    Plot("lr", "Learning rate", "learning rate", ("lr",)),
    Plot("tokens_per_s", "Throughput", "tokens / s", ("tokens_per_s",)),
    Plot("rewards", "DPO rewards", "reward", ("rewards/chosen", "rewards/rejected", "rewards/margins")),
    Plot(
        "reward_accuracies",
        "DPO reward accuracy (share of pairs with r_chosen > r_rejected)",
        "accuracy",
        ("rewards/accuracies",),
    ),
)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, one per optimizer step.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, a line is not a JSON object, or a record has no numeric `step`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; pass the directory of a run that has logged at least one step."
        )
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{number}: not valid JSON ({error.msg}); fix or delete that line."
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(
                f'{path}:{number}: expected a JSON object with an integer "step", got {line[:80]!r}; fix or '
                f"delete that line."
            )
        records.append(record)
    if not records:
        raise ValueError(
            f"{path}: no records; the run has not finished a step yet, so there is nothing to plot."
        )
    return records


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the PNG plots of `run_dir/metrics.jsonl` to `run_dir/plots/`.

    Args:
        run_dir: a run directory holding metrics.jsonl.

    Returns:
        The paths of the PNG files written (`plots/<name>.png`), in the order of PLOTS.

    Raises:
        FileNotFoundError, ValueError: see `read_metrics`.
    """
    run_dir = Path(run_dir)
    figures = make_figures(read_metrics(run_dir / "metrics.jsonl"))
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []
    for name, figure in figures.items():
        path = out / f"{name}.png"
        figure.savefig(path, dpi=DPI)
        written.append(path)
    return written


def make_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One matplotlib Figure (Agg canvas) per entry of PLOTS whose keys appear in `records`.

    Args:
        records: metrics.jsonl records, each with an integer `step` (and usually `epoch`).

    Returns:
        {plot name: Figure}, in the order of PLOTS.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figures = {}
    for plot in PLOTS:
        series = {key: _series(records, key) for key in plot.keys}
        series = {key: (steps, values) for key, (steps, values) in series.items() if steps}
        if not series:
            continue
        figure = Figure(figsize=FIGSIZE_INCHES, dpi=DPI, layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        _shade_epochs(axes, records)
        for key, (steps, values) in series.items():
            axes.plot(steps, values, label=key, marker="." if len(steps) < 50 else None)
        axes.set(title=plot.title, xlabel="step", ylabel=plot.ylabel)
        axes.grid(alpha=0.3)
        axes.margins(y=0.12)  # headroom for the epoch labels
        if len(series) > 1:
            axes.legend()
        figures[plot.name] = figure
    return figures


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that logged `key`."""
    points = [(record["step"], record[key]) for record in records if record.get(key) is not None]
    return [step for step, _ in points], [value for _, value in points]


def _shade_epochs(axes: Any, records: list[dict[str, Any]]) -> None:
    """Shade every second epoch's span of steps and label each epoch at the top of the axes."""
    spans: dict[int, list[int]] = {}
    for record in records:
        if "epoch" in record:
            span = spans.setdefault(record["epoch"], [record["step"], record["step"]])
            span[0], span[1] = min(span[0], record["step"]), max(span[1], record["step"])
    for index, (epoch, (first, last)) in enumerate(sorted(spans.items())):
        if index % 2:
            axes.axvspan(first - 0.5, last + 0.5, color="0.9", zorder=0)
        axes.text(
            (first + last) / 2,
            0.98,
            f"epoch {epoch}",
            transform=axes.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize="small",
            color="0.4",
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hermes.plots",
        description="Write PNG plots of RUN_DIR/metrics.jsonl to RUN_DIR/plots/.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory holding metrics.jsonl")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
