"""A DCP checkpoint's pickles (`.metadata`, the non-tensor entries of `.distcp`) are read under allow-lists:
a planted pickle is refused, naming its file, and runs nothing; real checkpoints still load exactly."""

import hashlib
import json
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch

from hermes.generate import load_model
from hermes.model.hf import save_pretrained
from hermes.model.lora import apply_lora
from hermes.parallel.checkpoint import COMPLETE_MARKER, Checkpointer, CheckpointIntegrityError
from hermes.parallel.safe_dcp import CheckpointSecurityError, SafeFileSystemReader
from tests.launching import one_process_group
from tests.test_generate import _model, _write_run


class _Touch:
    """Unpickling it creates `path` (pathlib's Path.touch): it stands for any code a pickle can run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def _trained(seed: int, lora: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model (with LoRA adapters on every linear layer when `lora`) and an AdamW one step in."""
    model = _model(seed=0)
    if lora:
        apply_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=("all-linear",))
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(torch.tensor([[5, 17, 99, 3]])).float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def _checkpoint(tmp_path: Path, model, optimizer, trainable_only: bool = False) -> Path:
    with one_process_group(tmp_path / "save-store"):
        Checkpointer(tmp_path / "checkpoints", model, optimizer, {}, trainable_only=trainable_only).save(1)
        return tmp_path / "checkpoints" / "step-1"


def _resume(tmp_path: Path, checkpoint: Path, model, optimizer, trainable_only: bool = False) -> None:
    with one_process_group(tmp_path / "load-store"):
        Checkpointer(checkpoint.parent, model, optimizer, {}, trainable_only=trainable_only).resume()


def _live(payload: bytes, marker: Path) -> bytes:
    """`payload`, after checking that plain pickle does run it (it creates `marker`, removed again)."""
    pickle.loads(payload)
    assert marker.exists()
    marker.rmdir() if marker.is_dir() else marker.unlink()
    return payload


def _plant(checkpoint: Path, name: str, payload: bytes) -> None:
    """Replace a checkpoint file, and its checksum in the COMPLETE marker, as whoever can write into the
    run directory can."""
    (checkpoint / name).write_bytes(payload)
    complete = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    complete["sha256"][name] = hashlib.sha256(payload).hexdigest()
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps(complete))


def _refusal(path: Path, refused: str) -> str:
    return rf"{re.escape(str(path))} was not loaded: its pickle asks for {refused}.*could run code"


def test_a_planted_metadata_pickle_is_refused_on_resume_and_runs_nothing(tmp_path):
    checkpoint = _checkpoint(tmp_path, *_trained(seed=1))
    marker = tmp_path / "ran"
    _plant(checkpoint, ".metadata", _live(pickle.dumps(_Touch(marker)), marker))
    with pytest.raises(
        CheckpointSecurityError, match=_refusal(checkpoint / ".metadata", r"pathlib\.\S*Path\.touch")
    ):
        _resume(tmp_path, checkpoint, *_trained(seed=2))
    assert not marker.exists()


def test_a_planted_file_that_does_not_match_its_checksum_is_never_read(tmp_path):
    checkpoint = _checkpoint(tmp_path, *_trained(seed=1))
    marker = tmp_path / "ran"
    (checkpoint / ".metadata").write_bytes(_live(pickle.dumps(_Touch(marker)), marker))
    with pytest.raises(CheckpointIntegrityError, match=r"every checkpoint in .* is damaged \(step-1\)"):
        _resume(tmp_path, checkpoint, *_trained(seed=2))
    assert not marker.exists()


def test_a_planted_metadata_pickle_is_refused_by_generation_and_runs_nothing(tmp_path):
    save_pretrained(_model(seed=0), tmp_path / "base")
    _write_run(tmp_path / "run", tmp_path / "base", _model(seed=1), trainable_only=False)
    metadata = tmp_path / "run" / "checkpoints" / "step-3" / ".metadata"
    marker = tmp_path / "ran"
    metadata.write_bytes(_live(pickle.dumps(_Touch(marker)), marker))
    with pytest.raises(CheckpointSecurityError, match=_refusal(metadata, r"pathlib\.\S*Path\.touch")):
        load_model(tmp_path / "run")
    assert not marker.exists()


def test_a_hostile_non_tensor_entry_is_refused_on_resume_and_runs_nothing(tmp_path):
    """The optimizer's hyperparameters are pickles inside the .distcp file, which DCP's default planner
    reads with torch.load(weights_only=False)."""
    model, optimizer = _trained(seed=1)
    marker = tmp_path / "ran"
    optimizer.param_groups[0]["lr"] = _Touch(marker)
    checkpoint = _checkpoint(tmp_path, model, optimizer)
    with pytest.raises(
        CheckpointSecurityError,
        match=rf"{re.escape(str(checkpoint))}/__0_0\.distcp was not loaded: its entry optim\.param_groups\.0\.lr",
    ):
        _resume(tmp_path, checkpoint, *_trained(seed=2))
    assert not marker.exists()


