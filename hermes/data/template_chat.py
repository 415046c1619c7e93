"""Training in a checkpoint's own chat format: conversations rendered by its Jinja chat template (for
example Llama 3.1 Instruct's), with the loss on what the assistant writes.

A template has no notion of "the assistant's part" (only templates with `{% generation %}` markers do), so
the trained spans are found by rendering turn by turn, as a server renders a growing conversation:
for an assistant message k, the text of messages[:k] with the generation prompt must be a prefix of the
text of messages[:k+1]; what follows it, up to and including the template's end-of-turn token, is trained
(the assistant's content and, for Llama 3.1, `<|eot_id|>`). The end-of-turn token is the first special
token the template writes after an assistant's content (found once, on a probe conversation). A template
whose output for a shorter conversation is not a prefix of its output for a longer one cannot be trained
this way: that is an error naming the turn.

Each trained span and each text between spans is encoded on its own, with every special token of the
tokenizer allowed (the template writes them as text), so the trained tokens are exactly the assistant's.
Messages reach the template as `{"role", "content"}`; tool calls are content text (hermes.data.records).

The template runs in the environment transformers' `apply_chat_template` uses: a sandbox with
trim_blocks and lstrip_blocks, the loopcontrols extension, `tojson` without ASCII escaping,
`raise_exception` and `strftime_now`.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hermes.data.chat import preference_samples
from hermes.data.conversation import Conversation, Message, PreferencePair
from hermes.data.records import parse_messages, parse_tools
from hermes.data.sample import IGNORE_INDEX, Sample
from hermes.data.tokenizer import Tokenizer

_PROBE_ANSWER = "Paris is the capital of France."


class ChatTemplateError(ValueError):
    """A chat template that cannot be used for training, or that failed on a conversation."""


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
):
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda pattern: datetime.now().strftime(pattern)
    return environment


class TemplateChatFormat:
    """Renders conversations with a Jinja chat template; the same interface as `ChatFormat`.

    Args:
        tokenizer: the checkpoint's tokenizer.
        template: the Jinja source.
        template_source: where the template comes from, for messages.
        special_token_text: the template's variables for special tokens (`bos_token`, `eos_token`, ...);
            missing `bos_token` / `eos_token` default to the names of the tokenizer's BOS and EOS.

    Attributes:
        tokenizer, special_tokens (empty: no tags are added), stop_ids (end of turn, then EOS),
        chat_template (the source), end_of_turn (its id).

    Raises:
        ChatTemplateError: the template does not compile, fails on a probe conversation, is not
            prefix-stable on it, or writes no special token after an assistant's content.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str,
        *,
        template_source: str,
        special_token_text: Mapping[str, str] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.special_tokens: dict[str, int] = {}
        self.chat_template = template
        self.source = template_source
        names = {token_id: name for name, token_id in tokenizer.special_tokens.items()}
        self._variables = {
            "bos_token": names.get(tokenizer.bos_id, ""),
            "eos_token": names.get(tokenizer.eos_id, ""),
            **(special_token_text or {}),
        }
        try:
            self._template = _environment().from_string(template)
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"chat template {template_source} does not compile: {error}") from None
        probe = (Message("user", "What is the capital of France?"), Message("assistant", _PROBE_ANSWER))
        prompt = self._text(probe[:1], (), "probe", generation_prompt=True)
        full = self._text(probe, (), "probe")
        if not full.startswith(prompt):
            raise ChatTemplateError(
                f"chat template {template_source} is not prefix-stable: a user message with the generation "
                "prompt is not the start of the same conversation with an answer; it cannot be trained on "
                'turn by turn (use data.chat_template = "hermes")'
            )
        answer_end = full.find(_PROBE_ANSWER, len(prompt))
        after = full[answer_end + len(_PROBE_ANSWER) :] if answer_end >= 0 else ""
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
        found = min(((after.find(name), name) for name in specials if name in after), default=None)
        if answer_end < 0 or found is None:
            raise ChatTemplateError(
                f"chat template {template_source} writes no special token after an assistant's content, so "
                "the end of an assistant turn cannot be found"
            )
        self.end_of_turn_text = found[1]
        self.end_of_turn = tokenizer.special_tokens[found[1]]
        self.stop_ids = (self.end_of_turn, tokenizer.eos_id)

    # The ChatFormat interface ------------------------------------------------------------------------------

    def render(self, conversation: Conversation) -> Sample:
        """Tokens and labels of a conversation, every assistant turn trained.

        Raises:
            ChatTemplateError: the template fails, or is not prefix-stable at a turn (named).
        """
        tokens, labels = self._render(conversation.messages, conversation.tools, 0, conversation.source)
        return Sample(tokens, labels, category=conversation.category)

    def render_preference(self, pair: PreferencePair) -> tuple[Sample, Sample]:
        """The chosen and rejected samples of a DPO pair, with only the continuations trained."""
        return preference_samples(self._render, pair)

    def render_generation_prompt(
        self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] = ()
    ) -> list[int]:
        """Token ids of the conversation so far and the template's generation prompt."""
        return self._encode(self._text(messages, tools, "conversation", generation_prompt=True))

    def encode_messages(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | str | None = None,
        *,
        add_generation_prompt: bool = False,
    ) -> list[int]:
        """Token ids of OpenAI-form messages rendered by the template."""
        parsed = parse_messages(list(messages), "messages") if messages else ()
        text = self._text(
            parsed, parse_tools(tools, "tools"), "messages", generation_prompt=add_generation_prompt
        )
        return self._encode(text)

    # Rendering -------------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, allowed_special="all")

    def _text(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]],
        source: str,
        *,
        generation_prompt: bool = False,
    ) -> str:
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                tools=list(tools) or None,
                add_generation_prompt=generation_prompt,
                **self._variables,
            )
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"{source}: chat template {self.source} failed: {error}") from None

    def _render(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]],
        train_from: int,
        source: str,
    ) -> tuple[list[int], list[int]]:
        """Text segments, alternately untrained and trained, found turn by turn, then encoded each alone."""
        segments: list[tuple[str, bool]] = []
        done = ""  # the text of the messages rendered so far
        for index, message in enumerate(messages):
            trained = message.role == "assistant" and index >= train_from
            prompt = self._text(messages[:index], tools, source, generation_prompt=True) if trained else done
            text = self._text(messages[: index + 1], tools, source)
            if not (prompt.startswith(done) and text.startswith(prompt)):
                raise ChatTemplateError(
                    f"{source}: chat template {self.source} is not prefix-stable at message {index} "
                    f"({message.role}): the text of the messages before it is not the start of the text "
                    'with it, so its tokens cannot be told apart; use data.chat_template = "hermes"'
                )
            if trained:
                end = text.find(self.end_of_turn_text, len(prompt))
                if end < 0:
                    raise ChatTemplateError(
                        f"{source}: chat template {self.source} wrote no {self.end_of_turn_text} after "
                        f"assistant message {index}"
                    )
                end += len(self.end_of_turn_text)
                segments += [(prompt[len(done) :], False), (text[len(prompt) : end], True)]
                done = text[:end]
            else:
                segments.append((text[len(done) :], False))
                done = text
            if text != done:
                segments.append((text[len(done) :], False))
                done = text
        tokens: list[int] = []
        labels: list[int] = []
        for trained, group in itertools.groupby(segments, key=lambda segment: segment[1]):
            ids = self._encode("".join(text for text, _ in group))
            tokens += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        return tokens, labels
