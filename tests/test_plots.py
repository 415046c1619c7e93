import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
from matplotlib import image as mpimg

from hermes.plots import make_figures, plot_run, read_metrics

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Six optimizer steps over two epochs, as the training loop logs them (warmup then decay, a GPU run).
SFT_METRICS = """\
{"step": 1, "epoch": 1, "loss": 2.31, "lr": 2e-06, "grad_norm": 4.1, "tokens": 24310, "tokens_per_s": 9120.5, "mfu": 0.41, "peak_memory_gib": 61.2}
{"step": 2, "epoch": 1, "loss": 2.05, "lr": 4e-06, "grad_norm": 3.2, "tokens": 24502, "tokens_per_s": 11876.0, "mfu": 0.43, "peak_memory_gib": 61.2}
{"step": 3, "epoch": 1, "loss": 1.88, "lr": 6e-06, "grad_norm": 2.7, "tokens": 24011, "tokens_per_s": 11902.3, "mfu": 0.43, "peak_memory_gib": 61.3}
{"step": 4, "epoch": 2, "loss": 1.61, "lr": 7e-06, "grad_norm": 2.2, "tokens": 24377, "tokens_per_s": 11890.8, "mfu": 0.43, "peak_memory_gib": 61.3}
{"step": 5, "epoch": 2, "loss": 1.57, "lr": 5.3e-06, "grad_norm": 2.0, "tokens": 23980, "tokens_per_s": 11911.1, "mfu": 0.43, "peak_memory_gib": 61.3}
{"step": 6, "epoch": 2, "loss": 1.52, "lr": 1.9e-06, "grad_norm": 1.9, "tokens": 24120, "tokens_per_s": 11899.6, "mfu": 0.43, "peak_memory_gib": 61.3}
"""
# The same steps of a DPO run on CPU (no mfu / memory), with the reward metrics.
DPO_METRICS = """\
{"step": 1, "epoch": 1, "loss": 0.693, "lr": 3.3e-07, "grad_norm": 1.2, "tokens": 4100, "tokens_per_s": 812.0, "rewards/chosen": 0.01, "rewards/rejected": -0.01, "rewards/margins": 0.02, "rewards/accuracies": 0.5, "logps/chosen": -210.0, "logps/rejected": -230.5}
{"step": 2, "epoch": 1, "loss": 0.668, "lr": 6.7e-07, "grad_norm": 1.1, "tokens": 4093, "tokens_per_s": 820.4, "rewards/chosen": 0.04, "rewards/rejected": -0.03, "rewards/margins": 0.07, "rewards/accuracies": 0.62, "logps/chosen": -208.1, "logps/rejected": -233.0}
{"step": 3, "epoch": 1, "loss": 0.631, "lr": 1e-06, "grad_norm": 1.0, "tokens": 4120, "tokens_per_s": 818.9, "rewards/chosen": 0.06, "rewards/rejected": -0.09, "rewards/margins": 0.15, "rewards/accuracies": 0.71, "logps/chosen": -206.4, "logps/rejected": -239.9}
{"step": 4, "epoch": 2, "loss": 0.589, "lr": 1.3e-06, "grad_norm": 0.9, "tokens": 4088, "tokens_per_s": 815.3, "rewards/chosen": 0.09, "rewards/rejected": -0.15, "rewards/margins": 0.24, "rewards/accuracies": 0.8, "logps/chosen": -204.2, "logps/rejected": -245.1}
{"step": 5, "epoch": 2, "loss": 0.552, "lr": 1e-06, "grad_norm": 0.9, "tokens": 4101, "tokens_per_s": 819.7, "rewards/chosen": 0.1, "rewards/rejected": -0.22, "rewards/margins": 0.32, "rewards/accuracies": 0.84, "logps/chosen": -203.9, "logps/rejected": -252.3}
{"step": 6, "epoch": 2, "loss": 0.521, "lr": 5e-07, "grad_norm": 0.8, "tokens": 4097, "tokens_per_s": 821.2, "rewards/chosen": 0.12, "rewards/rejected": -0.27, "rewards/margins": 0.39, "rewards/accuracies": 0.88, "logps/chosen": -203.0, "logps/rejected": -257.8}
"""


