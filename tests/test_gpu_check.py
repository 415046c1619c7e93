"""benchmarks/gpu_check.sh --dry-run, on any machine: what the GPU check would install and run."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from tests.launching import REPO


def _gpu_test_names() -> set[str]:
    """The test functions of tests/test_gpu.py, read from its source."""
    tree = ast.parse((REPO / "tests" / "test_gpu.py").read_text())
    return {
        node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def test_dry_run_lists_the_commands_and_every_gpu_marked_test_without_running_them(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    commands = [line.removeprefix("would run: ") for line in lines if line.startswith("would run: ")]
    assert len(commands) == 2
    assert "-m pytest -q -m gpu tests/test_gpu.py" in commands[0]
    assert "benchmarks/train_step.py --device cuda --layers 4 --seq-len 8192" in commands[1]
    listed = {line.split("::")[1].split("[")[0] for line in lines if line.startswith("tests/test_gpu.py::")}
    assert listed == _gpu_test_names()
    assert not (tmp_path / "gpu_check.log").exists()  # a dry run writes no log
