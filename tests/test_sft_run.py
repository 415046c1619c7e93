"""End-to-end SFT runs through launch/sft.py with real gloo processes."""

import contextlib
import itertools
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hermes.parallel.processes import free_port
from tests.launching import (
    REPO,
    TORCHRUN,
    debug_overrides,
    metrics,
    run_launch,
    small_sft_data,
    torchrun_command,
)

pytestmark = pytest.mark.slow

STEPS = 6


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    return root, small_sft_data(root / "data.jsonl"), root / "cache"


@pytest.fixture(scope="module")
def single_process_run(workspace):
    root, data, cache = workspace
    run_launch("sft.py", 1, [*debug_overrides(root / "one", data, cache, STEPS), "--train.export_hf", "true"])
    return root / "one"


def test_run_directory_holds_config_metrics_checkpoints_and_filter_summary(single_process_run):
    records = metrics(single_process_run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"):
        assert key in records[0]
    assert records[-1]["loss"] < records[0]["loss"]
    assert (single_process_run / "config.toml").read_text().count('preset = "debug"') == 1
    assert (single_process_run / "filter_summary.json").is_file()
    assert (single_process_run / "plots" / "loss.png").stat().st_size > 0
    saved = {p.name for p in (single_process_run / "checkpoints").iterdir()}
    epoch_ends = {f"step-{a['step']}" for a, b in itertools.pairwise(records) if b["epoch"] != a["epoch"]}
    assert (
        epoch_ends and saved == {"step-2", "step-4", "step-6"} | epoch_ends
    )  # every 2 steps and each epoch end


@pytest.fixture(scope="module")
def two_process_run(workspace):
    root, data, cache = workspace
    run_launch("sft.py", 2, [*debug_overrides(root / "two", data, cache, STEPS), "--train.export_hf", "true"])
    return root / "two"


def test_two_process_fsdp_gives_the_losses_of_one_process(single_process_run, two_process_run):
    one, two = metrics(single_process_run), metrics(two_process_run)
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5, rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def _kill_after_checkpoint(args, nproc, checkpoint):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        torchrun_command("sft.py", nproc, args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not (checkpoint / "COMPLETE").exists():
        assert proc.poll() is None, "the run ended before writing its checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.2)
    # torchrun starts each worker in a session of its own: kill the whole tree, not only its group.
    tree = _process_tree(proc.pid)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    while any(Path(f"/proc/{pid}").exists() and not _is_zombie(pid) for pid in tree[1:]):
        time.sleep(0.05)


def _process_tree(root: int) -> list[int]:
    """`root` and every process descending from it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += children.get(pid, [])
    return tree


def _is_zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True


@pytest.mark.parametrize(("first_nproc", "second_nproc"), [(2, 2), (2, 1)])
def test_a_killed_run_resumes_with_the_losses_of_an_uninterrupted_run(
    workspace, single_process_run, first_nproc, second_nproc
):
    root, data, cache = workspace
    run_dir = root / f"killed-{first_nproc}-{second_nproc}"
    args = debug_overrides(run_dir, data, cache, STEPS)
    _kill_after_checkpoint(args, first_nproc, run_dir / "checkpoints" / "step-2")
    result = run_launch("sft.py", second_nproc, args)
    assert "Resuming from" in result.stdout
    resumed, reference = metrics(run_dir), metrics(single_process_run)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(reference[2:], resumed[2:]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5, rel=1e-5)


def test_an_incomplete_checkpoint_is_ignored_with_a_warning(workspace, single_process_run):
    import shutil

    root, data, cache = workspace
    run_dir = root / "incomplete"
    shutil.copytree(single_process_run / "checkpoints" / "step-2", run_dir / "checkpoints" / "step-2")
    broken = run_dir / "checkpoints" / "step-4"
    shutil.copytree(single_process_run / "checkpoints" / "step-4", broken)
    (broken / "COMPLETE").unlink()
    (run_dir / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (single_process_run / "metrics.jsonl").read_text().splitlines()[:4])
    )
    result = run_launch("sft.py", 1, debug_overrides(run_dir, data, cache, STEPS))
    assert "Ignoring incomplete checkpoint" in result.stderr and "step-4" in result.stderr
    assert "Resuming from" in result.stdout and "step-2" in result.stdout
    for a, b in zip(metrics(single_process_run)[2:], metrics(run_dir)[2:]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5, rel=1e-5)


def test_sigterm_saves_a_checkpoint_at_the_step_boundary_and_exits_cleanly(workspace):
    root, data, cache = workspace
    run_dir = root / "preempted"
    args = [*debug_overrides(run_dir, data, cache, 1000), "--train.export_hf", "true"]
    proc = subprocess.Popen(
        torchrun_command("sft.py", 2, args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert "SIGTERM received: checkpoint saved at step" in output
    assert "run the same command again to resume from it" in output
    last = metrics(run_dir)[-1]["step"]
    assert last < 1000 and (run_dir / "checkpoints" / f"step-{last}" / "COMPLETE").is_file()
    assert not (run_dir / "hf").exists()  # an unfinished model is not exported as the result


def test_a_non_finite_loss_stops_the_run_with_a_clear_message(workspace):
    root, data, cache = workspace
    args = [
        *debug_overrides(root / "diverged", data, cache, 30),
        "--optim.lr",
        "1e8",
        "--train.grad_clip",
        "0",
    ]
    with pytest.raises(AssertionError) as failure:
        run_launch("sft.py", 1, args)
    message = str(failure.value)
    assert "error: Loss is nan" in message or "error: Loss is inf" in message
    assert "stopping before the update" in message and "Lower optim.lr" in message


def test_the_export_gathered_from_fsdp_shards_loads_in_transformers_with_hermes_logits(
    workspace, single_process_run
):
    import torch
    import transformers

    from hermes.model.hf import load_pretrained

    root, _, _ = workspace
    two = root / "two"  # written by the two-process test above
    if not (two / "hf").is_dir():
        pytest.skip("needs the two-process run")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(two / "hf", torch_dtype=torch.float32).eval()
    ours = load_pretrained(two / "hf").eval()
    tokens = torch.randint(0, 128256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), atol=1e-5, rtol=1e-5)
        single = load_pretrained(single_process_run / "hf").eval()
        torch.testing.assert_close(single(tokens), ours(tokens), atol=1e-4, rtol=1e-4)


def test_the_export_serves_the_trained_format_with_its_own_tokenizer_files(workspace, single_process_run):
    import transformers

    from hermes.data.chat import ChatFormat
    from hermes.data.records import read_conversations
    from hermes.data.tokenizer import Tokenizer

    _, data, _ = workspace
    export = single_process_run / "hf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    chat = ChatFormat(Tokenizer.default())
    conversations = list(read_conversations(data))
    assert any(conversation.tools for conversation in conversations)
    for conversation in conversations:
        messages = [{"role": m.role, "content": m.content} for m in conversation.messages]
        tools = list(conversation.tools) or None
        served = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False)
        assert list(served) == chat.render(conversation).tokens, conversation.source
    hf_config = transformers.AutoConfig.from_pretrained(export)
    assert (hf_config.bos_token_id, hf_config.eos_token_id) == (128000, 128040)
    assert transformers.GenerationConfig.from_pretrained(export).eos_token_id == [128040, 128001]


@pytest.mark.parametrize(("nproc", "tp"), [(2, 2), (4, 2)], ids=["tp2", "fsdp2xtp2"])
def test_tensor_parallel_and_the_2d_mesh_give_the_losses_of_one_process(
    workspace, single_process_run, nproc, tp
):
    root, data, cache = workspace
    run_dir = root / f"tp-{nproc}-{tp}"
    run_launch("sft.py", nproc, [*debug_overrides(run_dir, data, cache, STEPS), "--parallel.tp", str(tp)])
    for a, b in zip(metrics(single_process_run), metrics(run_dir)):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5, rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_hsdp_across_two_simulated_nodes_gives_the_losses_of_one_process(workspace, single_process_run):
    root, data, cache = workspace
    run_dir = root / "hsdp"
    args = [*debug_overrides(run_dir, data, cache, STEPS), "--parallel.dp_replicate", "2"]
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                *TORCHRUN,
                "--nnodes",
                "2",
                "--nproc_per_node",
                "2",
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                f"127.0.0.1:{port}",
                "--rdzv_id",
                "hsdp-test",
                str(REPO / "launch" / "sft.py"),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:]
    for a, b in zip(metrics(single_process_run), metrics(run_dir)):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("nproc", [2, 1])
def test_a_tensor_parallel_checkpoint_resumes_on_fsdp_and_on_one_process(
    workspace, single_process_run, nproc
):
    import shutil

    root, data, cache = workspace
    tp_run = root / "levers-2-2"  # written by the tp2 case above
    if not (tp_run / "checkpoints" / "step-2" / "COMPLETE").is_file():
        run_launch("sft.py", 2, [*debug_overrides(tp_run, data, cache, STEPS), "--parallel.tp", "2"])
    run_dir = root / f"from-tp-{nproc}"
    shutil.copytree(tp_run / "checkpoints" / "step-2", run_dir / "checkpoints" / "step-2")
    (run_dir / "metrics.jsonl").write_text(
        "".join(f"{line}\n" for line in (tp_run / "metrics.jsonl").read_text().splitlines()[:2])
    )
    result = run_launch("sft.py", nproc, debug_overrides(run_dir, data, cache, STEPS))
    assert "Resuming from" in result.stdout
    for a, b in zip(metrics(single_process_run)[2:], metrics(run_dir)[2:]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5, rel=1e-5)
