"""The checkpointer: keeping the last k, asynchronous saves and what a crash during one leaves behind."""

import json
import subprocess
import sys
import textwrap

import torch

from hermes.model import Llama, LlamaConfig
from hermes.parallel.checkpoint import Checkpointer, complete_checkpoints, latest_checkpoint
from tests.launching import REPO, one_process_group


class Counter:
    """Trainer state registered with the checkpointer, as the schedule and the loader are."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = Llama(LlamaConfig.preset("debug").replace(n_layers=1, vocab_size=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    return model, optimizer


def test_keep_last_k_deletes_only_older_non_epoch_end_checkpoints(tmp_path):
    model, optimizer = _model_and_optimizer()
    directory = tmp_path / "checkpoints"
    with one_process_group(tmp_path / "store"):
        checkpointer = Checkpointer(directory, model, optimizer, {"counter": Counter()}, keep=2)
        for step in range(1, 7):
            checkpointer.save(step, epoch_end=step == 2)
            kept = [s for s, _ in complete_checkpoints(directory)]
            assert kept[-1] == step  # the newest complete checkpoint is never deleted
        assert kept == [2, 5, 6]  # the two newest, and the epoch end
        (directory / "step-7.partial").mkdir()  # a killed save: left alone, and never loaded
        checkpointer.save(8)
    assert [s for s, _ in complete_checkpoints(directory)] == [2, 6, 8]
    assert (directory / "step-7.partial").is_dir()


def test_keep_zero_keeps_every_checkpoint(tmp_path):
    model, optimizer = _model_and_optimizer()
    with one_process_group(tmp_path / "store"):
        checkpointer = Checkpointer(tmp_path / "c", model, optimizer, {}, keep=0)
        for step in range(1, 5):
            checkpointer.save(step)
    assert [s for s, _ in complete_checkpoints(tmp_path / "c")] == [1, 2, 3, 4]


def test_an_async_save_resumes_to_the_saved_state(tmp_path):
    model, optimizer = _model_and_optimizer(seed=1)
    counter = Counter()
    counter.value = 7
    expected = {name: t.clone() for name, t in model.state_dict().items()}
    with one_process_group(tmp_path / "store"):
        checkpointer = Checkpointer(tmp_path / "c", model, optimizer, {"counter": counter}, async_save=True)
        checkpointer.save(3)
        assert latest_checkpoint(tmp_path / "c") is None  # not published until it is waited for
        checkpointer.wait()
    fresh, fresh_optimizer = _model_and_optimizer(seed=2)
    restored = Counter()
    with one_process_group(tmp_path / "store2"):
        step = Checkpointer(tmp_path / "c", fresh, fresh_optimizer, {"counter": restored}).resume()
    assert step == 3 and restored.value == 7
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert json.loads((tmp_path / "c" / "step-3" / "trainer.json").read_text())["counter"] == {"value": 7}


CRASH_DURING_ASYNC_SAVE = """
import os, sys, torch
from pathlib import Path
sys.path.insert(0, {repo!r})
from hermes.parallel.checkpoint import Checkpointer
from tests.launching import one_process_group
from tests.test_checkpointer import Counter, _model_and_optimizer

root = Path({root!r})
model, optimizer = _model_and_optimizer()
with one_process_group(root / "store"):
    checkpointer = Checkpointer(root / "c", model, optimizer, {{"counter": Counter()}}, async_save=True)
    checkpointer.save(2)
    checkpointer.wait()
    torch.save(model.state_dict(), root / "at-step-2.pt")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    checkpointer.save(4)  # in flight in the background ...
    os._exit(3)  # ... when the process dies
"""


def test_a_crash_during_an_async_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = CRASH_DURING_ASYNC_SAVE.format(repo=str(REPO), root=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, capture_output=True)
    assert result.returncode == 3, result.stderr.decode()[-2000:]
    assert latest_checkpoint(tmp_path / "c") == tmp_path / "c" / "step-2"
    assert not (tmp_path / "c" / "step-4").exists()
    model, optimizer = _model_and_optimizer(seed=5)
    with one_process_group(tmp_path / "store-load"):
        assert Checkpointer(tmp_path / "c", model, optimizer, {"counter": Counter()}).resume() == 2
    saved = torch.load(tmp_path / "at-step-2.pt", weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