def _text(value: str) -> bytes:
    data = value.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _stack_global_call(module: str, name: str, argument: str) -> bytes:
    """A protocol 4 pickle of `module`'s attribute `name` (dotted names walk attributes) called on
    `argument`."""
    callable_ = pickle.PROTO + b"\x04" + _text(module) + _text(name) + pickle.STACK_GLOBAL
    return callable_ + _text(argument) + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP


def _getattr_import_call(argument: str) -> bytes:
    """`getattr(__import__("os"), "mkdir")(argument)`, in protocol 0."""
    return b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVmkdir\ntR(V" + argument.encode() + b"\ntR."


# os.mkdir reached through modules the allow-list holds names of, and through getattr
HIDDEN_CALLS = [
    pytest.param(
        lambda arg: _stack_global_call("torch.distributed.checkpoint.metadata", "os.mkdir", arg),
        r"torch\.distributed\.checkpoint\.metadata\.os\.mkdir",
        id="dcp-metadata-module",
    ),
    pytest.param(lambda arg: _stack_global_call("torch", "os.mkdir", arg), r"torch\.os\.mkdir", id="torch"),
    pytest.param(
        lambda arg: _stack_global_call("torch.serialization", "os.mkdir", arg),
        r"torch\.serialization\.os\.mkdir",
        id="torch-serialization",
    ),
    pytest.param(_getattr_import_call, r"builtins\.getattr", id="getattr-of-os"),
]


@pytest.mark.parametrize(("payload", "refused"), HIDDEN_CALLS)
def test_code_hidden_behind_allowed_names_or_getattr_is_refused(tmp_path, payload, refused):
    checkpoint = _checkpoint(tmp_path, *_trained(seed=1))
    marker = tmp_path / "ran"
    (checkpoint / ".metadata").write_bytes(_live(payload(str(marker)), marker))
    with pytest.raises(CheckpointSecurityError, match=_refusal(checkpoint / ".metadata", refused)):
        SafeFileSystemReader(checkpoint).read_metadata()
    assert not marker.exists()


def test_real_metadata_reads_as_plain_pickle_reads_it(tmp_path):
    checkpoint = _checkpoint(tmp_path, *_trained(seed=1))
    safe = SafeFileSystemReader(checkpoint).read_metadata()
    plain = pickle.loads((checkpoint / ".metadata").read_bytes())
    safe.storage_meta.load_id = None  # set by the reader, as DCP's own does
    assert safe == plain


def _assert_same_state(got: torch.nn.Module, expected: torch.nn.Module) -> None:
    got = got.state_dict()
    assert got.keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(got[name], tensor), name


def _assert_same_optimizer_state(got: torch.optim.Optimizer, expected: torch.optim.Optimizer) -> None:
    got, expected = got.state_dict(), expected.state_dict()
    assert got["param_groups"] == expected["param_groups"]
    assert got["state"].keys() == expected["state"].keys()
    for key, state in expected["state"].items():
        assert state.keys() == got["state"][key].keys()
        for name, value in state.items():
            assert torch.equal(got["state"][key][name], value), (key, name)


def test_a_resumed_checkpoint_restores_model_and_optimizer_exactly(tmp_path):
    model, optimizer = _trained(seed=1)
    checkpoint = _checkpoint(tmp_path, model, optimizer)
    resumed, resumed_optimizer = _trained(seed=2)
    resumed_optimizer.param_groups[0]["lr"] = 5e-4  # a non-tensor entry, read back from its pickle
    _resume(tmp_path, checkpoint, resumed, resumed_optimizer)
    _assert_same_state(resumed, model)
    _assert_same_optimizer_state(resumed_optimizer, optimizer)


def test_a_lora_only_checkpoint_restores_the_adapters_and_their_optimizer_exactly(tmp_path):
    model, optimizer = _trained(seed=1, lora=True)
    checkpoint = _checkpoint(tmp_path, model, optimizer, trainable_only=True)
    resumed, resumed_optimizer = _trained(seed=2, lora=True)
    adapter = next(name for name, p in model.named_parameters() if p.requires_grad)
    assert ".lora_" in adapter and not torch.equal(
        resumed.get_parameter(adapter), model.get_parameter(adapter)
    )
    _resume(tmp_path, checkpoint, resumed, resumed_optimizer, trainable_only=True)
    _assert_same_state(resumed, model)
    _assert_same_optimizer_state(resumed_optimizer, optimizer)
