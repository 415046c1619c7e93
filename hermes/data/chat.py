"""Hermes ChatML rendering with per-token loss masks.

A conversation renders as BOS, then per turn `<|im_start|>{role}\\n{content}<|im_end|>\\n`.

Loss mask (labels are IGNORE_INDEX elsewhere):
- trained: the content of assistant turns and their closing `<|im_end|>` (tool calls
  `<tool_call>\\n{json}\\n</tool_call>` are assistant content, so they are trained);
- not trained: BOS, every token of system, user and tool turns (tool responses included), the
  `<|im_start|>assistant\\n` header, and the `\\n` after `<|im_end|>`. That newline is written by the
  template, not generated: generation stops at `<|im_end|>` (as with axolotl's and Hugging Face's
  `{% generation %}` assistant masks, which end at the end-of-turn token).

Turns are tokenized span by span (header, content, `<|im_end|>`, newline), so labels align exactly with
tokens; a pre-token never straddles two spans. Inside content, the Hermes tags (`<tool_call>`,
`<tools>`, `<SCRATCHPAD>`, ...) become their special ids; all other text is plain text, including
`<|im_start|>`, `<|im_end|>` and Llama's own special tokens (a user typing `<|begin_of_text|>` does not
produce BOS).

Tools: when `Conversation.tools` is non-empty, the Hermes function-calling prompt listing them inside
`<tools> ... </tools>` (one JSON schema per line) becomes the system turn. A conversation that has its
own system turn first keeps it: the turn becomes its own text, a blank line, then the tool prompt.

Special-token ids. `HERMES_SPECIAL_TOKENS` below is the default map onto Llama 3.1 reserved ids:
`<|im_start|>` 128039 and `<|im_end|>` 128040 (Hermes 3 8B's eos_token_id), then `<tools>`,
`</tools>`, `<tool_call>`, `</tool_call>`, `<tool_response>`, `</tool_response>` on 128041-128046 and
the reasoning tags, each opening tag followed by its closing tag, on 128047-128066. Llama 3.1's own
ids (128000-128010) are left alone. `hermes_special_tokens` resolves the map for a tokenizer:
1. ids passed explicitly (`overrides`) win;
2. then names in a checkpoint's tokenizer_config.json `added_tokens_decoder`;
3. then names the tokenizer already has (a Hermes tokenizer.json lists them in added_tokens);
4. every other tag takes its default id if that id is still a free reserved one; the tags left over
   then take, in order, the lowest free reserved id above their default.
"""

from __future__ import annotations

import functools
import json
import marshal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hermes.data.conversation import ROLES, Conversation, Message, PreferencePair
from hermes.data.sample import IGNORE_INDEX, Sample
from hermes.data.tokenizer import RESERVED_NAME, Tokenizer, read_added_tokens_decoder

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TOOL_TAGS = ("<tools>", "</tools>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
REASONING_TAGS = tuple(
    tag
    for name in (
        "SCRATCHPAD",
        "REASONING",
        "INNER_MONOLOGUE",
        "PLAN",
        "EXECUTION",
        "REFLECTION",
        "THINKING",
        "SOLUTION",
        "EXPLANATION",
        "UNIT_TEST",
    )
    for tag in (f"<{name}>", f"</{name}>")
)


def default_special_tokens(first_id: int = 128039) -> dict[str, int]:
    """The default Hermes tag -> id map: `<|im_start|>`, `<|im_end|>`, tool tags, reasoning tags, on
    consecutive ids from `first_id` (128039 puts `<|im_end|>` on 128040, as in Hermes 3 8B)."""
    names = (IM_START, IM_END, *TOOL_TAGS, *REASONING_TAGS)
    return {name: first_id + offset for offset, name in enumerate(names)}


HERMES_SPECIAL_TOKENS: dict[str, int] = default_special_tokens()
"""Default ids of the Hermes tags on a Llama 3.1 tokenizer (see the module docstring)."""

TOOL_SYSTEM_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within "
    "<tools></tools> XML tags. You may call one or more functions to assist with the user query. "
    "Don't make assumptions about what values to plug into functions. Here are the available tools: "
    "<tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags as follows:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <args-dict>}\n</tool_call>'
)
"""Hermes function-calling system prompt; `{tools}` is replaced by one JSON schema per line."""


