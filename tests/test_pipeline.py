import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from hermes.config import DataConfig
from hermes.data import pipeline
from hermes.data.chat import ChatFormat
from hermes.data.conversation import Conversation, Message
from hermes.data.dataset import TokenizedDataset
from hermes.data.filters import FilterSummary
from hermes.data.pipeline import prepare_sft_dataset
from hermes.data.tokenizer import Tokenizer

WEATHER = {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
LONG_TEXT = " ".join(f"word{i}" for i in range(80))


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def chat(llama3) -> ChatFormat:
    # The sample lengths these tests count leave out the default system turn.
    return ChatFormat(llama3, default_system_prompt="")


def openai(*turns: tuple[str, str], **extra) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns], **extra}


def conversation(*turns: tuple[str, str], tools=(), category="") -> Conversation:
    return Conversation(tuple(Message(r, c) for r, c in turns), tuple(tools), category)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


GOOD = [
    openai(("user", "What is 2 + 2?"), ("assistant", "2 + 2 = 4."), category="math"),
    openai(("user", "Name a colour."), ("assistant", "Blue."), category="general"),
]


def prepare(chat, data: Path, tmp_path: Path, seed: int = 0, **options) -> Path:
    config = DataConfig(train=[str(data)], seq_len=options.pop("seq_len", 256), **options)
    return prepare_sft_dataset(chat, config, seed, tmp_path / "cache", tmp_path / "run")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# --- the cache -------------------------------------------------------------------------------------------


def test_second_call_reuses_the_cache_without_rebuilding(chat, tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "data.jsonl", GOOD)
    first = prepare(chat, data, tmp_path)
    assert "Tokenized 2 samples" in capsys.readouterr().out
    written = (first / "tokens.npy").stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached dataset was rebuilt")

    monkeypatch.setattr(pipeline, "build_sft_samples", no_rebuild)
    second = prepare(chat, data, tmp_path)
    assert second == first
    assert f"Using tokenized cache {first}" in capsys.readouterr().out
    assert (second / "tokens.npy").stat().st_mtime_ns == written


def _rewrite_data(data: Path, options: dict) -> None:
    write_jsonl(data, [GOOD[0], openai(("user", "Name a colour."), ("assistant", "Red."))])


CHANGES = {
    "data file content": _rewrite_data,
    "seq_len": lambda data, options: options.update(seq_len=128),
    "overlong policy": lambda data, options: options.update(overlong="drop"),
    "min_tokens": lambda data, options: options.update(min_tokens=5),
    "max_tokens": lambda data, options: options.update(max_tokens=500),
    "refusal switch": lambda data, options: options.update(drop_refusals=False),
    "mixture seed": lambda data, options: options.update(seed=1),
}


@pytest.mark.parametrize("change", CHANGES)
def test_cache_is_rebuilt_when_an_input_of_the_result_changes(chat, tmp_path, capsys, change):
    data = write_jsonl(tmp_path / "data.jsonl", GOOD)
    options = {"mixture": {"math": 1.0, "general": 1.0}} if change == "mixture seed" else {}
    first = prepare(chat, data, tmp_path, **options)
    capsys.readouterr()
    CHANGES[change](data, options)
    second = prepare(chat, data, tmp_path, **options)
    assert second != first
    assert "Tokenized" in capsys.readouterr().out


