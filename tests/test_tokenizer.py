import base64
import importlib.util
import io
import json
from pathlib import Path

import pytest
import sentencepiece
import tiktoken
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
from tiktoken.load import load_tiktoken_bpe
from transformers.convert_slow_tokenizer import TikTokenConverter

from hermes.data import tokenizer as tokenizer_module
from hermes.data.tokenizer import Tokenizer, TokenizerFileError

# Written out here, independently of the module under test.
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 12345678 o'clock; we'll see!",
    "def f(x):\n\treturn x ** 2  # square\n\n\n",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, עברית, العربية",
    "emoji 😀👍🏽 and zero\u200bwidth, tabs\t\t\tand    spaces   \r\n\r\n  end  ",
    "    leading and trailing whitespace runs        ",
    "",
]


def llama3_special_names() -> list[str]:
    """Llama 3.1's special-token names by offset, as Meta's tokenizer.json numbers the reserved ones."""
    named = {
        0: "<|begin_of_text|>",
        1: "<|end_of_text|>",
        4: "<|finetune_right_pad_id|>",
        6: "<|start_header_id|>",
        7: "<|end_header_id|>",
        8: "<|eom_id|>",
        9: "<|eot_id|>",
        10: "<|python_tag|>",
    }
    reserved = [offset for offset in range(256) if offset not in named]
    names = dict(named)
    names.update({offset: f"<|reserved_special_token_{n}|>" for n, offset in enumerate(reserved)})
    return [names[offset] for offset in range(256)]


@pytest.fixture(autouse=True)
def no_tiktoken_cache(monkeypatch):
    # tiktoken.load otherwise copies every rank file it reads into a cache under the temp directory.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")


@pytest.fixture(scope="module")
def llama3_path() -> Path:
    locations = importlib.util.find_spec("llama_models").submodule_search_locations
    return Path(next(iter(locations))) / "llama3" / "tokenizer.model"


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def reference(llama3_path) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="reference",
        pat_str=PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(llama3_path)),
        special_tokens={},
    )


@pytest.fixture(scope="module")
def small_files(tmp_path_factory, llama3_path):
    """The first 3000 Llama 3 ranks (a valid BPE of its own) as a tiktoken file, and the tokenizer.json
    Hugging Face's converter makes from it."""
    directory = tmp_path_factory.mktemp("small")
    lines = llama3_path.read_bytes().splitlines()[:3000]
    rank_file = directory / "tokenizer.model"
    rank_file.write_bytes(b"\n".join(lines) + b"\n")
    converted = TikTokenConverter(
        vocab_file=str(rank_file), pattern=PATTERN, extra_special_tokens=llama3_special_names()
    ).converted()
    json_dir = directory / "hf"
    json_dir.mkdir()
    converted.save(str(json_dir / "tokenizer.json"))
    return rank_file, json_dir / "tokenizer.json"


def test_known_strings_encode_to_llama3_ids(llama3):
    assert llama3.encode("Hello world") == [9906, 1917]
    assert llama3.encode("Hello world", bos=True, eos=True) == [128000, 9906, 1917, 128001]


@pytest.mark.parametrize("text", SAMPLES)
def test_ids_match_tiktoken_used_directly_with_the_rank_file(llama3, reference, text):
    assert llama3.encode(text) == reference.encode_ordinary(text)


def test_key_ids_and_special_names_follow_llama31_numbering(llama3):
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id, llama3.vocab_size) == (
        128000,
        128001,
        128004,
        128256,
    )
    assert llama3.special_tokens == {name: 128000 + i for i, name in enumerate(llama3_special_names())}
    assert llama3.token_id("<|reserved_special_token_2|>") == 128005
    assert llama3.token_id("<|reserved_special_token_247|>") == 128255


def test_one_megabyte_with_long_runs_matches_metas_reference_and_round_trips(llama3, llama3_path):
    blocks = ["plain words here. ", "x" * 30_000, " " * 26_000, "ünïcödé 😀 ", "\n" * 60_001, "y" * 50_000]
    text = "".join(blocks[i % len(blocks)] for i in range(90))[:1_000_000]
    ids = llama3.encode(text)
    assert ids == MetaTokenizer(llama3_path).encode(text, bos=False, eos=False)
    assert llama3.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_any_text_round_trips(llama3, text):
    assert llama3.decode(llama3.encode(text)) == text


@given(st.text(alphabet=" \t\n\r\u00a0\u3000a", max_size=200))
@settings(max_examples=100, deadline=None)
def test_whitespace_runs_match_tiktoken(llama3, reference, text):
    assert llama3.encode(text) == reference.encode_ordinary(text)


def test_special_token_text_is_plain_unless_allowed(llama3, reference):
    text = "<|begin_of_text|>Hi<|eot_id|>"
    assert llama3.encode(text) == reference.encode_ordinary(text)
    assert llama3.encode(text, allowed_special={"<|eot_id|>"}) == [
        *reference.encode_ordinary("<|begin_of_text|>Hi"),
        128009,
    ]
    assert llama3.encode(text, allowed_special="all") == [128000, *reference.encode_ordinary("Hi"), 128009]
    assert llama3.decode([128000, 128009]) == "<|begin_of_text|><|eot_id|>"


