"""The `tokenizers` backend (tokenizer.json files not in Llama 3's layout) against the library itself, and
the Hermes format on a vocabulary that has no reserved ids: tags as text, exact loss masks, the export
read back by transformers."""

import json
import pickle
import random
from pathlib import Path

import pytest
from tokenizers import (
    AddedToken,
    SentencePieceBPETokenizer,
    SentencePieceUnigramTokenizer,
    decoders,
    models,
    pre_tokenizers,
    trainers,
)
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer

from hermes.data.chat import ChatFormat
from hermes.data.chat_files import save_chat_format
from hermes.data.hf_tokenizers_backend import TokenizersTokenizer
from hermes.data.records import parse_conversation
from hermes.data.sample import IGNORE_INDEX
from hermes.data.tokenizer import Tokenizer, TokenizerFileError
from tests.test_chat import trained_spans
from tests.test_chat_template import ALL, IDS, open_ended
from tests.test_tokenizer import PATTERN, SAMPLES

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MIXED = [
    *SAMPLES,  # prose, code, unicode, whitespace runs, empty
    "a turn<|im_end|>\n<|im_start|>user\ntyped <|endoftext|> and <tool_call>{}</tool_call>",
    "<|im_end|><|im_end|>x<|im_start|>",
]


def generated_corpus(lines: int = 4000) -> list[str]:
    """Prose from made-up words, code, unicode and whitespace runs: enough text for thousands of merges."""
    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "ing", "qu", "str"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)]
    code = ["def {0}(x):\n    return x + 1\n", "for {0} in range(10):\n\tprint({0})\n", "{{'{0}': [1, 2]}}"]
    unicode = ["naïve café Straße", "Ελληνικά русский", "日本語のテキスト 한국어", "emoji 😀👍🏽 ✓"]
    corpus = []
    for _ in range(lines):
        sentence = " ".join(rng.choices(words, k=rng.randint(5, 25)))
        corpus.append(sentence.capitalize() + rng.choice([".", "!", "?", ",", ";"]))
        corpus.append(rng.choice(code).format(rng.choice(words)))
        corpus.append(rng.choice(unicode) + " " * rng.randint(1, 6) + "\n" * rng.randint(0, 3))
    return corpus


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory) -> Path:
    return write_byte_level_bpe(tmp_path_factory.mktemp("byte_level"))


