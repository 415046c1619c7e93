"""The Jinja chat template hermes exports beside every model (tokenizer_config.json `chat_template`).

It renders, through transformers' `apply_chat_template` (and so vLLM, lm-evaluation-harness and other
servers that apply a checkpoint's template), exactly the text hermes.data.chat trains on: the official
Hermes 3 `default` and `tool_use` templates in one, with hermes' departures from them (listed in
hermes.data.chat) and the run's default system prompt. Messages are OpenAI-form: `role`, `content`, an
assistant's `tool_calls`, a tool result's content; `tools` as JSON schemas.

The template is written for transformers' Jinja environment (trim_blocks, lstrip_blocks, `tojson` without
ASCII escaping); every tag trims the whitespace around it, so the layout below is not part of the output.
"""

from __future__ import annotations

import json
import re

from hermes.data.tool_prompt import BASIC_TYPES, TOOL_PROMPT_HEAD, TOOL_PROMPT_TAIL

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
"""The system turn the official Hermes 3 template gives a conversation that has none (and no tools)."""


def _literal(text: str) -> str:
    """A Jinja string literal holding `text` (a JSON string is one: Jinja reads its escapes)."""
    return json.dumps(text, ensure_ascii=False)


_TYPE_MACRO = """
{%- macro hermes_type(schema) -%}
  {%- if schema is mapping and schema.type is defined -%}
    {%- set kind = schema.type -%}
    {%- if kind is string -%}
      {%- if kind in BASIC -%}{{- BASIC[kind] -}}
      {%- elif kind == "array" -%}{{- "list[Union[]]" -}}
      {%- elif kind == "object" and schema.additionalProperties is defined -%}
        {{- "dict[str, " ~ hermes_type(schema.additionalProperties) ~ "]" -}}
      {%- elif kind == "object" -%}{{- "dict" -}}
      {%- else -%}{{- "Any" -}}
      {%- endif -%}
    {%- elif kind is mapping or kind is sequence -%}
      {{- "Union[" -}}
      {%- for member in kind -%}
        {{- hermes_type({"type": member}) -}}{%- if not loop.last -%}{{- "," -}}{%- endif -%}
      {%- endfor -%}
      {{- "]" -}}
    {%- else -%}{{- "Any" -}}
    {%- endif -%}
  {%- else -%}{{- "Union[]" -}}
  {%- endif -%}
{%- endmacro -%}
"""

_TOOL_MACRO = """
{%- macro hermes_tool(tool) -%}
  {%- if tool.function is defined -%}{%- set tool = tool.function -%}{%- endif -%}
  {%- if tool.parameters is mapping and tool.parameters.properties is defined -%}
    {%- set properties = tool.parameters.properties -%}
  {%- else -%}
    {%- set properties = {} -%}
  {%- endif -%}
  {{- '{"type": "function", "function": {"name": "' ~ tool.name ~ '", "description": "' ~ tool.name ~ '(' -}}
  {%- for arg, schema in properties|items -%}
    {{- arg ~ ": " ~ hermes_type(schema) -}}{%- if not loop.last -%}{{- ", " -}}{%- endif -%}
  {%- endfor -%}
  {{- ")" -}}
  {%- if tool.return is defined -%}{{- " -> " ~ hermes_type(tool.return) -}}{%- endif -%}
  {{- " - " ~ (tool.description if tool.description is defined else "") ~ "\\n\\n" -}}
  {%- for arg, schema in properties|items -%}
    {%- if loop.first -%}{{- "    Args:\\n" -}}{%- endif -%}
    {%- set described = schema.description if schema is mapping and schema.description is defined else "" -%}
    {{- "        " ~ arg ~ "(" ~ hermes_type(schema) ~ "): " ~ (described|string|trim) -}}
  {%- endfor -%}
  {%- if tool.return is mapping and tool.return.description is defined -%}
    {{- "\\n    Returns:\\n        " ~ tool.return.description -}}
  {%- endif -%}
  {{- '", "parameters": ' ~ (tool.parameters|tojson if properties else "{}") ~ "}" -}}
{%- endmacro -%}
"""

