"""The example data bundled in hermes/data/examples: it parses, covers every format, holds correct answers
and valid tool calls, loses only its deliberately bad records to the filters, and is what its generator
writes."""

import json
import re
from pathlib import Path

from hermes.data.examples import make_examples
from hermes.data.filters import FilterSummary, filter_conversations, filter_pairs
from hermes.data.records import read_conversations, read_preference_pairs

EXAMPLES = Path(make_examples.__file__).parent


def _raw(name: str) -> list[dict]:
    return [json.loads(line) for line in (EXAMPLES / name).read_text().splitlines()]


def _turns(record: dict) -> list[tuple[str, str]]:
    """(role as written, text) of every turn of a raw record, whatever its form."""
    turns = []
    for key in ("conversations", "messages", "prompt", "chosen", "rejected"):
        value = record.get(key, [])
        for turn in [{"role": key, "content": value}] if isinstance(value, str) else value:
            turns.append((turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))))
    return turns


def test_shipped_examples_parse_and_cover_every_format():
    raw = _raw("sft.jsonl")
    conversations = list(read_conversations(EXAMPLES / "sft.jsonl"))
    pairs = list(read_preference_pairs(EXAMPLES / "preference.jsonl"))
    assert len(conversations) == len(raw) and 1500 <= len(raw) <= 3000
    assert 300 <= len(pairs) <= 600
    assert (EXAMPLES / "sft.jsonl").stat().st_size < 2_000_000

    assert {"conversations", "messages"} <= {key for record in raw for key in record}
    texts = [m.content for c in conversations for m in c.messages]
    assert any(re.search(r"<co: \d+>[^<]+</co>", t) for t in texts)
    assert any(t.startswith("<SCRATCHPAD>\n") and "\n</SCRATCHPAD>\n" in t for t in texts)
    assert any(m.role == "system" for c in conversations for m in c.messages)
    assert any(sum(m.role == "user" for m in c.messages) >= 2 for c in conversations)  # multi-turn
    with_tools = [c for c in conversations if c.tools]
    assert with_tools and any(m.role == "tool" for c in with_tools for m in c.messages)
    assert {c.category for c in conversations} == {
        "general_instructions",
        "math",
        "steering_alignment",
        "tool_use",
    }


def test_every_tool_call_in_the_shipped_examples_is_valid_json_naming_an_offered_tool():
    calls = 0
    for name in ("sft.jsonl", "preference.jsonl"):
        for record in _raw(name):
            offered = {tool["function"]["name"] for tool in record.get("tools", [])}
            texts = [text for _, text in _turns(record)]
            # No tag hides outside the turns, and every opened call is closed.
            assert json.dumps(record).count("<tool_call>") == sum(t.count("<tool_call>") for t in texts)
            for text in texts:
                assert text.count("<tool_call>") == text.count("</tool_call>")
                for body in re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text, re.DOTALL):
                    call = json.loads(body)
                    assert set(call) == {"name", "arguments"} and call["name"] in offered
                    calls += 1
                for body in re.findall(r"<tool_response>\n(.*?)\n</tool_response>", text, re.DOTALL):
                    assert set(json.loads(body)) == {"name", "content"}
    assert calls > 500


def test_shipped_arithmetic_answers_are_correct():
    pattern = re.compile(r"^(\d+) ([-+*]) (\d+) = (-?\d+)\.?$")
    checked = 0
    for record in _raw("sft.jsonl"):
        for _, text in _turns(record):
            match = pattern.match(text.split("\n")[-1])
            if match:
                a, op, b, result = match.groups()
                assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(result)
                checked += 1
    for record in _raw("preference.jsonl"):
        if record["category"] == "math":
            a, op, b, right = pattern.match(record["chosen"]).groups()
            wrong = pattern.match(record["rejected"]).groups()[3]
            expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert int(right) == expected != int(wrong)
            checked += 1
    assert checked > 500


def test_shipped_examples_lose_only_their_deliberately_bad_records_to_the_filters():
    raw = _raw("sft.jsonl")
    answers = [[text for role, text in _turns(r) if role in ("assistant", "gpt")] for r in raw]
    empty = sum(any(not a.strip() for a in texts) for texts in answers)
    refusals = sum(any(a.startswith(("I'm sorry", "As an AI")) for a in texts) for texts in answers)
    summary = FilterSummary()
    kept = list(filter_conversations(read_conversations(EXAMPLES / "sft.jsonl"), summary))
    assert summary.dropped("records") == {"empty_turn": empty, "refusal": refusals}
    assert len(kept) == len(raw) - empty - refusals and empty > 0 and refusals > 0
    pairs = list(filter_pairs(read_preference_pairs(EXAMPLES / "preference.jsonl"), summary, stage="pairs"))
    assert summary.dropped("pairs") == {} and len(pairs) == len(_raw("preference.jsonl"))
    assert all(p.chosen != p.rejected for p in pairs)


def test_generator_reproduces_the_shipped_files_byte_for_byte(tmp_path):
    written = make_examples.write_examples(tmp_path)
    assert [p.name for p in written] == ["sft.jsonl", "preference.jsonl"]
    for path in written:
        assert path.read_bytes() == (EXAMPLES / path.name).read_bytes()