# Tags made special on reserved ids, and text pieces around them: "<" that opens no tag, broken tags,
# special-token names that are not allowed, non-ASCII text.
TAGS = {"<tool_call>": 128041, "</tool_call>": 128042, "<tools>": 128043, "<SCRATCHPAD>": 128050}
PIECES = [
    *TAGS,
    "<",
    ">",
    "a < b",
    "x<y>z",
    "<tool_call",
    "tool_call>",
    "</",
    "<<tools>>",
    "<|eot_id|>",
    "<|begin_of_text|>",
    '{"name": "f", "arguments": {}}',
    "hello",
    " ",
    "\n",
    "naïve 😀",
]


@pytest.fixture(scope="module")
def tagged(llama3) -> Tokenizer:
    return llama3.with_special_tokens(TAGS)


@pytest.fixture(scope="module")
def tagged_reference(llama3_path, tagged) -> tiktoken.Encoding:
    """tiktoken used directly with the same special tokens: its special-token path is the reference."""
    return tiktoken.Encoding(
        name="tagged-reference",
        pat_str=PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(llama3_path)),
        special_tokens=tagged.special_tokens,
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12).map("".join))
def test_allowed_tags_encode_as_tiktokens_special_token_path_does(tagged, tagged_reference, text):
    allowed = frozenset(TAGS)
    expected = tagged_reference.encode(text, allowed_special=allowed, disallowed_special=())
    assert tagged.encode(text, allowed_special=allowed) == expected
    assert tagged.encode(text, allowed_special=set(TAGS), bos=True, eos=True) == [128000, *expected, 128001]


@pytest.mark.parametrize("text", ["a < b and c > d", "x<y>z <tool_call <|eot_id|>", "plain", ""])
def test_text_without_an_allowed_tag_takes_the_fast_path_with_the_same_ids(
    tagged, tagged_reference, monkeypatch, text
):
    expected = tagged_reference.encode(text, allowed_special=frozenset(TAGS), disallowed_special=())
    assert expected == tagged_reference.encode_ordinary(text)

    def special_path(*args, **kwargs):
        raise AssertionError("text without an allowed tag went through the special-token path")

    monkeypatch.setattr(tagged._encoding, "encode", special_path)
    assert tagged.encode(text, allowed_special=frozenset(TAGS)) == expected


def test_long_text_without_a_tag_matches_metas_reference_with_tags_allowed(tagged, llama3_path):
    text = "words < and > brackets " * 1500 + "x" * 30_000 + " tail"
    expected = MetaTokenizer(llama3_path).encode(text, bos=False, eos=False)
    assert tagged.encode(text, allowed_special=frozenset(TAGS)) == expected


def test_tokenizer_json_agrees_with_tokenizers_library_and_the_rank_file(small_files):
    rank_file, json_file = small_files
    from_model = Tokenizer.from_file(rank_file)
    from_json = Tokenizer.from_file(json_file)
    hf = tokenizers.Tokenizer.from_file(str(json_file))
    for text in [*SAMPLES, "special <|eot_id|> inside <|reserved_special_token_5|>!"]:
        expected = hf.encode(text, add_special_tokens=False).ids
        assert from_json.encode(text, allowed_special="all") == expected
        assert from_model.encode(text, allowed_special="all") == expected
        assert from_json.decode(expected) == text
    assert from_json.special_tokens == from_model.special_tokens
    assert (from_json.bos_id, from_json.eos_id, from_json.pad_id, from_json.vocab_size) == (
        3000,
        3001,
        3004,
        3256,
    )


def test_directory_prefers_tokenizer_json_and_reads_tokenizer_config_beside_it(small_files, tmp_path):
    _, json_file = small_files
    (tmp_path / "tokenizer.json").write_bytes(json_file.read_bytes())
    (tmp_path / "tokenizer.model").write_bytes(b"not read: tokenizer.json comes first")
    config = {"added_tokens_decoder": {"3040": {"content": "<|im_end|>", "special": True}}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_file(tmp_path)
    assert tokenizer.token_id("<|im_end|>") == 3040
    # 3040 is offset 40, Meta's reserved number 40 - 8 = 32: the config's name replaces that one.
    assert "<|reserved_special_token_32|>" not in tokenizer.special_tokens
    assert len(tokenizer.special_tokens) == 256
    assert tokenizer.encode("a<|im_end|>", allowed_special={"<|im_end|>"})[-1] == 3040
    assert tokenizer.decode([3040]) == "<|im_end|>"


def test_with_special_tokens_renames_a_reserved_id(llama3):
    renamed = llama3.with_special_tokens({"<|im_end|>": 128040})
    assert renamed.encode("hi<|im_end|>", allowed_special={"<|im_end|>"})[-1] == 128040
    assert renamed.decode([128040]) == "<|im_end|>"
    # 128040 is offset 40, reserved number 40 - 8 = 32 in Meta's numbering; it loses that name.
    assert "<|reserved_special_token_32|>" not in renamed.special_tokens
    assert len(renamed.special_tokens) == 256
    assert "<|im_end|>" not in llama3.special_tokens  # the original is unchanged
    assert renamed.with_special_tokens({"<|im_end|>": 128040}) is renamed


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"<|im_end|>": 9906}, "9906 is not a special id"),
        ({"<|im_end|>": 128256}, "128256 is not a special id"),
        ({"<|eot_id|>": 128040}, "'<|eot_id|>' is already special token 128009"),
        ({"<a>": 128050, "<b>": 128050}, "'<a>' and '<b>' both ask for special id 128050"),
    ],
)
def test_with_special_tokens_refuses_bad_ids(llama3, mapping, message):
    with pytest.raises(ValueError, match=message.replace("|", r"\|")):
        llama3.with_special_tokens(mapping)


