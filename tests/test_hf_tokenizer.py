import random

import pytest
import tiktoken
from transformers import PreTrainedTokenizerFast

from hermes.data.hf_tokenizer import save_tokenizer_json, tokenizers_from_tiktoken
from hermes.data.tokenizer import Tokenizer

# Reserved ids that Hermes chat tags take over; the names they had in Llama 3.1.
RENAMED = {"<|im_start|>": 128039, "<tool_call>": 128043}
REPLACED = {"<|reserved_special_token_31|>": 128039, "<|reserved_special_token_35|>": 128043}
TAGS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_247|>",
    *RENAMED,
    *REPLACED,  # plain text once renamed
    "</tool_call>",  # not special: plain text
    "<|eot_id",  # a cut tag
    "<|im_start|",
]
VOCABULARY = (
    "the of and to in is was he for it with as his on be at by had not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so "
    "said what up its about into than them can only other new some could time these two may then do "
    "first any my now such like our over man me even most made after also did many before must through "
    "tokenizer gradient llama checkpoint straße naïve café façade coöperate résumé jalapeño "
    # Tokens that plain BPE over their bytes does not reach (tiktoken looks whole pieces up first).
    "việc hợp nhiều điều Việt ngoài nhiên biệt nhiệm nhanh hiểu biểu jeho každ zdrav değiş ulaş oluştur "
    "geliş gelmektedir yapılmış larından характер даже практи культу використ розвит вироб ایران اطلاعات"
)
WORDS = VOCABULARY.split()
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re", "'VE", "'D", "’s", "'x"]
CODE = [
    "def {name}(x, y=None):\n    if y is None:\n        return x ** 2\n    return [x + i for i in range(y)]\n",
    "for (int {name} = 0; {name} < n; ++{name}) {{\n\tsum += a[{name}] * 0x1F;\n}}\r\n",
    'const {name} = async () => {{ await fetch("/api/v1?q=%20&x=1"); }};\n',
    "SELECT {name}, COUNT(*) FROM t WHERE a >= 10 AND b != 'x' GROUP BY 1;\n",
    "{name}:\n  - key: value  # comment\n    list: [1, 2, 3]\n\n\n",
    '#include <stdio.h>\nint main(void) {{ printf("%d\\n", {name}); return 0; }}\n',
    "    \t  {name} = lambda *args, **kw: (args, kw)    \n",
]
SCRIPTS = [
    (0x4E00, 0x9FFF),  # CJK
    (0x3040, 0x30FF),  # kana
    (0xAC00, 0xD7A3),  # Hangul
    (0x05D0, 0x05EA),  # Hebrew
    (0x0621, 0x064A),  # Arabic
    (0x0900, 0x097F),  # Devanagari
    (0x0E01, 0x0E5B),  # Thai
    (0x0400, 0x04FF),  # Cyrillic
    (0x0370, 0x03FF),  # Greek
    (0x1F300, 0x1FAFF),  # emoji
]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇫🇷", "1️⃣"]
ACCENTS = ["é", "e\u0301", "ñ", "n\u0303", "ü", "Å", "ǅ", "ﬁ", "ẞ", "İ", "ı"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\r", "\n\n", "\u00a0", "\u3000", "\u2028", "\u200b", "\x0b", "\x0c"]


def prose(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(20, 200)):
        word = rng.choice(WORDS)
        roll = rng.random()
        if roll < 0.1:
            word = word.upper()
        elif roll < 0.3:
            word = word.capitalize()
        if rng.random() < 0.08:
            word += rng.choice(CONTRACTIONS)
        out.append(word + rng.choice([" ", " ", " ", ", ", ". ", "; ", "! ", "? ", "\n", " (", ") ", '" ']))
    return "".join(out)


def code(rng: random.Random) -> str:
    names = ["x", "idx", "_private", "camelCase", "snake_case_name", "Ω", "変数"]
    return "".join(rng.choice(CODE).format(name=rng.choice(names)) for _ in range(rng.randint(3, 20)))


def numbers(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(10, 80)):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 40)))
        parts.append(rng.choice(["{}", "{}.5", "-{}", "{},000", "${}", "{}%", "1e{}", "v{}", "{}th", "٣{}"]))
        parts[-1] = parts[-1].format(digits) + rng.choice([" ", ", ", "\n", "", "/"])
    return "".join(parts)


def unicode_text(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(10, 80)):
        low, high = rng.choice(SCRIPTS)
        out.append("".join(chr(rng.randint(low, high)) for _ in range(rng.randint(1, 12))))
        out.append(rng.choice([*EMOJI, *ACCENTS, " ", " ", "。", "، ", "\n"]))
    return "".join(out)


def whitespace(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(5, 40)):
        run = rng.choice([rng.randint(1, 40), rng.randint(100, 3000)])
        out.append("".join(rng.choice(SPACES) for _ in range(run)) if rng.random() < 0.5 else " " * run)
        out.append(rng.choice([*WORDS, "", ".", "x"]))
    return "".join(out)


def tagged(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(5, 30)):
        out.append(rng.choice(TAGS))
        out.append(rng.choice(["", "user", "\n\n", " ", "assistant\n", prose(rng)[:120], '{"name": "f"}']))
    return "".join(out)


