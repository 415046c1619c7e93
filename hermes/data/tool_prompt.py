"""The Hermes 3 function-calling system prompt, laid out byte for byte as the official `tool_use` chat
template of Hermes-3-Llama-3.1-8B lays it out.

Each tool becomes one line of `<tools> ... </tools>`: `{"type": "function", "function": {"name": ...,
"description": "<name>(<arg>: <type>, ...) - <description>\\n\\n    Args:\\n        <arg>(<type>): <text>...",
"parameters": <the JSON schema>}}`. The template's quirks are kept, because the served model sees them:
- the description is not JSON-escaped, and the `Args:` entries follow each other with no separator;
- types are named as the template's `json_to_python_type` names them: `string` -> str, `number` -> float,
  `integer` -> int, `boolean` -> bool, `object` -> dict (or `dict[str, T]` with `additionalProperties`), a
  list of types -> `Union[A,B]`, any array -> `list[Union[]]` (the template reads the schema's items
  wrongly), a schema without `type` -> `Union[]`, a `null` or numeric `type` -> `Any`;
- a schema with no properties is written `{}`, whatever else it holds;
- the pydantic sentence ends in `}}` (one brace too many).

Where the official template cannot render a tool at all, hermes renders it and the exported template
(hermes.data.chat_template) renders it the same way:
- a `type` string outside the table above (`"null"`, `"any"`): the official macro recurses over its
  characters until it fails; hermes writes `Any`;
- a tool without `description`: the official template fails; hermes writes an empty description.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

TOOL_PROMPT_HEAD = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
    "about what values to plug into functions. Here are the available tools: <tools> "
)
TOOL_PROMPT_TAIL = (
    " </tools>Use the following pydantic model json schema for each tool call you will make: "
    '{"properties": {"name": {"title": "Name", "type": "string"}, "arguments": {"title": "Arguments", '
    '"type": "object"}}, "required": ["name", "arguments"], "title": "FunctionCall", "type": "object"}}\n'
    "For each function call return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags as follows:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <args-dict>}\n</tool_call>'
)
"""The fixed text around the tool entries; the prompt is HEAD + entries joined by newlines + TAIL."""

BASIC_TYPES = {"string": "str", "number": "float", "integer": "int", "boolean": "bool"}
_ABSENT = object()


def tojson(value: Any) -> str:
    """JSON as the chat templates' `tojson` writes it (transformers': no ASCII escaping, keys in order)."""
    return json.dumps(value, ensure_ascii=False)


def python_type(schema: Any) -> str:
    """The Python-style type name the Hermes template gives a JSON schema (see the module docstring)."""
    kind = schema.get("type", _ABSENT) if isinstance(schema, Mapping) else _ABSENT
    if isinstance(kind, str):
        if kind in BASIC_TYPES:
            return BASIC_TYPES[kind]
        if kind == "array":
            return "list[Union[]]"
        if kind == "object":
            if "additionalProperties" in schema:
                return f"dict[str, {python_type(schema['additionalProperties'])}]"
            return "dict"
        return "Any"
    if kind is _ABSENT:
        return "Union[]"
    if isinstance(kind, list | Mapping):
        return "Union[" + ",".join(python_type({"type": member}) for member in kind) + "]"
    return "Any"


def tool_entry(tool: Mapping[str, Any]) -> str:
    """One tool's line inside `<tools>`; `tool` is bare (`{"name", ...}`) or OpenAI's `{"function": {...}}`."""
    if "function" in tool:
        tool = tool["function"]
    name = tool["name"]
    parameters = tool.get("parameters")
    properties = parameters.get("properties", {}) if isinstance(parameters, Mapping) else {}
    arguments = ", ".join(f"{arg}: {python_type(schema)}" for arg, schema in properties.items())
    text = f'{{"type": "function", "function": {{"name": "{name}", "description": "{name}({arguments})'
    returns = tool.get("return", _ABSENT)
    if returns is not _ABSENT:
        text += " -> " + python_type(returns)
    text += f" - {tool.get('description', '')}\n\n"
    for index, (arg, schema) in enumerate(properties.items()):
        if index == 0:
            text += "    Args:\n"
        described = schema.get("description", "") if isinstance(schema, Mapping) else ""
        text += f"        {arg}({python_type(schema)}): {str(described).strip()}"
    if isinstance(returns, Mapping) and "description" in returns:
        text += f"\n    Returns:\n        {returns['description']}"
    text += '", "parameters": ' + (tojson(parameters) if properties else "{}") + "}"
    return text


def tool_system_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system turn's text that lists `tools` (without the turn's header and end)."""
    return TOOL_PROMPT_HEAD + "\n".join(tool_entry(tool) for tool in tools) + TOOL_PROMPT_TAIL
