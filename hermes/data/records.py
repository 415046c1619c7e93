"""Reading training records into Conversations and PreferencePairs.

Records come from JSONL, Parquet and Arrow files and saved `datasets` directories (hermes.data.sources, which
cuts them into shards). A JSONL file holds one JSON object per line; blank lines are skipped. A Parquet or
Arrow row is the same object, one column per top-level key. Files are streamed shard by shard, never
loaded whole. A record's source, in errors and filter summaries, is "path:line" (1-based) for JSONL and
"path:row N" (0-based, as `datasets` indexes rows) for Parquet and Arrow.

Record forms:

- ShareGPT: `{"conversations": [{"from": "system" | "human" | "gpt" | "tool", "value": str}, ...]}`.
- OpenAI: `{"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]}`.
- Preference pair: `{"prompt" | "messages" | "conversations": ..., "chosen": ..., "rejected": ...}`, each side a
  string (the prompt a user turn, an answer an assistant turn), one turn, or a list of turns.

A turn is written either way, `{"from", "value"}` or `{"role", "content"}`, in either list; "human" and "gpt"
are aliases of "user" and "assistant" (ROLE_ALIASES lists every accepted role). Any record may carry
`"category"` (a string; absent = "") and `"tools"`: a list of JSON schemas, bare (`{"name", ...}`) or OpenAI's
`{"type": "function", "function": {"name", ...}}`, or that list as a JSON string (as hermes-function-calling-v1
ships it). Schemas are kept as written.

Content is kept as the model sees it, in the layout of the official Hermes 3 `tool_use` template
(hermes.data.chat): an assistant turn's OpenAI `"tool_calls"` ([{"id", "function": {"name", "arguments"}}])
become `<tool_call>\n{"name": "<name>", "arguments": <arguments>}\n</tool_call>` blocks, one per line after
its content, with arguments given as a string kept byte for byte (a dict is written as the template's
`tojson` writes it; none gives `{}`). A tool turn's content is the tool's result; a tool turn whose text is
already one or more `<tool_response>\n...\n</tool_response>` blocks (ShareGPT function-calling data) becomes
one tool result per block, so every result is wrapped once when rendered. OpenAI content given as a list of
text parts is joined.

Error policy:

- Format problems are hard errors (RecordError, naming the source, the field and the fix): a line that is not
  valid UTF-8 JSON or not an object; neither or both of the turn lists; a missing or mistyped field; an unknown
  role; content that is not a string; a tool schema without a name; a preference record read as a
  conversation. They mean the file is not what the reader takes it for, so nothing after it can be trusted.
- Content problems are not errors here: the record is read as written, and the filters of
  hermes.data.filters drop it and count it under a reason (empty turns, no assistant turn, turns out of
  order, refusals, malformed tool calls). Real datasets hold such records and one must not stop a run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from hermes.data.conversation import Conversation, Message, PreferencePair
from hermes.data.sources import ArrowShard, Shard, data_files, read_shards
from hermes.data.tool_prompt import tojson

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "tool": "tool",
}
"""Accepted role names (ShareGPT "from" or OpenAI "role") -> the role of hermes.data.conversation.ROLES."""

RECORD_FIELDS = ("conversations", "messages", "prompt", "chosen", "rejected", "tools", "category")
"""The top-level keys a record is read from (the columns loaded from Parquet and Arrow files)."""

Paths = str | os.PathLike | Iterable[str | os.PathLike]

READ_RECORDS = 1024
"""Records `iter_records` reads from a file at a time."""

_DECODER = json.JSONDecoder()
_JSON_WHITESPACE = " \t\n\r"
"""The whitespace JSON allows around a value."""


class RecordError(ValueError):
    """A record that cannot be read. The message names `source` ("path:line" or "path:row N"), the field
    and the fix."""

    def __init__(self, source: str, field: str, problem: str, fix: str) -> None:
        self.source, self.field, self.problem, self.fix = source, field, problem, fix
        where = f"{source}: field {field!r}" if field else source
        super().__init__(f"{where}: {problem}. Fix: {fix}")

    def __reduce__(self) -> tuple[type[RecordError], tuple[str, str, str, str]]:
        """Pickle by the constructor's arguments (an error raised in a worker process reaches the caller)."""
        return type(self), (self.source, self.field, self.problem, self.fix)