def write_run(run_dir: Path, metrics: str) -> Path:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_text(metrics)
    return run_dir


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    assert mpimg.imread(path).shape == (450, 800, 4)  # 8 x 4.5 inches at 100 dpi, RGBA


def test_sft_run_gets_loss_lr_and_throughput_pngs(tmp_path):
    run_dir = write_run(tmp_path / "run", SFT_METRICS)
    paths = plot_run(run_dir)
    assert paths == [run_dir / "plots" / f"{name}.png" for name in ("loss", "lr", "tokens_per_s")]
    for path in paths:
        assert_valid_png(path)


def test_dpo_run_adds_reward_and_accuracy_pngs(tmp_path):
    run_dir = write_run(tmp_path / "run", DPO_METRICS)
    paths = plot_run(run_dir)
    assert [path.name for path in paths] == [
        "loss.png",
        "lr.png",
        "tokens_per_s.png",
        "rewards.png",
        "reward_accuracies.png",
    ]
    for path in paths:
        assert_valid_png(path)


def test_figures_draw_the_logged_values_against_steps_with_epochs_marked():
    figures = make_figures([json.loads(line) for line in DPO_METRICS.splitlines()])
    steps = [1, 2, 3, 4, 5, 6]

    (loss,) = figures["loss"].axes[0].lines
    assert list(loss.get_xdata()) == steps
    assert list(loss.get_ydata()) == [0.693, 0.668, 0.631, 0.589, 0.552, 0.521]
    (accuracy,) = figures["reward_accuracies"].axes[0].lines
    assert list(accuracy.get_ydata()) == [0.50, 0.62, 0.71, 0.80, 0.84, 0.88]
    rewards = {line.get_label(): list(line.get_ydata()) for line in figures["rewards"].axes[0].lines}
    assert rewards == {
        "rewards/chosen": [0.01, 0.04, 0.06, 0.09, 0.10, 0.12],
        "rewards/rejected": [-0.01, -0.03, -0.09, -0.15, -0.22, -0.27],
        "rewards/margins": [0.02, 0.07, 0.15, 0.24, 0.32, 0.39],
    }

    axes = figures["lr"].axes[0]
    # Epoch 2 (steps 4-6) is shaded from half a step before its first step to half a step after its last.
    (shade,) = axes.patches
    assert (shade.get_x(), shade.get_x() + shade.get_width()) == (3.5, 6.5)
    assert [text.get_text() for text in axes.texts] == ["epoch 1", "epoch 2"]


def test_missing_metrics_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run[/\\]metrics.jsonl: no such file"):
        plot_run(tmp_path / "run")


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_empty_metrics_file_is_named(tmp_path, text):
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(ValueError, match=r"metrics.jsonl: no records; the run has not finished a step"):
        plot_run(tmp_path)
    assert not (tmp_path / "plots").exists()


def test_bad_lines_are_named_by_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(SFT_METRICS.splitlines()[0] + '\n{"step": 2, "loss": \n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON .*; fix or delete that line"):
        read_metrics(path)
    path.write_text(SFT_METRICS.splitlines()[0] + '\n{"loss": 2.0}\n')
    with pytest.raises(ValueError, match=r'metrics.jsonl:2: expected a JSON object with an integer "step"'):
        read_metrics(path)


def test_command_writes_the_pngs_and_prints_their_paths(tmp_path):
    run_dir = write_run(tmp_path / "run", SFT_METRICS)
    command = [sys.executable, "-m", "hermes.plots"]
    result = subprocess.run([*command, str(run_dir)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = [Path(line) for line in result.stdout.splitlines()]
    assert printed == [run_dir / "plots" / name for name in ("loss.png", "lr.png", "tokens_per_s.png")]
    assert all(path.stat().st_size > 0 for path in printed)

    missing = tmp_path / "nowhere"
    result = subprocess.run([*command, str(missing)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"{missing / 'metrics.jsonl'}: no such file" in result.stderr