def test_unknown_special_token_error_says_how_to_add_it(llama3):
    with pytest.raises(KeyError, match=r"'<\|im_start\|>' is not a special token.*with_special_tokens"):
        llama3.token_id("<|im_start|>")


def train_sentencepiece(path: Path) -> sentencepiece.SentencePieceProcessor:
    corpus = ["the cat sat on the mat", "a dog ate the bone", "hello world, hello tokenizer"] * 30
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=60, model_type="bpe", minloglevel=2
    )
    path.write_bytes(model.getvalue())
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def test_sentencepiece_model_is_detected_and_matches_sentencepiece(tmp_path):
    processor = train_sentencepiece(tmp_path / "tokenizer.model")
    tokenizer = Tokenizer.from_file(tmp_path)
    for text in ["the cat ate the bone", "hello   world", "unseen ünïcode"]:
        assert tokenizer.encode(text) == processor.encode(text)
    assert tokenizer.decode(processor.encode("the cat sat")) == "the cat sat"
    assert tokenizer.encode("<s>the", bos=True, eos=True) == [
        processor.bos_id(),
        *processor.encode("<s>the"),
        processor.eos_id(),
    ]
    assert tokenizer.encode("<s>the", allowed_special="all") == [processor.bos_id(), *processor.encode("the")]
    assert tokenizer.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, processor.unk_id())
    assert tokenizer.vocab_size == processor.get_piece_size()


def test_missing_path_names_it_and_the_accepted_kinds(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found: .*nothing\.model; expected a tiktoken"):
        Tokenizer.from_file(tmp_path / "nothing.model")
    with pytest.raises(
        FileNotFoundError, match=r"no tokenizer in directory .*tokenizer\.json, tokenizer\.model"
    ):
        Tokenizer.from_file(tmp_path)


def test_malformed_rank_file_names_the_line(tmp_path):
    good = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    path = tmp_path / "tokenizer.model"
    path.write_text("\n".join([*good[:3], "QQ== notanumber", *good[3:]]))
    with pytest.raises(
        TokenizerFileError, match=r"tokenizer\.model, line 4: expected '<base64 token> <rank>'"
    ):
        Tokenizer.from_file(path)
    path.write_text("\n".join(good[:200]))
    with pytest.raises(TokenizerFileError, match="56 single bytes .* have no token"):
        Tokenizer.from_file(path)


def test_file_of_no_known_kind_is_rejected(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\x00\x01garbage\xff")
    with pytest.raises(TokenizerFileError, match="neither a tiktoken rank file .* nor a SentencePiece model"):
        Tokenizer.from_file(path)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text("{not json")
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json is not valid JSON"):
        Tokenizer.from_file(bad_json)
    bad_json.write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(TokenizerFileError, match="'model' must be a BPE model"):
        Tokenizer.from_file(bad_json)
    split = {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Isolated", "invert": False}
    not_byte_level = {"model": {"type": "BPE", "vocab": {"a b": 0}, "merges": []}, "pre_tokenizer": split}
    bad_json.write_text(json.dumps(not_byte_level))
    with pytest.raises(
        TokenizerFileError, match="token 'a b' has characters outside the byte-level alphabet"
    ):
        Tokenizer.from_file(bad_json)


def test_tokenizer_json_with_merges_out_of_id_order_is_rejected(small_files, tmp_path):
    _, json_file = small_files
    data = json.loads(json_file.read_text())
    merges = data["model"]["merges"]
    merges[10], merges[-1] = merges[-1], merges[10]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    # merges[10] now yields the highest id, so merges[11] is the first to go backwards.
    with pytest.raises(TokenizerFileError, match=r"merges\[11\] .* lower than the merge before it"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


def test_default_without_llama_models_says_how_to_install_it(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llama_models" else real_find_spec(name, *a),
    )
    tokenizer_module._default_tokenizer.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match=r"pip install llama-models==0\.3\.0"):
            Tokenizer.default()
    finally:
        tokenizer_module._default_tokenizer.cache_clear()