def test_seed_does_not_change_the_cache_without_a_mixture(chat, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", GOOD)
    first = prepare(chat, data, tmp_path, seed=0)
    assert prepare(chat, data, tmp_path, seed=1) == first
    assert "Using tokenized cache" in capsys.readouterr().out


def test_cache_is_rebuilt_when_the_hermes_special_token_map_changes(chat, llama3, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", GOOD)
    first = prepare(chat, data, tmp_path)
    moved = ChatFormat(llama3, special_tokens={"<|im_start|>": 128100})
    second = prepare(moved, data, tmp_path)
    assert second != first
    assert capsys.readouterr().out.count("Tokenized 2 samples") == 2
    tokens = TokenizedDataset.load(second).tokens
    assert 128100 in tokens and chat.special_tokens["<|im_start|>"] not in tokens


# --- what is kept and what is counted --------------------------------------------------------------------


def _short_and_long(tmp_path: Path) -> Path:
    return write_jsonl(
        tmp_path / "data.jsonl", [GOOD[0], openai(("user", "Count."), ("assistant", LONG_TEXT))]
    )


def test_truncate_keeps_the_first_seq_len_tokens_of_an_overlong_sample(chat, tmp_path):
    data = _short_and_long(tmp_path)
    directory = prepare(chat, data, tmp_path, seq_len=32, overlong="truncate")
    dataset = TokenizedDataset.load(directory)
    full = chat.render(conversation(("user", "Count."), ("assistant", LONG_TEXT)))
    assert len(full) > 32
    assert len(dataset) == 2
    assert dataset[1].tokens == full.tokens[:32]
    assert dataset[1].labels == full.labels[:32]
    assert read_json(directory / "filter_summary.json")["seq_len"]["dropped"] == {}
    assert f"truncated to seq_len: 1 samples (e.g. {data}:2)" in (directory / "summary.txt").read_text()


def test_drop_leaves_out_an_overlong_sample_and_counts_it(chat, tmp_path):
    data = _short_and_long(tmp_path)
    directory = prepare(chat, data, tmp_path, seq_len=32, overlong="drop")
    dataset = TokenizedDataset.load(directory)
    assert len(dataset) == 1
    assert dataset[0] == chat.render(
        conversation(("user", "What is 2 + 2?"), ("assistant", "2 + 2 = 4."), category="math")
    )
    seq_len = read_json(directory / "filter_summary.json")["seq_len"]
    assert seq_len["dropped"] == {"longer_than_seq_len": 1}
    assert seq_len["examples"] == {"longer_than_seq_len": [f"{data}:2"]}
    assert read_json(tmp_path / "run" / "filter_summary.json") == read_json(directory / "filter_summary.json")


@pytest.mark.parametrize(("overlong", "truncated"), [("truncate", 1), ("drop", 0)])
def test_filter_summary_json_counts_the_samples_truncated_to_seq_len(chat, tmp_path, overlong, truncated):
    data = write_jsonl(
        tmp_path / "data.jsonl",
        [
            openai(("user", "Count."), ("assistant", LONG_TEXT)),  # 1: longer than 32 tokens
            GOOD[0],
            openai(("user", "Again."), ("assistant", LONG_TEXT)),  # 3: longer than 32 tokens
        ],
    )
    long_lines = [1, 3]
    assert len(chat.render(conversation(("user", "Count."), ("assistant", LONG_TEXT)))) > 32
    directory = prepare(chat, data, tmp_path, seq_len=32, overlong=overlong)
    seq_len = read_json(directory / "filter_summary.json")["seq_len"]
    assert seq_len["truncated"] == truncated * len(long_lines)
    assert seq_len["truncated_examples"] == [f"{data}:{line}" for line in long_lines][: seq_len["truncated"]]
    assert seq_len["kept"] == 3 - (1 - truncated) * len(long_lines)
    # The copy in the run directory carries the count too; the other stages never cut, so have no count.
    report = read_json(tmp_path / "run" / "filter_summary.json")
    assert report["seq_len"]["truncated"] == truncated * len(long_lines)
    assert "truncated" not in report["records"] and "truncated" not in report["samples"]


def test_a_stage_that_cuts_records_counts_the_truncated_ones_with_examples():
    summary = FilterSummary(max_examples=2)
    for source, cut in [("a", True), ("b", False), ("c", True), ("d", True)]:
        summary.add("seq_len", source, None, truncated=cut)
    summary.add("seq_len", "e", "longer_than_seq_len", truncated=False)
    summary.add("records", "r", None)
    assert summary.truncated("seq_len") == (3, ["a", "c"])
    assert summary.truncated("records") == (0, [])
    assert summary.truncated("never_ran") == (0, [])
    entries = summary.to_dict()
    assert entries["seq_len"] == {
        "seen": 5,
        "kept": 4,
        "dropped": {"longer_than_seq_len": 1},
        "examples": {"longer_than_seq_len": ["e"]},
        "truncated": 3,
        "truncated_examples": ["a", "c"],
    }
    assert "truncated" not in entries["records"]


def test_a_sample_truncated_to_its_prompt_is_dropped_as_untrained(chat, tmp_path):
    data = write_jsonl(
        tmp_path / "data.jsonl", [GOOD[0], openai(("user", LONG_TEXT), ("assistant", "Done."))]
    )
    directory = prepare(chat, data, tmp_path, seq_len=32, overlong="truncate")
    assert len(TokenizedDataset.load(directory)) == 1
    samples = read_json(directory / "filter_summary.json")["samples"]
    assert samples["dropped"] == {"no_trained_tokens": 1}
    assert samples["examples"] == {"no_trained_tokens": [f"{data}:2"]}


def test_filter_summary_counts_each_bad_record_under_its_reason(chat, tmp_path):
    short = openai(("user", "Hi"), ("assistant", "Yo"))
    records = [
        GOOD[0],  # 1 kept
        openai(("user", "Hello?"), ("assistant", "   ")),  # 2 empty_turn
        openai(("user", "Anyone there?")),  # 3 no_assistant_turn
        openai(
            ("assistant", "I speak first."), ("user", "Why?"), ("assistant", "Because.")
        ),  # 4 bad_turn_order
        openai(("user", "Weather?"), ("assistant", "<tool_call>\n{oops}\n</tool_call>")),  # 5 malformed
        openai(  # 6 unknown_tool: calls get_weather, offers only get_time
            ("user", "Weather in Oslo?"), ("assistant", CALL), tools=[{"name": "get_time"}]
        ),
        openai(("user", "Help me."), ("assistant", "I'm sorry, but I can't do that.")),  # 7 refusal
        openai(("user", "Help me."), ("assistant", "As an AI language model, no.")),  # 8 refusal
        GOOD[1],  # 9 kept
        short,  # 10 too_short
    ]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    min_tokens = 15
    assert len(chat.render(conversation(("user", "Hi"), ("assistant", "Yo")))) < min_tokens
    directory = prepare(chat, data, tmp_path, min_tokens=min_tokens)
    summary = read_json(directory / "filter_summary.json")
    assert summary["records"]["seen"] == 10
    assert summary["records"]["kept"] == 3
    assert summary["records"]["dropped"] == {
        "empty_turn": 1,
        "no_assistant_turn": 1,
        "bad_turn_order": 1,
        "malformed_tool_call": 1,
        "unknown_tool": 1,
        "refusal": 2,
    }
    assert summary["records"]["examples"]["refusal"] == [f"{data}:7", f"{data}:8"]
    assert summary["samples"]["dropped"] == {"too_short": 1}
    assert summary["samples"]["examples"] == {"too_short": [f"{data}:10"]}
    assert len(TokenizedDataset.load(directory)) == 2


def test_missing_data_file_error_names_the_path_and_the_fix(chat, tmp_path):
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + ".*set data.train"):
        prepare(chat, missing, tmp_path)


# --- the mixture -----------------------------------------------------------------------------------------


def _two_categories(tmp_path: Path) -> Path:
    records = [
        openai(("user", f"Question {i}?"), ("assistant", f"Answer {i}: " + "yes " * (i % 5)), category=c)
        for i, c in enumerate("aaaaaaaabbbb")
    ]
    return write_jsonl(tmp_path / "data.jsonl", records)


def test_mixture_summary_is_printed_written_beside_the_filter_summary_and_copied(chat, tmp_path, capsys):
    data = _two_categories(tmp_path)
    directory = prepare(chat, data, tmp_path, mixture={"a": 3.0, "b": 1.0})
    dataset = TokenizedDataset.load(directory)
    tokens = Counter()
    samples = Counter(dataset.categories)
    for i, category in enumerate(dataset.categories):
        tokens[category] += int(dataset.lengths[i])
    mixture = read_json(directory / "mixture_summary.json")
    assert {c: m["selected_samples"] for c, m in mixture.items()} == samples
    assert {c: m["selected_tokens"] for c, m in mixture.items()} == tokens
    assert mixture["a"]["weight"] == pytest.approx(0.75)
    # The mixture keeps the data's size; each share is within half a sample of its target.
    longest = max(dataset.lengths)
    total = sum(m["tokens"] for m in mixture.values())
    assert abs(tokens["a"] - 0.75 * total) <= longest / 2
    assert abs(tokens["b"] - 0.25 * total) <= longest / 2
    assert read_json(tmp_path / "run" / "mixture_summary.json") == mixture
    assert re.search(r"^b\s+25\.0%", capsys.readouterr().out, re.MULTILINE)


def test_a_run_without_mixture_removes_a_stale_mixture_summary_from_the_run_dir(chat, tmp_path):
    data = _two_categories(tmp_path)
    prepare(chat, data, tmp_path, mixture={"a": 1.0, "b": 1.0})
    assert (tmp_path / "run" / "mixture_summary.json").is_file()
    directory = prepare(chat, data, tmp_path)
    assert not (directory / "mixture_summary.json").exists()
    assert not (tmp_path / "run" / "mixture_summary.json").exists()


# --- the result ------------------------------------------------------------------------------------------


def test_loaded_dataset_equals_the_conversations_rendered_by_chat_format(chat, tmp_path):
    records = [
        GOOD[0],
        {"conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello."}]},
        openai(
            ("system", "Be brief."),
            ("user", "Weather in Oslo?"),
            ("assistant", CALL),
            ("tool", '<tool_response>\n{"name": "get_weather", "content": "-3 C"}\n</tool_response>'),
            ("assistant", "It is -3 C."),
            tools=[WEATHER],
            category="tool_use",
        ),
    ]
    expected = [
        conversation(("user", "What is 2 + 2?"), ("assistant", "2 + 2 = 4."), category="math"),
        conversation(("user", "Hi!"), ("assistant", "Hello.")),
        conversation(
            *[(m["role"], m["content"]) for m in records[2]["messages"][:3]],
            ("tool", '{"name": "get_weather", "content": "-3 C"}'),  # the result inside its block
            ("assistant", "It is -3 C."),
            tools=[WEATHER],
            category="tool_use",
        ),
    ]
    directory = prepare(chat, write_jsonl(tmp_path / "data.jsonl", records), tmp_path, seq_len=1024)
    dataset = TokenizedDataset.load(directory)
    assert [dataset[i] for i in range(len(dataset))] == [chat.render(c) for c in expected]


