"""What a person watching a run sees and keeps: the progress bar, the wandb run a resume continues, and the
profiles asked for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hermes.config import ConfigError, load_config
from hermes.train.profiling import StepProfiler
from tests.launching import debug_overrides, metrics, run_launch, small_sft_data


def _overrides(root: Path, steps: int) -> list[str]:
    args = debug_overrides(root / "run", small_sft_data(root / "data.jsonl", 40), root / "cache", steps)
    return [
        *args,
        "--logging.progress",
        "true",
        "--logging.wandb",
        "offline",
        "--run.allow_changes",
        "train.max_steps",
    ]


def test_a_resumed_run_continues_its_wandb_run_bar_and_profiles_the_steps_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / variable.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run"

    first = run_launch("sft.py", 2, [*_overrides(tmp_path, 2), "--logging.profile_steps", "2"])
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert run_id
    assert "2/2" in first.stderr and "tok/s" in first.stderr and "loss" in first.stderr

    second = run_launch("sft.py", 2, _overrides(tmp_path, 4))
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    offline_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(name.endswith(f"-{run_id}") for name in offline_runs)
    # The bar of the resumed process starts at the checkpoint's step, not at 0.
    assert "2/4" in second.stderr and "4/4" in second.stderr and "0/4" not in second.stderr
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2, 3, 4]

    traces = sorted(p.name for p in (run_dir / "profile").iterdir())
    assert traces == ["step-2-rank-0.json", "step-2-rank-1.json"]  # asked in the first run only
    events = json.loads((run_dir / "profile" / "step-2-rank-0.json").read_text())["traceEvents"]
    names = {event.get("name", "") for event in events}
    assert {"aten::mm", "aten::embedding_backward"} <= names or {"aten::mm", "aten::embedding"} <= names
    assert any("backward" in name.lower() for name in names)  # the step's backward is inside the trace


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA snapshot is tested in tests/test_gpu.py")
def test_memory_snapshot_off_cuda_is_a_note_not_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profiler = StepProfiler(tmp_path / "profile", 0, [], memory_snapshot_step=1)
    profiler.begin(1)
    assert profiler.end(1) == []
    assert "no memory snapshot is written" in capsys.readouterr().out
    assert not (tmp_path / "profile").exists()


@pytest.mark.parametrize(("value", "expected"), [("3", [3]), ("2,5", [2, 5]), ("[1, 4]", [1, 4])])
def test_profile_steps_take_one_step_a_comma_list_or_a_toml_list(value: str, expected: list[int]) -> None:
    assert load_config(overrides=["--logging.profile_steps", value]).logging.profile_steps == expected


def test_profile_steps_below_one_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"logging.profile_steps = \[0, 2\] is out of range"):
        load_config(overrides=["--logging.profile_steps", "0,2"])
