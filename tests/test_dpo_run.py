"""End-to-end DPO runs through launch/dpo.py with real gloo processes."""

import json
import shutil

import pytest
import torch

from hermes.model import Llama, LlamaConfig
from hermes.model.hf import save_pretrained
from tests.launching import metrics, run_launch

pytestmark = pytest.mark.slow

STEPS = 4
DETERMINISTIC = ["--dpo.neftune_alpha", "0", "--lora.dropout", "0"]
TP2 = ["--parallel.tp", "2", "--parallel.dp_shard", "1"]


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
    run_launch("dpo.py", 1, _args(workspace, "one", DETERMINISTIC))
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
    for directory in (single / "hf", single / "adapter"):
        written = json.loads((directory / "tokenizer_config.json").read_text())
        assert written["model_max_length"] == 8192  # kept from the base's tokenizer_config.json
        assert written["eos_token"] == "<|im_end|>" and "<|im_start|>" in written["chat_template"]
        assert (directory / "tokenizer.json").is_file()
        assert json.loads((directory / "generation_config.json").read_text())["eos_token_id"][0] == 128040
    assert json.loads((single / "hf" / "config.json").read_text())["eos_token_id"] == 128040


def _assert_same_losses(expected: list[dict], got: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(expected, got):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-5)
        assert b["logps/chosen"] == pytest.approx(a["logps/chosen"], rel=1e-5)


@pytest.fixture(scope="module")
def tensor_parallel(workspace):
    run_launch("dpo.py", 2, _args(workspace, "tp2", [*DETERMINISTIC, *TP2]))
    return workspace / "tp2"


@pytest.mark.parametrize(
    ("name", "nproc", "parallel"),
    [("fsdp2", 2, []), ("fsdp2xtp2", 4, ["--parallel.tp", "2"])],
)
def test_fsdp_and_2d_mesh_dpo_give_the_losses_of_one_process(workspace, single, name, nproc, parallel):
    run_launch(
        "dpo.py", nproc, _args(workspace, name, [*DETERMINISTIC, *parallel, "--train.export_hf", "false"])
    )
    _assert_same_losses(metrics(single), metrics(workspace / name))


def test_tensor_parallel_dpo_gives_the_losses_of_one_process(single, tensor_parallel):
    one = metrics(single)
    assert one[-1]["rewards/margins"] != pytest.approx(0.0, abs=1e-4)  # the adapter did change the policy
    _assert_same_losses(one, metrics(tensor_parallel))


def test_adapter_and_merged_model_exported_from_tensor_parallel_shards_equal_one_process(
    single, tensor_parallel
):
    from safetensors.torch import load_file

    for file in ("adapter/adapter_model.safetensors", "hf/model.safetensors"):
        one, tp = load_file(single / file), load_file(tensor_parallel / file)
        assert one.keys() == tp.keys()
        for key in one:
            # RMSProp divides by each element's gradient scale, so float rounding in the sharded sums moves
            # an element by up to ~5e-6 over 4 steps; a misplaced shard would be off by ~0.1.
            torch.testing.assert_close(tp[key], one[key], atol=2e-5, rtol=0, msg=f"{file}: {key}")
    assert json.loads((tensor_parallel / "adapter" / "adapter_config.json").read_text())["r"] == 32


def test_a_tensor_parallel_dpo_checkpoint_resumes_in_one_process(workspace, single, tensor_parallel):
    resumed = workspace / "resumed"
    shutil.copytree(tensor_parallel / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    result = run_launch(
        "dpo.py", 1, _args(workspace, "resumed", [*DETERMINISTIC, "--train.export_hf", "false"])
    )
    assert "Resuming from" in result.stdout
    _assert_same_losses(metrics(single)[2:], metrics(resumed))


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


def test_neftune_and_lora_dropout_run_under_tensor_parallelism(workspace):
    run_dir = workspace / "tp2-noise"
    args = _args(workspace, "tp2-noise", [*TP2, "--train.max_steps", "2", "--train.export_hf", "false"])
    run_launch("dpo.py", 2, args)
    first = metrics(run_dir)[0]
    # B = 0, so without noise the policy equals the reference and the loss is ln 2; NEFTune moves it.
    assert first["loss"] != pytest.approx(0.6931472, abs=1e-6)
    assert abs(first["loss"] - 0.6931472) < 0.05


def _response_logprob(model: torch.nn.Module, tokens: list[int], labels: list[int]) -> float:
    """The summed log-probability of a sample's labelled tokens in one plain forward pass."""
    from hermes.data.sample import IGNORE_INDEX

    logprobs = model(torch.tensor([tokens])).logits[0].double().log_softmax(-1)
    targets = torch.tensor(labels[1:])
    trained = targets != IGNORE_INDEX
    return logprobs[:-1][trained].gather(1, targets[trained][:, None]).sum().item()


def test_validation_pairs_give_the_dpo_loss_and_accuracy_of_a_hand_computation(workspace):
    """Two FSDP processes, a quarter of the pairs held out, validation every 2 steps: the last validation
    record equals the DPO loss, margin and accuracy worked out from the exported policy and the base."""
    import torch.nn.functional as F
    import transformers

    from hermes.config import DataConfig, load_run_config
    from hermes.data.pipeline import build_preference_samples
    from hermes.train.build import chat_format

    run = workspace / "validated"
    extra = [*DETERMINISTIC, "--data.validation_fraction", "0.25", "--train.eval_every", "2"]
    run_launch("dpo.py", 2, _args(workspace, "validated", extra))
    validations = [r for r in metrics(run) if "val_loss" in r]
    steps = [r["step"] for r in validations]
    assert {2, 4} <= set(steps) and steps == sorted(set(steps))  # every 2 steps, and at epoch ends
    config = load_run_config(run / "config.toml")
    options = DataConfig(train=config.data.train, seq_len=256, validation_fraction=0.25)
    held_out = build_preference_samples(config.data.train, chat_format(config), options, 0, "validation")
    samples = held_out.samples
    assert len(samples) >= 4 and len(samples) % 2 == 0
    with torch.no_grad():
        policy = transformers.AutoModelForCausalLM.from_pretrained(run / "hf").eval()
        reference = transformers.AutoModelForCausalLM.from_pretrained(workspace / "base").eval()
        logps = torch.tensor(
            [[_response_logprob(m, s.tokens, s.labels) for s in samples] for m in (policy, reference)]
        )
    beta = config.dpo.beta
    margin = beta * ((logps[0, 0::2] - logps[1, 0::2]) - (logps[0, 1::2] - logps[1, 1::2]))
    last = validations[-1]
    assert last["val_loss"] == pytest.approx(-F.logsigmoid(margin).mean().item(), rel=1e-4)
    assert last["val_rewards/margins"] == pytest.approx(margin.mean().item(), rel=1e-4, abs=1e-6)
    assert last["val_rewards/accuracies"] == pytest.approx((margin > 0).double().mean().item())
