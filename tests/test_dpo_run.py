"""End-to-end DPO runs through launch/dpo.py with real gloo processes."""

import json

import pytest
import torch

from hermes.model import Llama, LlamaConfig
from hermes.model.hf import save_pretrained
from tests.launching import metrics, run_launch

pytestmark = pytest.mark.slow

STEPS = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    torch.manual_seed(0)
    save_pretrained(Llama(LlamaConfig.preset("debug")), root / "base")
    (root / "base" / "tokenizer_config.json").write_text(
        '{"added_tokens_decoder": {}, "model_max_length": 8192}'
    )
    from hermes.data.pipeline import bundled_example

    lines = bundled_example("preference.jsonl").read_text().splitlines()
    short = [line for line in lines if "tools" not in json.loads(line)][
        :48
    ]  # pairs without tool schemas: short
    (root / "pairs.jsonl").write_text("\n".join(short) + "\n")
    return root


def _args(root, name, extra=()):
    return [
        "--run.dir", str(root / name),
        "--model.checkpoint", str(root / "base"),
        "--data.train", str(root / "pairs.jsonl"),
        "--data.cache_dir", str(root / "cache"),
        "--data.seq_len", "256",
        "--train.global_batch", "4",
        "--train.micro_batch", "1",
        "--train.max_steps", str(STEPS),
        "--train.epochs", "3",
        "--train.checkpoint_every", "2",
        "--optim.lr", "1e-3",
        "--logging.progress", "false",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def single(workspace):
    deterministic = ["--dpo.neftune_alpha", "0", "--lora.dropout", "0"]
    run_launch("dpo.py", 1, _args(workspace, "one", deterministic))
    return workspace / "one"


def test_dpo_run_logs_rewards_and_exports_adapter_and_merged_model(single):
    records = metrics(single)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # B = 0: policy equals reference
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in records[-1]
    assert (single / "adapter" / "adapter_model.safetensors").is_file()
    assert (single / "hf" / "config.json").is_file()
    copied = json.loads((single / "hf" / "tokenizer_config.json").read_text())  # the base's tokenizer files
    assert copied["model_max_length"] == 8192


def test_two_process_fsdp_dpo_gives_the_losses_of_one_process(workspace, single):
    deterministic = ["--dpo.neftune_alpha", "0", "--lora.dropout", "0"]
    run_launch("dpo.py", 2, _args(workspace, "two", deterministic))
    for a, b in zip(metrics(single), metrics(workspace / "two")):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-5)


def test_merged_export_equals_base_plus_adapter(workspace, single):
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(workspace / "base", torch_dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, single / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        single / "hf", torch_dtype=torch.float32
    ).eval()
    tokens = torch.randint(0, 128256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, adapted(tokens).logits, atol=1e-4, rtol=1e-4)