def iter_records(paths: Paths) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream the records of data files, in order.

    Args:
        paths: a path, or an iterable of paths: files and directories of the forms hermes.data.sources
            accepts.

    Returns:
        An iterator of (source, record), source as in the module docstring.

    Raises:
        FileNotFoundError, ValueError: a path that is missing or of no accepted form (`data_files`).
        RecordError: a JSONL line that is not valid UTF-8, not valid JSON, or not a JSON object.
    """
    files = data_files([paths] if isinstance(paths, str | os.PathLike) else paths)
    for shard in read_shards(files, READ_RECORDS, RECORD_FIELDS):
        yield from shard_records(shard)


def shard_records(shard: Shard) -> Iterator[tuple[str, dict[str, Any]]]:
    """Decode the records of one shard (hermes.data.sources): (source, record) pairs.

    Raises:
        RecordError: a JSONL line that is not valid UTF-8, not valid JSON, or not a JSON object.
    """
    if isinstance(shard, ArrowShard):
        for row, record in enumerate(shard.rows(), shard.first_row):
            yield f"{shard.path}:row {row}", record
        return
    for number, raw in enumerate(shard.lines, shard.first_line):
        source = f"{shard.path}:{number}"
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise RecordError(source, "", f"not valid UTF-8 ({error})", "save the file as UTF-8") from None
        if not text or text.isspace():
            continue
        try:
            record = _load_json_line(text)
        except json.JSONDecodeError as error:
            raise RecordError(
                source, "", f"not valid JSON ({error})", "write exactly one JSON object per line"
            ) from None
        if not isinstance(record, dict):
            raise RecordError(
                source, "", f"expected a JSON object, got {_kind(record)}", "write one JSON object per line"
            )
        yield source, record


def _load_json_line(text: str) -> Any:
    """`json.loads(text)`, without its wrappers' cost for the usual line (the value, then the newline)."""
    try:
        value, end = _DECODER.raw_decode(text)
    except json.JSONDecodeError:
        return json.loads(text)  # leading whitespace, or the error json.loads raises
    if text[end:].strip(_JSON_WHITESPACE):
        return json.loads(text)  # raises json.loads' error on the extra data
    return value


def read_conversations(paths: Paths) -> Iterator[Conversation]:
    """Stream the Conversations of ShareGPT / OpenAI records (see the module docstring).

    Raises:
        RecordError: on the first format problem, naming the source, field and fix.
    """
    for source, record in iter_records(paths):
        yield parse_conversation(record, source)


def read_preference_pairs(paths: Paths) -> Iterator[PreferencePair]:
    """Stream the PreferencePairs of preference records (see the module docstring).

    Raises:
        RecordError: on the first format problem, naming the source, field and fix.
    """
    for source, record in iter_records(paths):
        yield parse_preference_pair(record, source)


def parse_conversation(record: dict[str, Any], source: str) -> Conversation:
    """One ShareGPT or OpenAI record -> Conversation.

    Raises:
        RecordError: a format problem (see the module docstring).
    """
    if "chosen" in record or "rejected" in record:
        raise RecordError(
            source,
            "chosen",
            "this is a preference pair, not a conversation",
            "read it as DPO data (preference pairs)",
        )
    key = _one_key(record, ("conversations", "messages"), source)
    return Conversation(
        messages=parse_messages(record[key], source, key),
        tools=parse_tools(record.get("tools"), source),
        category=_parse_category(record, source),
        source=source,
    )


def parse_preference_pair(record: dict[str, Any], source: str) -> PreferencePair:
    """One preference record -> PreferencePair.

    Raises:
        RecordError: a format problem (see the module docstring).
    """
    prompt_key = _one_key(record, ("prompt", "messages", "conversations"), source)
    for key in ("chosen", "rejected"):
        if key not in record:
            raise RecordError(
                source, key, "missing field", f'add "{key}": a string, one turn, or a list of turns'
            )
    return PreferencePair(
        prompt=_parse_side(record[prompt_key], source, prompt_key, "user"),
        chosen=_parse_side(record["chosen"], source, "chosen", "assistant"),
        rejected=_parse_side(record["rejected"], source, "rejected", "assistant"),
        tools=parse_tools(record.get("tools"), source),
        category=_parse_category(record, source),
        source=source,
    )


def tool_name(schema: dict[str, Any]) -> str | None:
    """The function name of a tool schema, bare or OpenAI-style; None when it has none."""
    inner = schema.get("function")
    name = inner.get("name") if isinstance(inner, dict) else schema.get("name")
    return name if isinstance(name, str) and name else None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _one_key(record: dict[str, Any], keys: tuple[str, ...], source: str) -> str:
    present = [key for key in keys if key in record]
    if len(present) != 1:
        names = " or ".join(f'"{key}"' for key in keys)
        problem = f"has both {' and '.join(present)}" if present else f"missing {names}"
        raise RecordError(
            source, present[-1] if present else keys[0], problem, f"give exactly one of {names}"
        )
    return present[0]


def _parse_category(record: dict[str, Any], source: str) -> str:
    category = record.get("category", "")
    if not isinstance(category, str):
        raise RecordError(
            source, "category", f"expected a string, got {_kind(category)}", 'write "category": "math"'
        )
    return category


