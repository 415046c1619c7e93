"""The scripts in examples/ run as a researcher would run them."""

import re

import pytest

from tests.launching import REPO, TORCHRUN, run_command

pytestmark = pytest.mark.slow


def test_custom_sft_loop_trains_two_fsdp_ranks_and_lowers_the_loss():
    result = run_command(
        [
            *TORCHRUN,
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "examples" / "custom_sft_loop.py"),
            "--steps",
            "6",
        ]
    )
    losses = [float(x) for x in re.findall(r"^step \d+ loss ([\d.]+)$", result.stdout, flags=re.M)]
    assert len(losses) == 6 and losses[-1] < losses[0]
