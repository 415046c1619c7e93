"""The Trainer through the launch scripts: LoRA SFT, the FSDP units, and errors a user can act on."""

import json
import re
import subprocess

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from hermes.model import Llama, LlamaConfig
from hermes.model.hf import save_pretrained
from hermes.parallel.checkpoint import checkpointed_model_names, latest_checkpoint
from hermes.parallel.fsdp import apply_fsdp
from hermes.parallel.mesh import ParallelDims, build_mesh
from tests.launching import (
    debug_overrides,
    one_process_group,
    run_command,
    run_launch,
    small_sft_data,
    torchrun_command,
)


def test_fsdp_units_are_the_embedding_each_block_and_the_norm_with_the_head(tmp_path):
    with one_process_group(tmp_path / "store"):
        model = apply_fsdp(Llama(LlamaConfig.preset("debug")), build_mesh(ParallelDims(1, -1, 1, 1)).fsdp)
        state = {
            name: module._get_fsdp_state()
            for name, module in model.named_modules()
            if isinstance(module, FSDPModule)
        }
    assert sorted(state) == ["", "layers.0", "layers.1", "norm", "output", "tok_embeddings"]
    assert state["norm"] is state["output"]  # one unit: the final norm and the head
    units = {id(s) for s in state.values()}
    assert len(units) == 5  # root, embedding, two blocks, norm + head
    assert state[""]._fsdp_param_group is None  # nothing is left to the root unit
    assert len(state["tok_embeddings"]._fsdp_param_group.fsdp_params) == 1
    # The head's unit stays gathered after forward (backward starts there); the first block reshards.
    assert state["output"]._fsdp_param_group.post_forward_mesh_info is None
    assert state["layers.0"]._fsdp_param_group.post_forward_mesh_info is not None


@pytest.mark.slow
def test_lora_sft_trains_only_the_adapter_and_exports_it_merged_at_every_epoch(tmp_path):
    """Two epochs of LoRA SFT on 2 FSDP processes: each epoch writes its adapter and, from merged copies,
    its hf/ (which PEFT's merge of that adapter onto the base reproduces), and training goes on after."""
    import peft
    import transformers

    torch.manual_seed(0)
    base = tmp_path / "base"
    save_pretrained(Llama(LlamaConfig.preset("debug")), base)
    data = small_sft_data(tmp_path / "data.jsonl", records=12)
    run_dir = tmp_path / "lora-sft"
    args = [*debug_overrides(run_dir, data, tmp_path / "cache", 0), "--model.checkpoint", str(base)]
    args += ["--lora.rank", "4", "--lora.dropout", "0", "--train.export_hf", "true", "--train.epochs", "2"]
    run_launch("sft.py", 2, [*args, "--train.export_every_epoch", "true"])

    stored = checkpointed_model_names(latest_checkpoint(run_dir / "checkpoints"))
    assert stored and all(".lora_A." in name or ".lora_B." in name for name in stored)
    tokens = torch.randint(0, 128256, (1, 16), generator=torch.Generator().manual_seed(0))
    exports = {"final": run_dir, "epoch 1": run_dir / "epochs/epoch-1", "epoch 2": run_dir / "epochs/epoch-2"}
    logits = {}
    with torch.no_grad():
        before = transformers.AutoModelForCausalLM.from_pretrained(base).eval()(tokens).logits
        for name, directory in exports.items():
            adapter = directory / "adapter"
            assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4, name
            assert (adapter / "tokenizer_config.json").is_file() and (adapter / "tokenizer.json").is_file()
            plain = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
            adapted = peft.PeftModel.from_pretrained(plain, adapter).eval()(tokens).logits
            merged = transformers.AutoModelForCausalLM.from_pretrained(directory / "hf").eval()
            logits[name] = merged(tokens).logits
            torch.testing.assert_close(adapted, logits[name], atol=1e-5, rtol=1e-5, msg=name)
    assert not torch.allclose(logits["epoch 1"], before)  # the adapter did train
    assert not torch.allclose(logits["epoch 2"], logits["epoch 1"])  # and trained on after epoch 1's export
    torch.testing.assert_close(logits["final"], logits["epoch 2"])


def _failing_launch(script: str, args: list[str], tmp_path) -> str:
    """The output of a 2-process launch that must fail; no rank may print a traceback of hermes' code
    (torchrun's own report of the failed worker, with its launcher frames, stays)."""
    result = subprocess.run(
        torchrun_command(script, 2, args), capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert not re.search(r'File ".*/(hermes|launch)/', output), output[-3000:]
    return output


@pytest.mark.slow
def test_a_bad_value_is_one_message_before_any_work_under_torchrun(tmp_path):
    output = _failing_launch(
        "sft.py", ["--run.dir", str(tmp_path / "run"), "--train.micro_batch", "0"], tmp_path
    )
    assert output.count("error: train.micro_batch = 0 is out of range: it must be at least 1") == 1
    assert "Tokenized" not in output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_dpo_without_its_sft_base_says_to_run_sft_first(tmp_path):
    missing = tmp_path / "runs" / "tiny-sft" / "hf"
    output = _failing_launch(
        "dpo.py", ["--run.dir", str(tmp_path / "dpo"), "--model.checkpoint", str(missing)], tmp_path
    )
    assert output.count(f"error: model.checkpoint = {missing} does not exist") == 1
    assert "launch/sft.py" in output


@pytest.mark.slow
def test_hermes_debug_shows_the_traceback(tmp_path):
    command = torchrun_command("sft.py", 1, ["--run.dir", str(tmp_path / "run"), "--optim.lr", "-1"])
    with pytest.raises(AssertionError) as failure:
        run_command(["env", "HERMES_DEBUG=1", *command])
    assert "Traceback" in str(failure.value) and "optim.lr = -1.0 is out of range" in str(failure.value)