def parse_tools(value: Any, source: str) -> tuple[dict[str, Any], ...]:
    """A record's `tools`: a list of schemas (bare or OpenAI-style), that list as a JSON string, or nothing.

    Raises:
        RecordError: not a list, not valid JSON, or a schema without a name.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise RecordError(
                source, "tools", f"string is not valid JSON ({error})", "give a list of schemas"
            ) from None
    if not isinstance(value, list):
        raise RecordError(
            source, "tools", f"expected a list of schemas, got {_kind(value)}", "give a list of schemas"
        )
    for i, schema in enumerate(value):
        if not isinstance(schema, dict) or tool_name(schema) is None:
            raise RecordError(
                source,
                f"tools[{i}]",
                "a tool schema must be an object with a name",
                'write {"name": ..., "parameters": {...}} or {"type": "function", "function": {"name": ...}}',
            )
    return tuple(value)


def _parse_side(value: Any, source: str, field: str, role: str) -> tuple[Message, ...]:
    if isinstance(value, str):
        return (Message(role, value),)
    if isinstance(value, dict):
        return _parse_turn(value, source, field)
    return parse_messages(value, source, field)


def parse_messages(value: Any, source: str, field: str = "messages") -> tuple[Message, ...]:
    """A list of turns (`{"role", "content"}` or `{"from", "value"}`, OpenAI tool calls and results) ->
    Messages in the layout of the module docstring.

    Args:
        value: the list.
        source: where it comes from ("path:line" or "path:row N"), for errors.
        field: its field name, for errors.

    Raises:
        RecordError: a format problem (see the module docstring).
    """
    if not isinstance(value, list):
        raise RecordError(
            source,
            field,
            f"expected a list of turns, got {_kind(value)}",
            'write [{"role": ..., "content": ...}, ...]',
        )
    messages: list[Message] = []
    for i, turn in enumerate(value):
        messages += _parse_turn(turn, source, f"{field}[{i}]")
    return tuple(messages)


def _parse_turn(turn: Any, source: str, field: str) -> tuple[Message, ...]:
    """One turn -> its Message, or one Message per `<tool_response>` block of a tool turn."""
    if isinstance(turn, Message):
        return (turn,)
    if not isinstance(turn, dict):
        raise RecordError(
            source, field, f"expected a turn object, got {_kind(turn)}", 'write {"role": ..., "content": ...}'
        )
    role_key, content_key = ("from", "value") if "from" in turn else ("role", "content")
    if role_key not in turn:
        raise RecordError(
            source, field, 'missing "role" (or "from")', 'add "role": "user" (or "from": "human")'
        )
    role = ROLE_ALIASES.get(turn[role_key]) if isinstance(turn[role_key], str) else None
    if role is None:
        raise RecordError(
            source,
            f"{field}.{role_key}",
            f"unknown role {turn[role_key]!r}",
            f"use one of {', '.join(ROLE_ALIASES)}",
        )
    calls = turn.get("tool_calls") if role == "assistant" else None
    if content_key not in turn and not calls:
        raise RecordError(
            source, f"{field}.{content_key}", "missing field", f'add "{content_key}": the turn\'s text'
        )
    content = turn.get(content_key)
    if not isinstance(content, str):
        content = _content_text(content, source, f"{field}.{content_key}", allow_null=bool(calls))
    if calls:
        if not isinstance(calls, list):
            raise RecordError(
                source,
                f"{field}.tool_calls",
                f"expected a list of calls, got {_kind(calls)}",
                'write [{"function": {"name", "arguments"}}, ...]',
            )
        blocks = [_tool_call_text(call, source, f"{field}.tool_calls[{i}]") for i, call in enumerate(calls)]
        content = "\n".join([content, *blocks] if content else blocks)
    if role == "tool":
        results = _TOOL_RESPONSES.fullmatch(content) and _TOOL_RESPONSE.findall(content)
        if results:
            return tuple(Message("tool", result) for result in results)
    return (Message(role, content),)


_TOOL_RESPONSE = re.compile(r"<tool_response>\n?(.*?)\n?</tool_response>", re.DOTALL)
_TOOL_RESPONSES = re.compile(r"\s*(?:<tool_response>.*?</tool_response>\s*)+", re.DOTALL)
"""One `<tool_response>` block (its result without the newlines the template writes around it), and a
text made of nothing but such blocks."""


def _content_text(content: Any, source: str, field: str, allow_null: bool) -> str:
    """The text of content that is not a plain string: null (allowed beside tool calls) or text parts."""
    if content is None and allow_null:
        return ""
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        return "".join(part["text"] for part in content)
    raise RecordError(
        source,
        field,
        f"content must be a string (or a list of text parts), got {_kind(content)}",
        "write the turn's text as a JSON string",
    )


def _tool_call_text(call: Any, source: str, field: str) -> str:
    """One call as the official template writes it: the name as given, string arguments byte for byte."""
    function = call.get("function", call) if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise RecordError(
            source, field, "a tool call needs a function name", 'write {"function": {"name", "arguments"}}'
        )
    arguments = function.get("arguments", {})
    # Broken JSON in a string is kept as written: the tool-call filter drops and counts it as malformed.
    arguments_text = arguments if isinstance(arguments, str) else tojson(arguments)
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments_text}}}\n</tool_call>'
