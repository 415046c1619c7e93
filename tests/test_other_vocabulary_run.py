"""A whole run on another vocabulary: SFT then DPO from a tied checkpoint with its own byte-level BPE (no
reserved ids, no Llama 3 token), exported and served by transformers."""

import json

import pytest
import torch

from hermes.data.chat_files import read_chat_format
from hermes.model import Llama, LlamaConfig
from hermes.model.hf import save_pretrained
from tests.launching import debug_overrides, metrics, run_launch, small_sft_data
from tests.test_tokenizers_backend import write_byte_level_bpe

pytestmark = pytest.mark.slow


def test_sft_then_dpo_from_a_tied_other_vocabulary_checkpoint(tmp_path):
    import transformers

    from hermes.data.pipeline import bundled_example

    base = write_byte_level_bpe(tmp_path / "base")
    tokenizer = read_chat_format(base).tokenizer
    torch.manual_seed(0)
    shape = LlamaConfig.preset("debug").replace(vocab_size=tokenizer.vocab_size, tie_word_embeddings=True)
    save_pretrained(Llama(shape), base)
    data = small_sft_data(tmp_path / "sft.jsonl", records=24)

    sft = tmp_path / "sft"
    args = [*debug_overrides(sft, data, tmp_path / "cache", 2), "--model.checkpoint", str(base)]
    run_launch("sft.py", 1, [*args, "--train.export_hf", "true"])
    assert [r["step"] for r in metrics(sft)] == [1, 2]

    pairs = [
        line for line in bundled_example("preference.jsonl").read_text().splitlines() if '"tools"' not in line
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(pairs[:16]) + "\n")
    dpo = tmp_path / "dpo"
    dpo_args = [
        *debug_overrides(dpo, tmp_path / "pairs.jsonl", tmp_path / "cache", 2),
        "--model.checkpoint", str(sft / "hf"),
        "--lora.rank", "4",
        "--lora.dropout", "0",
        "--dpo.neftune_alpha", "0",
        "--train.export_hf", "true",
    ]  # fmt: skip
    run_launch("dpo.py", 1, dpo_args)
    # The adapter starts at zero: the policy is the reference, so the first loss is ln 2.
    assert metrics(dpo)[0]["loss"] == pytest.approx(0.6931, abs=1e-3)

    messages = [{"role": "user", "content": "What is 6 * 7?"}, {"role": "assistant", "content": "42"}]
    for export in (sft / "hf", dpo / "hf"):
        config = json.loads((export / "config.json").read_text())
        assert config["tie_word_embeddings"] and config["vocab_size"] == tokenizer.vocab_size
        model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        served = transformers.AutoTokenizer.from_pretrained(export)
        ids = served.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert list(ids) == read_chat_format(export).encode_messages(messages)
        assert served.eos_token == "<|im_end|>"
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([ids])).logits).all()