def test_records_read_in_chunks_give_the_samples_and_summary_of_one_pass(chat, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "CHUNK_RECORDS", 3)  # the first chunk holds only dropped records
    bad = [openai(("user", "Hello?"), ("assistant", " ")), openai(("user", "Anyone?"))]
    records = [*bad, bad[0], GOOD[0], openai(("user", "Count."), ("assistant", LONG_TEXT)), *bad, GOOD[1]]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    built = pipeline.build_sft_samples([data], chat, DataConfig(seq_len=32), seed=0)
    long_cut = chat.render(conversation(("user", "Count."), ("assistant", LONG_TEXT)))
    expected = [
        chat.render(conversation(("user", "What is 2 + 2?"), ("assistant", "2 + 2 = 4."), category="math")),
        dataclasses.replace(long_cut, tokens=long_cut.tokens[:32], labels=long_cut.labels[:32]),
        chat.render(conversation(("user", "Name a colour."), ("assistant", "Blue."), category="general")),
    ]
    assert built.samples == expected
    summary = built.summary.to_dict()
    assert list(summary) == ["records", "seq_len", "samples"]  # the order the stages first ran
    assert (summary["records"]["seen"], summary["records"]["kept"]) == (8, 3)
    assert summary["records"]["examples"]["empty_turn"] == [f"{data}:1", f"{data}:3", f"{data}:6"]
    assert (summary["seq_len"]["truncated"], summary["seq_len"]["truncated_examples"]) == (1, [f"{data}:5"])
    assert (summary["samples"]["seen"], summary["samples"]["kept"]) == (3, 3)
