import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from hermes.data.conversation import Conversation, Message, PreferencePair
from hermes.data.filters import (
    ContentFilters,
    FilterSummary,
    filter_conversations,
    filter_pairs,
    filter_samples,
    mix,
    tool_calls_well_formed,
)
from hermes.data.records import RecordError, read_conversations, read_preference_pairs
from hermes.data.sample import IGNORE_INDEX, Sample

WEATHER = {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def _jsonl(path: Path, *lines: object) -> Path:
    """Write each line: a str as is, anything else as JSON."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# --- parsing -------------------------------------------------------------------------------------------


def test_sharegpt_record_maps_human_and_gpt_to_user_and_assistant(tmp_path):
    record = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "user", "value": "Weather?"},
            {"from": "assistant", "value": "<tool_call>x</tool_call>"},
            {"from": "tool", "value": "<tool_response>y</tool_response>"},
            {"from": "gpt", "value": "Sunny."},
            {
                "from": "tool",
                "value": "<tool_response>\n1\n</tool_response>\n<tool_response>\n2\n</tool_response>",
            },
            {"from": "tool", "value": "as written <tool_response>3</tool_response>"},
        ],
        "category": "general_instructions",
    }
    path = _jsonl(tmp_path / "chat.jsonl", "", record)  # a blank first line is skipped, not an error
    assert list(read_conversations(path)) == [
        Conversation(
            messages=(
                Message("system", "Be brief."),
                Message("user", "Hi"),
                Message("assistant", "Hello!"),
                Message("user", "Weather?"),
                Message("assistant", "<tool_call>x</tool_call>"),
                Message("tool", "y"),
                Message("assistant", "Sunny."),
                # Pre-rendered results become one result per block (the renderer wraps each once);
                # text that is not only blocks is the result as written.
                Message("tool", "1"),
                Message("tool", "2"),
                Message("tool", "as written <tool_response>3</tool_response>"),
            ),
            category="general_instructions",
            source=f"{path}:2",
        )
    ]


def test_openai_record_keeps_bare_and_openai_style_tool_schemas(tmp_path):
    record = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        "tools": [WEATHER, TIME],
    }
    path = _jsonl(tmp_path / "chat.jsonl", record, {**record, "tools": json.dumps([WEATHER])})
    first, second = read_conversations(path)
    assert first == Conversation(
        (Message("user", "Hi"), Message("assistant", "Hello")), tools=(WEATHER, TIME), source=f"{path}:1"
    )
    assert second.tools == (WEATHER,)  # tools given as a JSON string, as hermes-function-calling-v1 has them
    assert first.category == ""


def test_openai_tool_calls_become_template_text_and_results_stay_as_given(tmp_path):
    record = {
        "messages": [
            {"role": "user", "content": "Weather in Oslo and the time in Lima?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                    },
                    {
                        "id": "c2",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": {"city": "Lima", "utc": False}},
                    },
                    {"function": {"name": "ping"}},
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'},
            {"role": "tool", "name": "get_time", "content": "09:15"},
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "3 degrees, "}, {"type": "text", "text": "09:15."}],
            },
        ]
    }
    (conversation,) = read_conversations(_jsonl(tmp_path / "calls.jsonl", record))
    # String arguments byte for byte, dict arguments as tojson writes them, none as {}; the results are the
    # tools' own text (their name and call id are not rendered, as in the official template).
    assert [m.content for m in conversation.messages[1:]] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"city": "Lima", "utc": false}}\n</tool_call>\n'
        '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>',
        '{"temp": 3}',
        "09:15",
        "3 degrees, 09:15.",
    ]


def test_preference_pairs_accept_strings_turn_lists_and_single_turns(tmp_path):
    path = _jsonl(
        tmp_path / "pairs.jsonl",
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "category": "math"},
        {
            "messages": [{"role": "system", "content": "Terse."}, {"role": "user", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "assistant", "content": "Go away"}],
            "tools": [WEATHER],
        },
        {
            "conversations": [{"from": "human", "value": "Up?"}],
            "chosen": {"from": "gpt", "value": "UP"},
            "rejected": {"from": "gpt", "value": "down"},
        },
    )
    assert list(read_preference_pairs(path)) == [
        PreferencePair(
            prompt=(Message("user", "2+2?"),),
            chosen=(Message("assistant", "4"),),
            rejected=(Message("assistant", "5"),),
            category="math",
            source=f"{path}:1",
        ),
        PreferencePair(
            prompt=(Message("system", "Terse."), Message("user", "Hi")),
            chosen=(Message("assistant", "Hello"),),
            rejected=(Message("assistant", "Go away"),),
            tools=(WEATHER,),
            source=f"{path}:2",
        ),
        PreferencePair(
            prompt=(Message("user", "Up?"),),
            chosen=(Message("assistant", "UP"),),
            rejected=(Message("assistant", "down"),),
            source=f"{path}:3",
        ),
    ]


def test_reading_streams_several_files_in_order(tmp_path):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    first = _jsonl(tmp_path / "a.jsonl", good, good)
    second = _jsonl(tmp_path / "b.jsonl", good, "{broken")
    stream = read_conversations([first, str(second)])
    # The records before the broken line come out before it is reached: the files are streamed.
    assert [next(stream).source for _ in range(3)] == [f"{first}:1", f"{first}:2", f"{second}:1"]
    with pytest.raises(RecordError, match=re.escape(f"{second}:2")):
        next(stream)


# --- format problems: hard errors naming file, line, field and fix --------------------------------------

_BAD_RECORDS = [
    ('{"messages": [}', "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"category": "math"}, 'missing "conversations" or "messages"'),
    ({"conversations": [], "messages": []}, "has both conversations and messages"),
    ({"messages": {"role": "user"}}, "field 'messages': expected a list of turns, got dict"),
    (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
        "field 'conversations[1].from': unknown role 'bot'. Fix: use one of system, user, human, assistant, gpt, tool",
    ),
    ({"messages": [{"role": "user", "content": 5}]}, "field 'messages[0].content': content must be a string"),
    ({"messages": [{"role": "user", "content": None}]}, "got null"),
    ({"conversations": [{"from": "human"}]}, "field 'conversations[0].value': missing field"),
    ({"messages": [{"content": "hi"}]}, "field 'messages[0]': missing \"role\""),
    (
        {"messages": [], "tools": [{"description": "x"}]},
        "field 'tools[0]': a tool schema must be an object with a name",
    ),
    ({"messages": [], "tools": "[{"}, "field 'tools': string is not valid JSON"),
    ({"messages": [], "category": 3}, "field 'category': expected a string, got int"),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, "field 'chosen': this is a preference pair"),
    (
        {"messages": [{"role": "assistant", "content": "x", "tool_calls": {"name": "f"}}]},
        "field 'messages[0].tool_calls': expected a list of calls, got dict",
    ),
    (
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
        "field 'messages[0].tool_calls[0]': a tool call needs a function name",
    ),
]


@pytest.mark.parametrize(("line", "message"), _BAD_RECORDS)
def test_format_problems_raise_errors_naming_file_line_field_and_fix(tmp_path, line, message):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = _jsonl(tmp_path / "bad.jsonl", good, line)
    with pytest.raises(RecordError) as error:
        list(read_conversations(path))
    assert str(error.value).startswith(f"{path}:2: ")
    assert message in str(error.value)
    assert "Fix: " in str(error.value)


@pytest.mark.parametrize(
    "line",
    [
        '{"messages": []} extra',  # extra data after the object
        '{"messages": []}\x0c',  # trailing whitespace to str.isspace, not to JSON
        '\ufeff{"messages": []}',  # a byte order mark after the first line
        '{"messages": [] ',  # unclosed
    ],
)
def test_a_line_json_loads_rejects_is_an_error_with_its_message(tmp_path, line):
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(line + "\n")  # the line as read, newline included
    path = _jsonl(tmp_path / "lines.jsonl", {"messages": []}, line)
    with pytest.raises(RecordError, match=re.escape(f"{path}:2: not valid JSON ({expected.value})")):
        list(read_conversations(path))


def test_whitespace_json_allows_around_a_record_is_read(tmp_path):
    record = {"messages": [{"role": "user", "content": "a"}]}
    path = _jsonl(tmp_path / "padded.jsonl", record, f" \t{json.dumps(record)} \r\t ")
    assert [c.messages for c in read_conversations(path)] == [(Message("user", "a"),)] * 2


def test_preference_pair_without_rejected_names_the_missing_field(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", {"prompt": "q", "chosen": "a"})
    with pytest.raises(RecordError, match=re.escape(f"{path}:1: field 'rejected': missing field. Fix: add")):
        list(read_preference_pairs(path))


def test_invalid_utf8_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"messages": []}\n{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    with pytest.raises(RecordError, match=re.escape(f"{path}:2: not valid UTF-8")):
        list(read_conversations(path))


# --- content filters: counted skips ---------------------------------------------------------------------


def _chat(*turns: tuple[str, str], **extra: object) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns], **extra}


_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
_RESPONSE = '<tool_response>\n{"name": "get_weather", "content": "cold"}\n</tool_response>'
# (record, reason it is dropped for, or None when kept)
_CONTENT_CASES = [
    (_chat(("user", "hi"), ("assistant", "hello")), None),
    (
        _chat(("system", "s"), ("user", "q"), ("assistant", _CALL), ("tool", _RESPONSE), ("assistant", "ok")),
        None,
    ),
    (
        _chat(("user", "I'm sorry, but I can't sleep."), ("assistant", "Try tea.")),
        None,
    ),  # refusal text by the user
    (_chat(("user", "hi"), ("assistant", "")), "empty_turn"),
    (_chat(("user", "  \n"), ("assistant", "hello")), "empty_turn"),
    (_chat(("system", "s"), ("user", "hi")), "no_assistant_turn"),
    (_chat(("user", "a"), ("user", "b"), ("assistant", "c")), "bad_turn_order"),
    (_chat(("user", "a"), ("assistant", "b"), ("user", "c")), "bad_turn_order"),
    (_chat(("assistant", "hello"), ("user", "hi"), ("assistant", "b")), "bad_turn_order"),
    (_chat(("user", "a"), ("tool", _RESPONSE), ("assistant", "b")), "bad_turn_order"),
    (
        _chat(("user", "q"), ("assistant", _CALL), ("tool", _RESPONSE), ("user", "?"), ("assistant", "b")),
        "bad_turn_order",
    ),
    (
        _chat(
            ("user", "q"),
            ("assistant", '<tool_call>\n{"name": "get_weather", "arguments": {city}}\n</tool_call>'),
        ),
        "malformed_tool_call",
    ),
    (
        _chat(("user", "q"), ("assistant", '<tool_call>\n{"name": "get_weather", "arguments": {}}')),
        "malformed_tool_call",
    ),
    (
        _chat(("user", "q"), ("assistant", '<tool_call>\n{"name": "get_weather"}\n</tool_call>')),
        "malformed_tool_call",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}],
                },
            ]
        },
        "malformed_tool_call",
    ),
    (_chat(("user", "q"), ("assistant", _CALL), tools=[TIME]), "unknown_tool"),
    (_chat(("user", "q"), ("assistant", "I\u2019M SORRY, BUT I CAN\u2019T do that.")), "refusal"),
    (_chat(("user", "q"), ("assistant", "Sure. As an AI language model I know this.")), "refusal"),
]


def test_content_problems_are_dropped_and_counted_per_reason(tmp_path):
    path = _jsonl(tmp_path / "mixed.jsonl", *(record for record, _ in _CONTENT_CASES))
    summary = FilterSummary(max_examples=2)
    kept = [c.source for c in filter_conversations(read_conversations(path), summary)]

    expected_kept = [f"{path}:{i}" for i, (_, reason) in enumerate(_CONTENT_CASES, 1) if reason is None]
    expected_dropped = Counter(reason for _, reason in _CONTENT_CASES if reason is not None)
    assert kept == expected_kept
    assert summary.dropped("records") == dict(expected_dropped)
    assert summary.kept("records") == 3
    # Examples are the first sources per reason, at most max_examples of them.
    assert summary.to_dict()["records"]["examples"]["empty_turn"] == [f"{path}:4", f"{path}:5"]
    assert summary.to_dict()["records"]["examples"]["unknown_tool"] == [f"{path}:16"]


def test_refusal_filter_can_be_turned_off_and_given_custom_phrases():
    refusal = Conversation((Message("user", "q"), Message("assistant", "I'm sorry, but I can't.")))
    custom = Conversation((Message("user", "q"), Message("assistant", "Nope, NEVER.")))
    summary = FilterSummary()
    assert list(filter_conversations([refusal, custom], summary, ContentFilters(refusal_phrases=()))) == [
        refusal,
        custom,
    ]
    assert list(
        filter_conversations([refusal, custom], summary, ContentFilters(refusal_phrases=("never",)))
    ) == [refusal]


@pytest.mark.parametrize(
    ("text", "well_formed"),
    [
        ("no calls at all", True),
        ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', True),
        (
            '<tool_call>{"name": "f", "arguments": {}}</tool_call> and <tool_call>{"name": "g", "arguments": {}}</tool_call>',
            True,
        ),
        ('<tool_call>\n{"name": "f", "arguments": {"x": 1}\n</tool_call>', False),  # broken JSON
        ('<tool_call>\n["f", {}]\n</tool_call>', False),  # not an object
        ('<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>', False),  # name not a string
        ('<tool_call>\n{"name": "f", "arguments": "x=1"}\n</tool_call>', False),  # arguments not an object
        ('<tool_call>\n{"name": "f", "arguments": {}}', False),  # unclosed
        ('{"name": "f", "arguments": {}}\n</tool_call>', False),  # closed, never opened
        ('<tool_call><tool_call>{"name": "f", "arguments": {}}</tool_call>', False),  # nested
    ],
)
def test_tool_calls_must_be_closed_json_objects_with_name_and_arguments(text, well_formed):
    assert tool_calls_well_formed(text) is well_formed


def test_pair_filter_checks_chosen_content_but_allows_a_bad_rejected_side():
    prompt = (Message("user", "q"),)
    good = Message("assistant", "42")
    refusal = Message("assistant", "I cannot help with that.")
    pairs = [
        PreferencePair(prompt, (good,), (refusal,), source="kept"),
        PreferencePair(prompt, (refusal,), (good,), source="refusal"),
        PreferencePair(prompt, (good,), (Message("assistant", " "),), source="empty"),
        PreferencePair((*prompt, good), (good,), (good,), source="order"),
    ]
    summary = FilterSummary()
    assert [p.source for p in filter_pairs(pairs, summary)] == ["kept"]
    assert summary.dropped("records") == {"refusal": 1, "empty_turn": 1, "bad_turn_order": 1}


# --- token filters and the summary ----------------------------------------------------------------------


def _sample(length: int, trained_at: tuple[int, ...]) -> Sample:
    tokens = list(range(100, 100 + length))
    return Sample(tokens, [t if i in trained_at else IGNORE_INDEX for i, t in enumerate(tokens)])


def test_token_filters_drop_too_short_too_long_and_untrained_samples(tmp_path):
    samples = [
        ("short", _sample(3, (1, 2))),
        ("at_min", _sample(4, (3,))),
        ("at_max", _sample(8, (7,))),
        ("long", _sample(9, (8,))),
        # Only the first token is labelled, and nothing predicts the first token: no trained token.
        ("first_only", _sample(6, (0,))),
        ("unlabelled", _sample(6, ())),
    ]
    summary = FilterSummary()
    kept = [source for source, _ in filter_samples(samples, summary, min_tokens=4, max_tokens=8)]
    assert kept == ["at_min", "at_max"]

    summary.add("records", "r1", None)  # a second stage, reported after the first
    summary.add("records", "r2", "refusal")
    expected = {
        "samples": {
            "seen": 6,
            "kept": 2,
            "dropped": {"no_trained_tokens": 2, "too_short": 1, "too_long": 1},
            "examples": {
                "no_trained_tokens": ["first_only", "unlabelled"],
                "too_short": ["short"],
                "too_long": ["long"],
            },
        },
        "records": {"seen": 2, "kept": 1, "dropped": {"refusal": 1}, "examples": {"refusal": ["r2"]}},
    }
    written = summary.write(tmp_path / "run")
    assert written == tmp_path / "run" / "filter_summary.json"
    assert json.loads(written.read_text()) == expected

    table = summary.format().splitlines()
    assert table[0].split() == ["stage", "seen", "kept", "dropped", "reason", "examples"]
    assert table[1].split() == ["samples", "6", "2", "4"]
    assert table[2].split() == ["2", "no_trained_tokens", "first_only,", "unlabelled"]
    assert table[5].split() == ["records", "2", "1", "1"]


def test_token_limits_of_zero_are_off():
    summary = FilterSummary()
    samples = [("one", _sample(2, (1,))), ("big", _sample(5000, (4999,)))]
    assert [s for s, _ in filter_samples(samples, summary)] == ["one", "big"]


# --- mixture --------------------------------------------------------------------------------------------


def _synthetic(seed: int) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    categories = ["big"] * 600 + ["small"] * 40 + ["mid"] * 200 + ["off"] * 50
    return categories, [rng.randint(5, 60) for _ in categories]


def test_mixture_is_deterministic_given_the_seed():
    categories, lengths = _synthetic(1)
    weights = {"big": 0.5, "small": 0.3, "mid": 0.2, "off": 0.0}
    first = mix(categories, lengths, weights, seed=7).indices
    assert mix(categories, lengths, weights, seed=7).indices == first
    assert mix(categories, lengths, weights, seed=8).indices != first


def test_mixture_hits_target_token_shares_by_subsampling_and_repeating():
    categories, lengths = _synthetic(2)
    weights = {"big": 5.0, "small": 3.0, "mid": 2.0, "off": 0.0}  # normalised: 0.5, 0.3, 0.2, 0
    indices = mix(categories, lengths, weights, seed=0).indices

    tokens = Counter()
    for i in indices:
        tokens[categories[i]] += lengths[i]
    total = sum(tokens.values())
    weighted_total = sum(n for c, n in zip(categories, lengths) if c != "off")
    assert total == pytest.approx(weighted_total, abs=3 * 60)  # the data's size is kept, to within a sample
    for category, share in (("big", 0.5), ("small", 0.3), ("mid", 0.2)):
        # Off by at most half a sample: a sample is taken while it brings the category closer to its target.
        assert abs(tokens[category] - share * weighted_total) <= max(lengths) / 2
        assert tokens[category] / total == pytest.approx(share, abs=0.01)
    assert tokens["off"] == 0

    copies = Counter(indices)
    small = [i for i, c in enumerate(categories) if c == "small"]
    # "small" holds about 5% of the tokens but gets 30%: each sample is repeated k or k + 1 times.
    counts = {copies[i] for i in small}
    assert max(counts) - min(counts) <= 1 and min(counts) >= 4
    # "big" holds about 70% and gets 50%: subsampled, no sample twice.
    assert max(copies[i] for i, c in enumerate(categories) if c == "big") == 1


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (
            {"big": 1.0, "small": 1.0, "mid": 1.0},
            "categories 'off' (50 samples) are in the data but not in the mixture",
        ),
        (
            {"big": 1.0, "small": 1.0, "mid": 1.0, "off": 0, "code": 0.5},
            "category 'code', which has no tokens",
        ),
        ({"big": 1.0, "small": -1.0, "mid": 1.0, "off": 0}, "category 'small' is -1.0"),
        ({"big": 0, "small": 0, "mid": 0, "off": 0}, "weights sum to 0"),
    ],
)
def test_mixture_rejects_weights_that_do_not_match_the_data(weights, message):
    categories, lengths = _synthetic(3)
    with pytest.raises(ValueError, match=re.escape(message)):
        mix(categories, lengths, weights, seed=0)