_MESSAGES = """
{{- bos_token -}}
{%- if tools -%}
  {{- "<|im_start|>system\\n" ~ TOOL_HEAD -}}
  {%- for tool in tools -%}
    {{- hermes_tool(tool) -}}{%- if not loop.last -%}{{- "\\n" -}}{%- endif -%}
  {%- endfor -%}
  {{- TOOL_TAIL ~ "<|im_end|>\\n" -}}
{%- elif DEFAULT_SYSTEM and messages and messages[0].role != "system" -%}
  {{- "<|im_start|>system\\n" ~ DEFAULT_SYSTEM ~ "<|im_end|>\\n" -}}
{%- endif -%}
{%- for message in messages -%}
  {%- if message.role == "tool" -%}
    {%- if loop.previtem and loop.previtem.role != "tool" -%}{{- "<|im_start|>tool\\n" -}}{%- endif -%}
    {{- "<tool_response>\\n" ~ message.content -}}
    {%- if loop.last -%}
      {{- "\\n</tool_response><|im_end|>" -}}
    {%- else -%}
      {{- "\\n</tool_response>\\n" -}}
      {%- if loop.nextitem.role != "tool" -%}{{- "<|im_end|>" -}}{%- endif -%}
    {%- endif -%}
  {%- elif message.role == "assistant" -%}
    {{- "<|im_start|>assistant" -}}
    {%- if message.content or not message.tool_calls -%}{{- "\\n" ~ (message.content or "") -}}{%- endif -%}
    {%- for call in message.tool_calls or [] -%}
      {%- if call.function is defined -%}{%- set call = call.function -%}{%- endif -%}
      {{- '\\n<tool_call>\\n{"name": "' ~ call.name ~ '", "arguments": ' -}}
      {%- if call.arguments is not defined -%}{{- "{}" -}}
      {%- elif call.arguments is string -%}{{- call.arguments -}}
      {%- else -%}{{- call.arguments|tojson -}}
      {%- endif -%}
      {{- "}\\n</tool_call>" -}}
    {%- endfor -%}
    {{- "<|im_end|>\\n" -}}
  {%- else -%}
    {{- "<|im_start|>" ~ message.role ~ "\\n" ~ message.content ~ "<|im_end|>\\n" -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "<|im_start|>assistant\\n" -}}{%- endif -%}
"""


def hermes_chat_template(default_system_prompt: str) -> str:
    """The exported template, with `default_system_prompt` (empty: none) as the system turn of a
    conversation that has no system message first and no tools."""
    constants = {
        "BASIC": json.dumps(BASIC_TYPES),
        "TOOL_HEAD": _literal(TOOL_PROMPT_HEAD),
        "TOOL_TAIL": _literal(TOOL_PROMPT_TAIL),
        "DEFAULT_SYSTEM": _literal(default_system_prompt),
    }
    sets = "".join(f"{{%- set {name} = {value} -%}}\n" for name, value in constants.items())
    return (sets + _TYPE_MACRO + _TOOL_MACRO + _MESSAGES).strip() + "\n"


_DEFAULT_SYSTEM_SET = re.compile(r'\{%- set DEFAULT_SYSTEM = (".*") -%\}')


def hermes_template_system_prompt(template: str) -> str | None:
    """The default system prompt of a template `hermes_chat_template` wrote, or None for any other
    template (so a directory hermes exported is rendered again exactly as it was trained)."""
    match = _DEFAULT_SYSTEM_SET.search(template)
    if match is None:
        return None
    try:
        prompt = json.loads(match.group(1))
    except json.JSONDecodeError:
        return None
    return prompt if isinstance(prompt, str) and hermes_chat_template(prompt) == template else None