def byteish(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.randbytes(rng.randint(50, 2000)).decode("utf-8", "replace")
    chars = (rng.randint(0, 0x10FFFF) for _ in range(rng.randint(50, 1000)))
    return "".join(chr(c) for c in chars if not 0xD800 <= c <= 0xDFFF)


KINDS = [prose, code, numbers, unicode_text, whitespace, tagged, byteish]


def make_corpus(size: int = 1_000_000) -> list[str]:
    """A few edge cases, then documents of one to three generated kinds each, to `size` characters."""
    rng = random.Random(20240723)
    documents, total = ["", " ", "\n", "<|eot_id|>"], 0
    while total < size:
        document = "".join(rng.choice(KINDS)(rng) for _ in range(rng.randint(1, 3)))
        documents.append(document)
        total += len(document)
    return documents


@pytest.fixture(scope="module")
def tiktoken_tokenizer() -> Tokenizer:
    return Tokenizer.default().with_special_tokens(RENAMED)


@pytest.fixture(scope="module")
def converted(tiktoken_tokenizer):
    return tokenizers_from_tiktoken(tiktoken_tokenizer)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="module")
def expected(tiktoken_tokenizer, corpus) -> list[list[int]]:
    return [tiktoken_tokenizer.encode(document, allowed_special="all") for document in corpus]


@pytest.fixture(scope="module")
def written(tiktoken_tokenizer, tmp_path_factory):
    return save_tokenizer_json(tiktoken_tokenizer, tmp_path_factory.mktemp("export") / "model")


def assert_same_ids(corpus: list[str], expected: list[list[int]], actual: list[list[int]]) -> None:
    """Equal ids per document; on failure, name the first document that differs and where."""
    for index, (document, want, got) in enumerate(zip(corpus, expected, actual)):
        if want != got:
            at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            pytest.fail(
                f"document {index} ({len(document)} chars) differs at token {at}: tiktoken "
                f"{want[max(0, at - 3) : at + 5]}, converted {got[max(0, at - 3) : at + 5]}; text "
                f"{document[:300]!r}"
            )
    assert len(actual) == len(expected)


def test_corpus_is_a_megabyte_with_special_tokens(corpus, expected):
    assert sum(map(len, corpus)) >= 1_000_000
    ids = {token_id for document in expected for token_id in document}
    assert set(RENAMED.values()) | {128000, 128009} <= ids


def test_converted_ids_equal_tiktoken_per_document_and_concatenated(
    converted, tiktoken_tokenizer, corpus, expected
):
    encodings = converted.encode_batch(corpus, add_special_tokens=False)
    assert_same_ids(corpus, expected, [encoding.ids for encoding in encodings])
    # hermes, like Meta's reference, cuts texts over 400,000 characters before encoding; a tokenizer.json
    # does not, so the whole corpus is compared with tiktoken used directly on the same tables.
    uncut = tiktoken.Encoding(
        name="uncut",
        pat_str=tiktoken_tokenizer.pattern,
        mergeable_ranks=tiktoken_tokenizer.mergeable_ranks,
        special_tokens=tiktoken_tokenizer.special_tokens,
    )
    text = "".join(corpus)
    assert converted.encode(text, add_special_tokens=False).ids == uncut.encode(text, allowed_special="all")


def test_decode_gives_back_the_text_and_bos_is_prepended(converted, corpus, expected):
    decoded = converted.decode_batch(expected, skip_special_tokens=False)
    mismatch = next((i for i, (a, b) in enumerate(zip(decoded, corpus)) if a != b), None)
    assert mismatch is None, f"document {mismatch} decodes to {decoded[mismatch][:200]!r}"
    assert converted.encode("Hello world", add_special_tokens=True).ids == [128000, 9906, 1917]
    pair = converted.encode("Hello", "world", add_special_tokens=True)
    assert pair.ids == [128000, 9906, 128000, 14957]
    assert pair.type_ids == [0, 0, 1, 1]


def test_renamed_special_tokens_keep_their_ids_and_the_replaced_names_are_gone(converted, tiktoken_tokenizer):
    assert Tokenizer.default().special_tokens.items() >= REPLACED.items()
    added = {token.content: token_id for token_id, token in converted.get_added_tokens_decoder().items()}
    assert added == tiktoken_tokenizer.special_tokens
    assert len(added) == 256
    assert all(
        token.special and not token.normalized for token in converted.get_added_tokens_decoder().values()
    )
    for name, token_id in RENAMED.items():
        assert converted.token_to_id(name) == token_id
        assert converted.id_to_token(token_id) == name
    for name in REPLACED:
        assert converted.token_to_id(name) is None
        plain = tiktoken_tokenizer.encode(name, allowed_special="all")
        assert converted.encode(name, add_special_tokens=False).ids == plain and len(plain) > 1
    assert converted.get_vocab_size() == 128256


def test_written_file_loads_in_transformers_with_the_same_ids(written, corpus, expected):
    assert written.name == "tokenizer.json" and written.is_file()
    loaded = PreTrainedTokenizerFast(tokenizer_file=str(written))
    assert_same_ids(corpus, expected, loaded(corpus, add_special_tokens=False)["input_ids"])
    assert loaded("Hello world")["input_ids"] == [128000, 9906, 1917]
    assert loaded.convert_tokens_to_ids(list(RENAMED)) == list(RENAMED.values())


def test_written_file_round_trips_through_hermes(written, tiktoken_tokenizer, corpus, expected):
    reread = Tokenizer.from_file(written)
    assert reread.special_tokens == tiktoken_tokenizer.special_tokens
    assert (reread.bos_id, reread.eos_id, reread.pad_id, reread.vocab_size) == (
        128000,
        128001,
        128004,
        128256,
    )
    assert_same_ids(corpus, expected, [reread.encode(document, allowed_special="all") for document in corpus])


def test_a_special_name_spelled_like_a_bpe_token_is_refused():
    with pytest.raises(ValueError, match="'hello'.*spelled like BPE token 15339"):
        tokenizers_from_tiktoken(Tokenizer.default().with_special_tokens({"hello": 128039}))
