"""Run directories a person can trust, through real torchrun runs: no code from checkpoints, one writer,
honest resume, checked bytes, storage failures and early errors."""

import fcntl
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hermes.config import ConfigError, parse_args
from hermes.model import Llama, LlamaConfig
from hermes.model.hf import save_pretrained
from tests.launching import REPO, debug_overrides, metrics, run_launch, small_sft_data, torchrun_command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return root, small_sft_data(root / "data.jsonl", records=40), root / "cache"


def _args(workspace, name: str, steps: int, *extra: str) -> list[str]:
    root, data, cache = workspace
    return [*debug_overrides(root / name, data, cache, steps), *extra]


def _failing(command: list[str], cwd: Path = REPO) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert result.returncode != 0, result.stdout[-2000:]
    return result.stdout + result.stderr


class _Plant:
    """A pickle that, when loaded, creates the marker file (what a hostile .metadata would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_planted_metadata_never_runs_on_resume_or_in_generation(workspace, tmp_path):
    args = _args(workspace, "planted", 2)
    run_launch("sft.py", 1, args)
    run_dir = workspace[0] / "planted"
    marker = tmp_path / "pwned"
    checkpoint = run_dir / "checkpoints" / "step-2"
    planted = pickle.dumps(_Plant(marker))
    (checkpoint / ".metadata").write_bytes(planted)
    # Whoever can plant a file can also rewrite the checksum the marker lists for it.
    complete = json.loads((checkpoint / "COMPLETE").read_text())
    complete["sha256"][".metadata"] = hashlib.sha256(planted).hexdigest()
    (checkpoint / "COMPLETE").write_text(json.dumps(complete))
    resume = _failing(
        torchrun_command(
            "sft.py", 1, [*args, "--train.max_steps", "4", "--run.allow_changes", "train.max_steps"]
        )
    )
    assert "was not loaded" in resume or "refused" in resume
    generate = _failing([sys.executable, "launch/generate.py", "--model", str(run_dir), "--prompt", "Hi"])
    assert ".metadata" in generate
    assert not marker.exists()


def _lock_is_free(path: Path) -> bool:
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def test_a_second_run_on_the_same_directory_is_refused_and_a_stale_lock_taken_over(workspace):
    args = _args(workspace, "locked", 1000)
    run_dir = workspace[0] / "locked"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        torchrun_command("sft.py", 1, args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip():
        assert first.poll() is None and time.monotonic() < deadline, "the first run did not start training"
        time.sleep(0.2)
    second = _failing(torchrun_command("sft.py", 1, args))
    assert f"{run_dir} is in use by another run (host " in second and "pid " in second
    os.killpg(first.pid, signal.SIGTERM)  # preempted: it checkpoints, exits and releases the lock
    first.communicate(timeout=120)
    deadline = time.monotonic() + 120  # the worker (in a session of its own) may outlive torchrun a moment
    while not _lock_is_free(run_dir / ".lock"):
        assert time.monotonic() < deadline, "the preempted run kept its lock"
        time.sleep(0.2)
    steps = [r["step"] for r in metrics(run_dir)]
    assert steps == list(range(1, len(steps) + 1))  # one writer: each step once, in order
    # A run killed with SIGKILL leaves its record in the file; its lock died with it.
    (run_dir / ".lock").write_text(json.dumps({"host": "gone", "pid": 999999999, "since": "earlier"}))
    result = run_launch(
        "sft.py", 1, [*args, "--train.max_steps", "2", "--run.allow_changes", "train.max_steps"]
    )
    assert "took over the stale lock of a run that is gone (host gone, pid 999999999" in result.stdout


def test_resuming_with_changed_values_is_refused_or_applied_as_asked(workspace):
    run_dir = workspace[0] / "changed"
    run_launch("sft.py", 1, _args(workspace, "changed", 2, "--optim.lr", "3e-3"))
    before = (run_dir / "config.toml").read_text()
    other_data = small_sft_data(workspace[0] / "other.jsonl", records=30)
    refused = _failing(
        torchrun_command(
            "sft.py", 1,
            _args(workspace, "changed", 4, "--optim.lr", "1e-3", "--train.global_batch", "2", "--data.train", str(other_data)),
        )
    )  # fmt: skip
    for line in (
        "optim.lr: 0.003 -> 0.001",
        "train.global_batch: 4 -> 2",
        "train.max_steps: 2 -> 4",
        "data.train:",
    ):
        assert line in refused
    assert "--run.allow_changes" in refused
    assert (run_dir / "config.toml").read_text() == before  # a refused resume writes nothing
    result = run_launch(
        "sft.py",
        1,
        _args(
            workspace, "changed", 4, "--optim.lr", "1e-3", "--run.allow_changes", "optim.lr,train.max_steps"
        ),
    )
    assert "with changed values" in result.stdout and "optim.lr: 0.003 -> 0.001" in result.stdout
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    from hermes.train.optim import lr_factor

    # Step 3 runs at the new peak, at the position the schedule had reached (warmup 2 of 4 steps).
    assert records[2]["lr"] == pytest.approx(1e-3 * lr_factor(2, 2, 4, "cosine", 0.0), rel=1e-6)
    assert "lr = 0.001" in (run_dir / "config.toml").read_text()


def test_corrupted_bytes_are_detected_and_the_previous_checkpoint_is_used(workspace):
    run_dir = workspace[0] / "corrupt"
    run_launch("sft.py", 1, _args(workspace, "corrupt", 4))
    reference = metrics(run_dir)
    damaged = run_dir / "checkpoints" / "step-4" / "__0_0.distcp"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    result = run_launch("sft.py", 1, _args(workspace, "corrupt", 4))
    assert "step-4 is damaged (__0_0.distcp does not match its checksum)" in result.stderr
    assert "Resuming from" in result.stdout and "step-2" in result.stdout
    resumed = metrics(run_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(reference[2:], resumed[2:]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5, rel=1e-5)


def test_a_torn_last_metrics_line_is_dropped_and_each_step_logged_once(workspace):
    run_dir = workspace[0] / "torn"
    run_launch("sft.py", 1, _args(workspace, "torn", 2))
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # a kill -9 in the middle of a write
    run_launch("sft.py", 1, _args(workspace, "torn", 4, "--run.allow_changes", "train.max_steps"))
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]


def test_a_full_disk_names_the_folder_and_enospc_and_leaves_no_partial(workspace, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        _, data, cache = workspace
        # One checkpoint of the debug model (about 200 MB with AdamW's states) fits, the second does not.
        args = debug_overrides(mount / "run", data, cache, 4)
        output = _failing(torchrun_command("sft.py", 1, args))
        assert "saving checkpoint" in output and "the disk is full (ENOSPC)" in output
        assert str(mount / "run" / "checkpoints" / "step-4.partial") in output
        assert not (mount / "run" / "checkpoints" / "step-4.partial").exists()
        assert [r["step"] for r in metrics(mount / "run")] == [1, 2, 3, 4]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (("--train.micro_batch", "0"), "train.micro_batch = 0 is out of range: it must be at least 1"),
        (("--train.max_steps", "-5"), "train.max_steps = -5 is out of range: it must be at least 0"),
        (("--optim.lr", "-1"), "optim.lr = -1.0 is out of range: it must be at least 0.0"),
        (
            ("--model.attention_backend", "fastest"),
            "model.attention_backend = 'fastest' is not one of 'auto',",
        ),
    ],
)
def test_bad_values_are_rejected_when_parsed(override, message):
    with pytest.raises(ConfigError) as error:
        parse_args(list(override))
    assert message in str(error.value)


def test_a_checkpoint_whose_vocabulary_differs_from_the_tokenizer_is_named(workspace, tmp_path):
    torch.manual_seed(0)
    small = tmp_path / "small-vocab"
    save_pretrained(Llama(LlamaConfig.preset("debug").replace(vocab_size=640)), small)  # no tokenizer files
    output = _failing(
        torchrun_command("sft.py", 1, [*_args(workspace, "vocab", 2), "--model.checkpoint", str(small)])
    )
    assert "has 128256 ids but the model from" in output and "has a vocabulary of 640" in output
    assert str(small) in output and "tokenizer.model" in output
    assert "Tokenized" not in output
    shutil.rmtree(small)


def test_a_run_that_dies_in_its_epoch_export_resumes_before_that_step_and_redoes_it(tmp_path):
    """The epoch-end step's checkpoint is written only after its validation and epoch export: a run that
    fails in the export leaves no checkpoint of that step, and its resume redoes the step, validates and
    exports."""
    run_dir = tmp_path / "run"
    data = small_sft_data(tmp_path / "data.jsonl", records=24)
    args = debug_overrides(run_dir, data, tmp_path / "cache", steps=0)
    args += ["--train.epochs", "2", "--data.validation_fraction", "0.25", "--train.micro_batch", "2"]
    args += ["--train.export_every_epoch", "true", "--train.checkpoint_every", "0"]
    run_dir.mkdir()
    (run_dir / "epochs").write_text("a file where the epoch exports go: the first export fails\n")
    failed = subprocess.run(
        torchrun_command("sft.py", 1, args), capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert failed.returncode != 0
    assert not list((run_dir / "checkpoints").glob("step-*"))  # epoch 1's step was not checkpointed
    assert [r["step"] for r in metrics(run_dir)] == [1, 1]  # its step and validation were logged

    (run_dir / "epochs").unlink()
    run_launch("sft.py", 1, args)
    records = metrics(run_dir)
    assert [(r["step"], "val_loss" in r) for r in records] == [(1, False), (1, True), (2, False), (2, True)]
    assert all((run_dir / "epochs" / f"epoch-{k}" / "hf" / "config.json").is_file() for k in (1, 2))
