"""GGUF export and import against independent readers and writers: transformers' GGUF loader (its own
q/k un-permutation and tokenizer builder), a file written here the way llama.cpp's converter writes one
(gguf's own HF -> GGUF name map, llama.cpp's q/k permutation and rope_freqs formula), and the Q8_0 bytes
decoded by hand."""

import json
import math
import shutil

import gguf
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from hermes.data.chat import ChatFormat
from hermes.data.chat_files import save_chat_format
from hermes.data.tokenizer import Tokenizer
from hermes.export import main as export_main
from hermes.model import LinearRopeScaling, Llama, LlamaConfig, RopeScaling
from hermes.model.gguf import gguf_name, hf_qk_to_gguf, read_gguf_config, rope_freq_factors, save_gguf
from hermes.model.gguf_vocab import LLAMA3_SPLIT, read_vocabulary
from hermes.model.hf import hf_name, load_pretrained, meta_qk_to_hf, save_pretrained
from hermes.model.rope import rope_frequencies

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = [
    "Hello world",
    "  the quick brown fox, 1234567 <|im_end|>",
    "def f(x):\n\treturn x ** 2\n\n",
    "<|im_start|>user\nstraße naïve café?<|im_end|>\n",
]
# GQA (4 query heads on 2 kv heads); 384 embedding rows for a 330-token tokenizer, so the file pads the
# vocabulary as llama.cpp does. Plain RoPE: transformers' GGUF reader does not read rope_freqs.
SMALL = LlamaConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=384,
    hidden_dim=192,
    rope_theta=500000.0,
    rope_scaling=None,
    max_seq_len=256,
    bos_token_id=0,
    eos_token_id=3,
)
# llama3 RoPE scaling whose 32-token original context the 64-token inputs reach past.
LLAMA3_ROPE = {
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
SEQ = 64


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    """A 330-token byte-level BPE with Llama 3's pre-tokenizer, BOS added, ChatML template: the files of
    an export, small enough that reading its GGUF takes no time."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "The quick brown fox jumps over the lazy dog. ",
        "def f(x):\n    return x ** 2\n",
        "hello 12345",
    ]
    tokenizer.train_from_iterator(corpus * 20, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    return directory


@pytest.fixture(scope="module")
def llama3_chat(tmp_path_factory):
    """The real Llama 3 tokenizer in the Hermes format, and its exported tokenizer files."""
    chat = ChatFormat(Tokenizer.default())
    directory = tmp_path_factory.mktemp("llama3")
    save_chat_format(chat, directory)
    return chat, directory


def _sharpen(model: nn.Module, query_key: tuple[str, ...]) -> nn.Module:
    """Norms start at one: make them distinct, so a swapped norm changes the logits. Scale q and k up, so
    attention is far from uniform and q / k rows in the wrong order change the logits well past f16's error."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif any(part in name for part in query_key):
                param.mul_(16)
    return model


def _model(config: LlamaConfig = SMALL, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return _sharpen(Llama(config), ("attention.wq", "attention.wk"))


def _hf_directory(directory, model: Llama, tokenizer_files):
    save_pretrained(model, directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_files / name, directory / name)
    return directory


def _tokens(vocab: int = 330) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return (out.logits if hasattr(out, "logits") else out).float()


def _transformers_gguf(path) -> transformers.LlamaForCausalLM:
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    model.config._attn_implementation = "eager"
    return model


def _assert_logits_close(theirs: torch.Tensor, ours: torch.Tensor, relative: float) -> None:
    """Elementwise within `relative` of the logits' scale (their largest magnitude)."""
    torch.testing.assert_close(theirs, ours, atol=relative * ours.abs().max().item(), rtol=0)


def _llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The permutation llama.cpp's convert_hf_to_gguf (LlamaModel.permute) applies to a Hugging Face q / k
    weight: rows in halves -> interleaved pairs."""
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _reader_tensors(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


# Names and the q / k row order ---------------------------------------------------------------------------


def test_names_are_the_ones_gguf_maps_hugging_face_names_to():
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, SMALL.n_layers)
    for name in _model().state_dict():
        assert gguf_name(name) == names.get_name(hf_name(name), try_suffixes=(".weight",)), name
    with pytest.raises(ValueError, match=r"'layers\.0\.attention\.q_norm\.weight' is not a hermes Llama"):
        gguf_name("layers.0.attention.q_norm.weight")


def test_qk_rows_move_from_halves_to_interleaved_pairs_and_back():
    # One head, head_dim 4, width 1: halves (x0, x1, y0, y1), where (x_i, y_i) rotate together -> pairs.
    halves = torch.tensor([[10.0], [11.0], [20.0], [21.0]])
    assert hf_qk_to_gguf(halves, n_heads=1).flatten().tolist() == [10.0, 20.0, 11.0, 21.0]
    weight = torch.randn(2 * 16, 8)
    torch.testing.assert_close(meta_qk_to_hf(hf_qk_to_gguf(weight, 2), 2), weight, atol=0, rtol=0)
    torch.testing.assert_close(hf_qk_to_gguf(weight, 2).numpy(), _llama_cpp_permute(weight.numpy(), 2))


# Export, read by transformers --------------------------------------------------------------------------


def test_f16_export_reads_in_transformers_with_the_same_logits_and_token_ids(tmp_path, small_tokenizer):
    model = _model()
    source = _hf_directory(tmp_path / "hf", model, small_tokenizer)
    out = tmp_path / "gguf" / "model-f16.gguf"  # a folder of its own: transformers reads nothing else
    assert export_main(["gguf", str(source), str(out), "--type", "f16"]) == 0

    theirs = _transformers_gguf(out)
    shape = theirs.config
    assert (shape.hidden_size, shape.num_hidden_layers, shape.intermediate_size) == (64, 2, 192)
    assert (shape.num_attention_heads, shape.num_key_value_heads, shape.vocab_size) == (4, 2, 384)
    assert shape.rms_norm_eps == pytest.approx(1e-5) and not shape.tie_word_embeddings
    tokens = _tokens()
    _assert_logits_close(_logits(theirs, tokens), _logits(model, tokens), relative=2e-3)

    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(out.parent, gguf_file=out.name)
    reference = tokenizers.Tokenizer.from_file(str(source / "tokenizer.json"))
    for text in TEXTS:
        assert tokenizer(text).input_ids == reference.encode(text).ids, text
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|begin_of_text|>",
        "<|im_end|>",
        "<|pad|>",
    )
    assert tokenizer.chat_template == CHATML


def test_llama3_tokenizer_reads_back_with_the_same_ids_and_chat_template(tmp_path, llama3_chat):
    chat, files = llama3_chat
    config = LlamaConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, tie_word_embeddings=True)
    out = tmp_path / "model.gguf"
    save_gguf(_model(config), out, read_vocabulary(files, config.vocab_size))

    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(out.parent, gguf_file=out.name)
    for text in TEXTS:
        assert tokenizer(text).input_ids == chat.tokenizer.encode(text, bos=True, allowed_special="all"), text
    assert tokenizer.eos_token_id == chat.end_of_turn == 128040  # <|im_end|>: where llama.cpp stops
    assert tokenizer.bos_token_id == 128000 and tokenizer.pad_token_id == chat.tokenizer.pad_id
    assert tokenizer.chat_template == chat.chat_template
    messages = [{"role": "user", "content": "What is 6 * 7?"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert rendered == chat.encode_messages(messages, add_generation_prompt=True)


# Import of a file written the way llama.cpp writes one ------------------------------------------------


def _llama_cpp_rope_factors(head_dim: int, theta: float, rope: dict) -> np.ndarray:
    """convert_hf_to_gguf's rope_freqs for llama3 scaling: per frequency, the divisor llama.cpp applies."""
    factors = []
    context = rope["original_max_position_embeddings"]
    low, high = context / rope["low_freq_factor"], context / rope["high_freq_factor"]
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < high:
            factors.append(1.0)
        elif wavelen > low:
            factors.append(rope["factor"])
        else:
            smooth = (context / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"]
            )
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def _write_like_llama_cpp(
    path, hf_model: transformers.LlamaForCausalLM, rope: dict, leave_out: str = ""
) -> None:
    """A GGUF written from a transformers model the way llama.cpp's converter writes a Llama: gguf's own
    name map, q / k permuted to interleaved pairs, rope_freqs, F32 tensors; no hermes code involved."""
    config = hf_model.config
    head_dim = config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tensor("rope_freqs.weight", _llama_cpp_rope_factors(head_dim, 10000.0, rope))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in hf_model.state_dict().items():
        weight = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            weight = _llama_cpp_permute(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = _llama_cpp_permute(weight, config.num_key_value_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        if gguf_name != leave_out:
            writer.add_tensor(gguf_name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _transformers_model(**overrides) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=384,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", **LLAMA3_ROPE},
        tie_word_embeddings=False,
        **overrides,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.config._attn_implementation = "eager"
    return _sharpen(model, ("q_proj", "k_proj"))


def test_gguf_written_the_llama_cpp_way_loads_with_transformers_logits(tmp_path):
    theirs = _transformers_model()
    path = tmp_path / "llama-cpp.gguf"
    _write_like_llama_cpp(path, theirs, LLAMA3_ROPE)

    ours = load_pretrained(path)
    assert ours.config.rope_scaling == RopeScaling(**LLAMA3_ROPE)
    assert (ours.config.n_heads, ours.config.n_kv_heads, ours.config.max_seq_len) == (4, 2, 256)
    assert not ours.config.tie_word_embeddings and ours.config.rope_theta == 10000.0
    tokens = _tokens()
    torch.testing.assert_close(_logits(ours, tokens), _logits(theirs, tokens), atol=1e-5, rtol=1e-5)


def test_a_missing_tensor_is_named(tmp_path):
    path = tmp_path / "partial.gguf"
    _write_like_llama_cpp(path, _transformers_model(), LLAMA3_ROPE, leave_out="blk.1.ffn_down.weight")
    with pytest.raises(
        ValueError, match=r"blk\.1\.ffn_down\.weight is missing \(expected shape \(64, 192\)\)"
    ):
        load_pretrained(path)


# RoPE scaling --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head_dim", "theta", "scaling"),
    [
        (128, 500000.0, RopeScaling()),  # Llama 3.1: six smoothed frequencies
        (64, 500000.0, RopeScaling(factor=32.0)),  # Llama 3.2 1B
        (16, 500000.0, RopeScaling()),  # the debug preset: one smoothed frequency
        (16, 10000.0, RopeScaling(**LLAMA3_ROPE)),
        (128, 500000.0, RopeScaling(high_freq_factor=2.0, original_max_position_embeddings=16384)),
        (128, 500000.0, RopeScaling(low_freq_factor=2.0, original_max_position_embeddings=16384)),
    ],
    ids=["llama3.1", "llama3.2", "debug", "short-context", "narrow-band", "low-factor-2"],
)
def test_llama3_rope_freqs_match_transformers_and_come_back_on_import(
    tmp_path, small_tokenizer, head_dim, theta, scaling
):
    config = LlamaConfig(
        dim=head_dim,
        n_layers=1,
        n_heads=1,
        n_kv_heads=1,
        vocab_size=384,
        hidden_dim=64,
        rope_theta=theta,
        rope_scaling=scaling,
    )
    hf = transformers.LlamaConfig(**config.to_hf())
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factors = rope_freq_factors(head_dim, theta, scaling)
    np.testing.assert_allclose(factors, (plain / scaled.double()).numpy(), rtol=1e-5)

    path = tmp_path / "rope.gguf"
    save_gguf(_model(config), path, read_vocabulary(small_tokenizer, 384))
    np.testing.assert_array_equal(_reader_tensors(path)["rope_freqs.weight"].data, factors)
    recovered = read_gguf_config(path).rope_scaling
    torch.testing.assert_close(
        rope_frequencies(head_dim, theta, recovered),
        rope_frequencies(head_dim, theta, scaling),
        rtol=1e-5,
        atol=0,
    )
    if scaling.low_freq_factor == 1.0:  # the scale the file cannot tell is the one Meta's releases use
        assert recovered == scaling


def test_linear_rope_scaling_is_written_as_llama_cpp_keys_and_read_back(tmp_path, small_tokenizer):
    config = SMALL.replace(rope_scaling=LinearRopeScaling(factor=2.5))
    path = tmp_path / "linear.gguf"
    save_gguf(_model(config), path, read_vocabulary(small_tokenizer, 384))
    reader = gguf.GGUFReader(path)
    kind = reader.get_field("llama.rope.scaling.type")
    assert bytes(
        kind.parts[kind.data[0]]
    ).decode() == "linear" and "rope_freqs.weight" not in _reader_tensors(path)
    assert reader.get_field("llama.rope.scaling.factor").parts[-1][0] == 2.5
    assert read_gguf_config(path).rope_scaling == LinearRopeScaling(factor=2.5)


# File types ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file_type", "matrix_type", "relative"),
    [("f16", "F16", 2e-3), ("bf16", "BF16", 1e-2), ("q8_0", "Q8_0", 2e-2)],
)
def test_each_file_type_reads_back_within_its_precision(
    tmp_path, small_tokenizer, file_type, matrix_type, relative
):
    config = SMALL.replace(rope_scaling=RopeScaling(**LLAMA3_ROPE), max_seq_len=128)
    model = _model(config)
    path = tmp_path / f"model-{file_type}.gguf"
    save_gguf(model, path, read_vocabulary(small_tokenizer, 384), file_type)

    stored = {name: t.tensor_type.name for name, t in _reader_tensors(path).items()}
    assert {stored[n] for n in stored if n.endswith("norm.weight") or n == "rope_freqs.weight"} == {"F32"}
    assert {
        stored[n] for n in stored if n.endswith(("attn_q.weight", "ffn_down.weight", "output.weight"))
    } == {matrix_type}
    ours = load_pretrained(path)
    assert ours.config == config.replace(bos_token_id=0, eos_token_id=3)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    tokens = _tokens()
    _assert_logits_close(_logits(ours, tokens), _logits(model, tokens), relative)


def test_q8_0_blocks_are_within_half_a_step_and_transformers_reads_the_same_model(tmp_path, small_tokenizer):
    # ffn_down's rows (80 wide) do not split into blocks of 32: it falls back to F16, as in llama.cpp.
    config = SMALL.replace(hidden_dim=80)
    model = _model(config)
    path = tmp_path / "gguf" / "model-q8_0.gguf"
    save_gguf(model, path, read_vocabulary(small_tokenizer, 384), "q8_0")
    stored = _reader_tensors(path)
    assert stored["blk.0.ffn_down.weight"].tensor_type.name == "F16"

    state = model.state_dict()
    checked = 0
    for i in range(config.n_layers):
        for ours, theirs, heads in [
            ("attention.wq", "attn_q", config.n_heads),
            ("attention.wk", "attn_k", config.n_kv_heads),
            ("attention.wv", "attn_v", None),
            ("feed_forward.w1", "ffn_gate", None),
        ]:
            weight = state[f"layers.{i}.{ours}.weight"].numpy()
            weight = weight if heads is None else _llama_cpp_permute(weight, heads)
            tensor = stored[f"blk.{i}.{theirs}.weight"]
            assert tensor.tensor_type.name == "Q8_0"
            # Q8_0: blocks of 34 bytes, a float16 scale then 32 int8 steps, along each row.
            blocks = np.asarray(tensor.data).reshape(-1, 34)
            scale = blocks[:, :2].copy().view(np.float16).astype(np.float64)
            steps = blocks[:, 2:].copy().view(np.int8).astype(np.float64)
            values = weight.astype(np.float64).reshape(-1, 32)
            exact = np.abs(values).max(axis=1, keepdims=True) / 127  # absmax / 127, before float16 rounding
            np.testing.assert_allclose(scale, exact, rtol=2**-11)
            bound = exact / 2 + 127 * np.abs(scale - exact) + 1e-9
            assert (np.abs(steps * scale - values) <= bound).all(), f"blk.{i}.{theirs}.weight"
            checked += 1
    assert checked == 4 * config.n_layers

    ours = load_pretrained(path)
    theirs = _transformers_gguf(path)
    tokens = _tokens()
    _assert_logits_close(_logits(ours, tokens), _logits(model, tokens), relative=2e-2)
    torch.testing.assert_close(_logits(theirs, tokens), _logits(ours, tokens), atol=1e-4, rtol=1e-4)


# Tied embeddings -----------------------------------------------------------------------------------------


def test_tied_model_exports_without_an_output_tensor_and_imports_tied(tmp_path, small_tokenizer):
    model = _model(SMALL.replace(tie_word_embeddings=True))
    path = tmp_path / "gguf" / "tied.gguf"
    save_gguf(model, path, read_vocabulary(small_tokenizer, 384))
    assert "output.weight" not in _reader_tensors(path) and "token_embd.weight" in _reader_tensors(path)

    ours = load_pretrained(path)
    assert ours.config.tie_word_embeddings
    assert ours.output.weight is ours.tok_embeddings.weight
    theirs = _transformers_gguf(path)
    assert theirs.config.tie_word_embeddings
    tokens = _tokens()
    _assert_logits_close(_logits(ours, tokens), _logits(model, tokens), relative=2e-3)
    torch.testing.assert_close(_logits(theirs, tokens), _logits(ours, tokens), atol=1e-4, rtol=1e-4)


# Errors --------------------------------------------------------------------------------------------------


def test_a_gguf_of_another_architecture_names_the_key(tmp_path):
    path = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"general\.architecture is 'qwen2'; hermes reads Llama GGUF files"):
        load_pretrained(path)


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*absent\.gguf does not exist"):
        load_pretrained(tmp_path / "absent.gguf")


def test_export_of_a_non_llama_config_names_the_key(tmp_path, small_tokenizer, capsys):
    source = _hf_directory(tmp_path / "hf", _model(), small_tokenizer)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    assert export_main(["gguf", str(source), str(tmp_path / "out.gguf")]) == 1
    assert "model_type 'mistral'" in capsys.readouterr().err
    assert not (tmp_path / "out.gguf").exists()


def test_export_of_a_tokenizer_llama_cpp_cannot_name_names_its_pre_tokenizer(tmp_path, small_tokenizer):
    source = _hf_directory(tmp_path / "hf", _model(), small_tokenizer)
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "use_regex": True,
    }  # GPT-2's
    (source / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match=r"tokenizer\.json: pre_tokenizer is not Llama 3's"):
        read_vocabulary(source, 384)