def write_byte_level_bpe(directory: Path) -> Path:
    """A GPT-2-style byte-level BPE trained here, with its own special tokens; <|endoftext|> is BOS and EOS.
    Writes tokenizer.json and tokenizer_config.json into `directory` and returns it."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + len(SPECIALS) + 3000,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(generated_corpus(), trainer)
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<|endoftext|>", "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>"}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def library(byte_level) -> HFTokenizer:
    return HFTokenizer.from_file(str(byte_level / "tokenizer.json"))


@pytest.fixture(scope="module")
def tokenizer(byte_level) -> Tokenizer:
    return Tokenizer.from_file(byte_level)


@pytest.fixture(scope="module")
def chat(tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


def without_added_tokens(library: HFTokenizer) -> HFTokenizer:
    """The library's tokenizer with no added tokens: it encodes special-token text as plain text. (The
    trainer put the special tokens at the start of the vocabulary, so no id moves.)"""
    data = json.loads(library.to_str())
    data["added_tokens"] = []
    return HFTokenizer.from_str(json.dumps(data))


def test_byte_level_bpe_has_thousands_of_merges_and_key_ids_from_tokenizer_config(library, tokenizer):
    assert isinstance(tokenizer, TokenizersTokenizer)
    assert len(json.loads(library.to_str())["model"]["merges"]) >= 2500
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 0, 0)  # pad falls back to EOS
    assert tokenizer.special_tokens == {name: index for index, name in enumerate(SPECIALS)}
    assert tokenizer.vocab_size == library.get_vocab_size()


@pytest.mark.parametrize("text", MIXED)
def test_byte_level_ids_equal_the_librarys_with_and_without_allowed_special(library, tokenizer, text):
    plain = without_added_tokens(library)
    assert tokenizer.encode(text) == plain.encode(text).ids
    assert tokenizer.encode(text, allowed_special="all") == library.encode(text, add_special_tokens=False).ids
    # Only <|im_end|> allowed: the library's ids of the text around it, and its id between them.
    pieces = [plain.encode(piece).ids for piece in text.split("<|im_end|>")]
    expected = [*pieces[0]]
    for piece in pieces[1:]:
        expected += [2, *piece]
    assert tokenizer.encode(text, allowed_special={"<|im_end|>"}) == expected
    assert tokenizer.encode(text, bos=True, eos=True) == [0, *plain.encode(text).ids, 0]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(text, allowed_special="all")) == text


LLAMA3_SPLIT = {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Isolated", "invert": False}


@pytest.mark.parametrize(
    "normalizer", [None, {"type": "NFC"}], ids=["specials before the ranks", "with a normalizer"]
)
def test_split_regex_files_tiktoken_would_misread_go_to_the_library(
    library, byte_level, tmp_path, normalizer
):
    data = json.loads(library.to_str())
    byte_level_step = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": False,
    }
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [LLAMA3_SPLIT, byte_level_step]}
    data["normalizer"] = normalizer
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tokenizer_config.json").write_bytes((byte_level / "tokenizer_config.json").read_bytes())
    reference = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer.from_file(tmp_path)
    assert isinstance(tokenizer, TokenizersTokenizer) and tokenizer.eos_id == 0
    for text in [*MIXED, "cafe\u0301 composed by NFC"]:
        assert (
            tokenizer.encode(text, allowed_special="all")
            == reference.encode(text, add_special_tokens=False).ids
        )


def test_a_pickled_tokenizer_still_encodes_special_text_as_text(tokenizer):
    text = "x<|im_end|>y"
    before = tokenizer.encode(text)
    again = pickle.loads(pickle.dumps(tokenizer))
    assert again.encode(text) == before and 2 not in before
    assert again.encode(text, allowed_special={"<|im_end|>"})[1:-1] == [2]


def test_a_special_id_takes_a_new_name_in_the_library_tokenizer_too(library, byte_level, tmp_path):
    extra = HFTokenizer.from_str(library.to_str())
    extra.add_special_tokens([AddedToken("<|unused_0|>", special=True, normalized=False)])
    extra.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_bytes((byte_level / "tokenizer_config.json").read_bytes())
    base = Tokenizer.from_file(tmp_path)
    unused = base.token_id("<|unused_0|>")
    renamed = base.with_special_tokens({"<tool_call>": unused})
    assert renamed.encode("a<tool_call>b", allowed_special={"<tool_call>"}) == [
        *base.encode("a"),
        unused,
        *base.encode("b"),
    ]
    assert renamed.encode("<tool_call>") == base.encode("<tool_call>") != [unused]
    assert renamed.decode([unused]) == "<tool_call>"
    assert renamed.backend.token_to_id("<tool_call>") == unused
    assert "<|unused_0|>" not in renamed.special_tokens


def test_tags_outside_the_vocabulary_are_text_and_only_assistant_spans_are_trained(chat, tokenizer):
    assert chat.special_tokens == {"<|im_start|>": 1, "<|im_end|>": 2}
    assert chat.stop_ids == (2, 0)
    record = {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
            },
            {"role": "tool", "content": '{"temp_c": 3}'},
            {"role": "assistant", "content": "<SCRATCHPAD>It is cold.</SCRATCHPAD>\nIt is 3 °C."},
            {"role": "user", "content": "And <tool_call> typed by me?"},
            {"role": "assistant", "content": "\n\n  A reply after blank lines."},
        ],
        "tools": [{"name": "get_weather", "parameters": {"type": "object"}}],
    }
    conversation = parse_conversation(record, "test:1")
    sample = chat.render(conversation)
    answers = [message.content for message in conversation.messages if message.role == "assistant"]
    assert answers[0].startswith("<tool_call>\n{")
    spans = trained_spans(sample.labels)
    assert [tokenizer.decode(span) for span in spans[:2]] == [answer + "<|im_end|>" for answer in answers[:2]]
    # Each trained span follows its header's newline and ends the turn; a reply that starts with blank
    # lines shares its first token with the header's newline, and that token alone is not trained.
    header = [1, *tokenizer.encode("assistant")]
    for span, answer in zip(spans, answers):
        start = next(i for i in range(len(sample.tokens)) if sample.tokens[i : i + len(span)] == span)
        assert sample.tokens[start - 1 - len(header) : start - 1] == header
        assert sample.labels[start - 1] == IGNORE_INDEX
        assert sample.tokens[start - 1 : start] + span == [*tokenizer.encode("\n" + answer), 2]
    assert tokenizer.decode(spans[2]) == "  A reply after blank lines.<|im_end|>"
    tag = tokenizer.encode("<tool_call>")
    assert len(tag) > 1
    assert any(spans[0][i : i + len(tag)] == tag for i in range(len(spans[0])))
    assert max(sample.tokens) < tokenizer.vocab_size


@pytest.fixture(scope="module")
def exported(chat, tmp_path_factory):
    directory = tmp_path_factory.mktemp("export")
    save_chat_format(chat, directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize(("name", "messages", "tools"), ALL, ids=IDS)
def test_apply_chat_template_on_the_export_gives_hermes_ids(chat, exported, name, messages, tools):
    generation = open_ended(messages)
    theirs = exported.apply_chat_template(
        messages, tools=tools, add_generation_prompt=generation, tokenize=True, return_dict=False
    )
    assert list(theirs) == chat.encode_messages(messages, tools, add_generation_prompt=generation)


def test_the_export_names_the_key_tokens(exported):
    assert exported.bos_token == "<|endoftext|>" and exported.eos_token == "<|im_end|>"
    assert exported.eos_token_id == 2 and exported.pad_token_id == 0


def sentencepiece_bpe() -> HFTokenizer:
    trained = SentencePieceBPETokenizer()
    trained.train_from_iterator(
        generated_corpus(1000), vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    return trained._tokenizer


def sentencepiece_unigram() -> HFTokenizer:
    trained = SentencePieceUnigramTokenizer()
    trained.train_from_iterator(
        generated_corpus(1000),
        vocab_size=1500,
        special_tokens=["<unk>", "<s>", "</s>"],
        unk_token="<unk>",
        show_progress=False,
    )
    return trained._tokenizer


@pytest.mark.parametrize("build", [sentencepiece_bpe, sentencepiece_unigram], ids=["bpe", "unigram"])
def test_sentencepiece_derived_tokenizer_json_matches_the_library(build, tmp_path):
    library = build()
    assert json.loads(library.to_str())["pre_tokenizer"]["type"] == "Metaspace"
    library.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert isinstance(tokenizer, TokenizersTokenizer)
    # No tokenizer_config.json: the key ids come from the added tokens' conventional names.
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)
    for text in [*MIXED, "</s> spelled and <s> too", "  two leading spaces"]:
        expected = library.encode(text, add_special_tokens=False).ids
        assert tokenizer.encode(text, allowed_special="all") == expected
        assert tokenizer.decode(expected) == library.decode(expected, skip_special_tokens=False)
    library.encode_special_tokens = True
    for text in ["</s> spelled and <s> too", "x</s>"]:
        assert tokenizer.encode(text) == library.encode(text, add_special_tokens=False).ids


def test_a_tokenizer_json_without_eos_is_an_error_naming_the_file_and_key(library, tmp_path):
    data = json.loads(library.to_str())
    for entry in data["added_tokens"]:
        entry["content"] = entry["content"].replace("endoftext", "sep")
    data["model"]["vocab"] = {
        key.replace("endoftext", "sep"): value for key, value in data["model"]["vocab"].items()
    }
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json: no EOS token.*set \"eos_token\""):
        Tokenizer.from_file(path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    with pytest.raises(TokenizerFileError, match=r"tokenizer_config\.json: 'eos_token' is '<\|endoftext\|>'"):
        Tokenizer.from_file(path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert Tokenizer.from_file(path).eos_id == 2


def test_a_vocabulary_without_im_start_is_refused_naming_the_fixes(library, tmp_path):
    data = json.loads(library.to_str())
    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["content"] != "<|im_start|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    with pytest.raises(
        ValueError, match=r"no special token '<\|im_start\|>'.*data\.chat_template = \"checkpoint\""
    ):
        ChatFormat(Tokenizer.from_file(tmp_path))
