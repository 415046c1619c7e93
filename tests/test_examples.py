"""The scripts in examples/ run as a researcher would run them."""

import re
import sys

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


def test_adapter_generate_and_score_runs_on_a_checkpoint_with_a_peft_adapter(tmp_path):
    import torch

    from hermes.model import Llama, LlamaConfig
    from hermes.model.hf import save_pretrained
    from hermes.model.lora import apply_lora, save_adapter

    torch.manual_seed(0)
    model = Llama(LlamaConfig.preset("debug"))
    save_pretrained(model, tmp_path / "base")
    apply_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    save_adapter(model, tmp_path / "adapter")
    script = str(REPO / "examples" / "adapter_generate_and_score.py")
    result = run_command(
        [sys.executable, script, "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
         "--max-new-tokens", "4"]
    )  # fmt: skip
    assert result.stdout.count("assistant: ") == 2
    assert re.search(r"multiple choice: \{'acc': [\d.]+, 'acc_norm': [\d.]+\}", result.stdout)
