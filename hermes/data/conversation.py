"""Parsed records: the common shape every input format (ShareGPT, OpenAI messages, preference pairs) is
read into before rendering."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    """One turn. `role` is one of ROLES; `content` is the turn's text as the model sees it."""

    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """A training conversation.

    `tools` holds JSON schemas (dicts) of the functions offered to the model; when present, the rendered
    system prompt lists them inside `<tools> ... </tools>`. `source` is "file:line" for error messages.
    """

    messages: tuple[Message, ...]
    tools: tuple[dict[str, Any], ...] = ()
    category: str = ""
    source: str = ""


@dataclass(frozen=True)
class PreferencePair:
    """A DPO pair: a shared prompt and two competing assistant continuations."""

    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]
    tools: tuple[dict[str, Any], ...] = field(default=())
    category: str = ""
    source: str = ""