def hermes_special_tokens(
    tokenizer: Tokenizer,
    *,
    tokenizer_config: str | Path | None = None,
    overrides: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Resolve the id of every Hermes tag for `tokenizer` (precedence in the module docstring).

    Args:
        tokenizer: the tokenizer the ids belong to.
        tokenizer_config: a checkpoint's tokenizer_config.json, whose `added_tokens_decoder` names win
            over the tokenizer's own and the defaults.
        overrides: tag -> id, winning over everything; may name tags beyond the default set.

    Returns:
        tag -> id for every default tag and every override.

    Raises:
        ValueError: two tags resolve to one id, or no free reserved id is left for a tag.
    """
    overrides = dict(overrides or {})
    from_config = read_added_tokens_decoder(tokenizer_config) if tokenizer_config else {}
    known = tokenizer.special_tokens
    resolved: dict[str, int] = {}
    for name in {**HERMES_SPECIAL_TOKENS, **overrides}:
        for source in (overrides, from_config, known):
            if name in source:
                resolved[name] = source[name]
                break
    owners: dict[int, str] = {}
    for name, token_id in resolved.items():
        if token_id in owners:
            raise ValueError(
                f"{owners[token_id]!r} and {name!r} both resolve to special id {token_id}; pass "
                "special_tokens={...} with distinct ids"
            )
        owners[token_id] = name
    names_by_id = {token_id: name for name, token_id in known.items()}
    free = sorted(
        token_id
        for token_id, name in names_by_id.items()
        if RESERVED_NAME.fullmatch(name) and token_id not in owners
    )
    missing = [name for name in HERMES_SPECIAL_TOKENS if name not in resolved]
    for name in [name for name in missing if HERMES_SPECIAL_TOKENS[name] in free]:
        resolved[name] = HERMES_SPECIAL_TOKENS[name]
        free.remove(resolved[name])
    for name in [name for name in missing if name not in resolved]:
        token_id = next((token_id for token_id in free if token_id > HERMES_SPECIAL_TOKENS[name]), None)
        if token_id is None:
            raise ValueError(
                f"no free reserved special id for {name!r} in the tokenizer from {tokenizer.source}; "
                f"pass special_tokens={{{name!r}: <id>, ...}} with ids of its special tokens"
            )
        free.remove(token_id)
        resolved[name] = token_id
    return resolved


class ChatFormat:
    """Renders conversations to token ids and loss labels in the Hermes ChatML format.

    Args:
        tokenizer: the base tokenizer; the Hermes tags are made special tokens on top of it.
        special_tokens: tag -> id overrides (see `hermes_special_tokens`).
        tokenizer_config: a checkpoint's tokenizer_config.json to read tag ids from.
        tool_prompt: the function-calling system prompt; `{tools}` is replaced by the tool schemas.

    Attributes:
        tokenizer: the tokenizer with the Hermes tags as special tokens (use it to decode).
        special_tokens: tag -> id as resolved.
        stop_ids: ids that end an assistant turn (`<|im_end|>`, then EOS).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        special_tokens: Mapping[str, int] | None = None,
        *,
        tokenizer_config: str | Path | None = None,
        tool_prompt: str = TOOL_SYSTEM_PROMPT,
    ) -> None:
        self.special_tokens = hermes_special_tokens(
            tokenizer, tokenizer_config=tokenizer_config, overrides=special_tokens
        )
        self.tokenizer = tokenizer.with_special_tokens(self.special_tokens)
        self.tool_prompt = tool_prompt
        self._content_tags = frozenset(self.special_tokens) - {IM_START, IM_END}
        self._im_end = self.special_tokens[IM_END]
        self.stop_ids = (self._im_end, self.tokenizer.eos_id)
        im_start = self.special_tokens[IM_START]
        self._headers = {role: [im_start, *self.tokenizer.encode(f"{role}\n")] for role in ROLES}
        self._newline = self.tokenizer.encode("\n")
        # System prompts (a function-calling prompt with its tool schemas, a persona) repeat across many
        # records: each distinct one is encoded once. The function-calling prompt is also built once per
        # distinct (tool schemas, own system text), keyed by the schemas' `marshal` bytes: equal bytes give
        # back equal values of the same types, so the same JSON.
        self._encode_system = functools.lru_cache(maxsize=4096)(
            lambda text: tuple(self.tokenizer.encode(text, allowed_special=self._content_tags))
        )
        self._memo_tool_system = functools.lru_cache(maxsize=1024)(
            lambda packed_tools, own: self._tool_system_text(marshal.loads(packed_tools), own)
        )

    def render(self, conversation: Conversation) -> Sample:
        """Tokens and labels of a training conversation (assistant turns trained).

        Raises:
            ValueError: a message with a role outside ROLES.
        """
        tokens, labels = self._render(conversation.messages, conversation.tools, 0, conversation.source)
        return Sample(tokens, labels, category=conversation.category)

    def render_generation_prompt(
        self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] = ()
    ) -> list[int]:
        """Token ids of the conversation so far followed by `<|im_start|>assistant\\n`."""
        tokens, _ = self._render(messages, tools, len(messages), "")
        return tokens + self._headers["assistant"]

    def render_preference(self, pair: PreferencePair) -> tuple[Sample, Sample]:
        """The chosen and rejected samples of a DPO pair; only the assistant turns after the shared
        prompt are trained, so the prompt tokens (identical in both) carry no label."""
        samples = []
        for continuation in (pair.chosen, pair.rejected):
            messages = (*pair.prompt, *continuation)
            tokens, labels = self._render(messages, pair.tools, len(pair.prompt), pair.source)
            samples.append(Sample(tokens, labels, category=pair.category))
        return samples[0], samples[1]

    def _render(
        self,
        messages: Sequence[Message],
        tools: Sequence[dict[str, Any]],
        train_from: int,
        source: str,
    ) -> tuple[list[int], list[int]]:
        """Render messages; assistant turns at index >= train_from are trained."""
        if tools:
            messages, train_from = self._with_tool_prompt(messages, tools, train_from)
        tokens = [self.tokenizer.bos_id]
        trained_spans = []
        for index, message in enumerate(messages):
            header = self._headers.get(message.role)
            if header is None:
                raise ValueError(
                    f"{source or 'conversation'}: role {message.role!r} is not one of {', '.join(ROLES)}"
                )
            if message.role == "system":
                body = self._encode_system(message.content)
            else:
                body = self.tokenizer.encode(message.content, allowed_special=self._content_tags)
            tokens += header
            start = len(tokens)
            tokens += body
            tokens.append(self._im_end)
            if message.role == "assistant" and index >= train_from:
                trained_spans.append((start, len(tokens)))
            tokens += self._newline
        labels = [IGNORE_INDEX] * len(tokens)
        for start, end in trained_spans:
            labels[start:end] = tokens[start:end]
        return tokens, labels

    def _with_tool_prompt(
        self, messages: Sequence[Message], tools: Sequence[dict[str, Any]], train_from: int
    ) -> tuple[list[Message], int]:
        """Put the tool prompt in the system turn: after a leading system turn's text, or as a new one.
        Returns the messages and the index to train from in them."""
        own = messages[0].content if messages and messages[0].role == "system" else None
        try:
            packed = marshal.dumps(tools)
        except ValueError:  # schemas marshal cannot write: built each time
            prompt = self._tool_system_text(tools, own)
        else:
            prompt = self._memo_tool_system(packed, own)
        if own is None:
            return [Message("system", prompt), *messages], train_from + 1
        return [Message("system", prompt), *messages[1:]], train_from

    def _tool_system_text(self, tools: Sequence[dict[str, Any]], own: str | None) -> str:
        """The tool prompt listing `tools` (one JSON schema per line), after `own` system text if any."""
        schemas = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        prompt = self.tool_prompt.replace("{tools}", schemas)
        return prompt if own is None else f"{own}\n\n{prompt}"
