"""The Hermes 3 chat format: one renderer for training, DPO pairs, generation, evaluation and the exported
chat template, with per-token loss masks.

The text is the official Hermes 3 rendering, byte for byte: the two chat templates of
Hermes-3-Llama-3.1-8B's tokenizer_config.json (`default` without tools, `tool_use` with them), as
transformers renders them. `hermes.data.chat_template.hermes_chat_template` is the one template exported
beside every model; it renders exactly what this module trains on.

- BOS, then, when the conversation offers tools, the function-calling system turn
  (hermes.data.tool_prompt); otherwise, when its first message is not a system message,
  `<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n` (`default_system_prompt`; empty turns it off).
  A conversation's own system message stays where it is: with tools it is a second system turn after the
  tool list, as the template places it.
- Each system, user and assistant turn: `<|im_start|>{role}\n{content}<|im_end|>\n`. An assistant's tool
  calls are part of its content (hermes.data.records writes each as
  `<tool_call>\n{"name": "<name>", "arguments": <arguments>}\n</tool_call>`, arguments given as a string
  kept byte for byte, one call per line).
- Consecutive tool results form one turn: `<|im_start|>tool\n`, then per result
  `<tool_response>\n{content}\n</tool_response>\n` and `<|im_end|>` right after the last (no newline
  after it). The conversation's very last result has no newline before `<|im_end|>`. These are the
  template's own quirks, kept because a server applies them.
- The generation prompt is `<|im_start|>assistant\n`.

Loss mask (labels are IGNORE_INDEX elsewhere): trained are the content of assistant turns (tool calls
included) and their `<|im_end|>`; not trained are BOS, every system, user and tool token (tool results
included), the `<|im_start|>assistant\n` header and the newline after `<|im_end|>`, which the template
writes and generation never produces. When an assistant's content itself starts with a newline, the
tokenizer merges it with the header's newline into one token, which is then not trained.

Tokens: every piece of text between two special tokens is encoded whole, as a Hugging Face tokenizer
encodes the template's text, so the ids equal `apply_chat_template`'s on the exported directory. Inside
content, the Hermes tags (`<tool_call>`, `<tools>`, `<SCRATCHPAD>`, ...) become their special ids (those
that have one: see below; the others are plain text).

Where hermes departs from the official templates (each only where the official one would lose content or
fail; the exported template departs in the same way):
1. An assistant message with both text and tool calls keeps its text before the calls
   (`<|im_start|>assistant\n{text}\n<tool_call>...`); the official `tool_use` template drops the text.
2. Tool calls and results in a conversation that offers no tools are rendered as `tool_use` renders them;
   the official `default` template drops the calls and writes results without `<tool_response>`.
3. A tool call without arguments is written with `"arguments": {}`; the official template writes the
   broken `{"name": "f", }`.
4. The tool list: a schema `type` the template's type table lacks, and a tool without a description
   (the official template fails on both; see hermes.data.tool_prompt).
5. Text in a message that spells `<|im_start|>`, `<|im_end|>` or a Llama special token
   (`<|begin_of_text|>`, `<|eot_id|>`) stays plain text here, so a user cannot forge a turn; a Hugging
   Face tokenizer encodes such text as the special token. Conversations holding that text are the only
   ones whose ids differ from `apply_chat_template`'s.
A tool result's `name` and `tool_call_id` are not rendered, as in the official template (results follow
the order of the calls); a dataset that wants the name seen writes it into the content, as Hermes'
function-calling data does (`{"name": ..., "content": ...}`).

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
A tokenizer without reserved ids (another vocabulary than Llama 3's) keeps steps 1-3; every tag they leave
without an id is ordinary text there (several tokens, trained like any other text), except `<|im_start|>`
and `<|im_end|>`, which ChatML needs as single tokens: without them it is an error that names the fixes.
"""

from __future__ import annotations

import functools
import marshal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hermes.data.chat_template import DEFAULT_SYSTEM_PROMPT, hermes_chat_template
from hermes.data.conversation import ROLES, Conversation, Message, PreferencePair
from hermes.data.records import parse_messages, parse_tools
from hermes.data.sample import IGNORE_INDEX, Sample
from hermes.data.tokenizer import RESERVED_NAME, Tokenizer
from hermes.data.tokenizer_json import read_added_tokens_decoder
from hermes.data.tool_prompt import tool_system_prompt

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
        tag -> id for every default tag and every override; on a tokenizer without reserved ids, only for
        the tags it (or the config, or an override) has.

    Raises:
        ValueError: two tags resolve to one id, no free reserved id is left for a tag, or a tokenizer
            without reserved ids lacks `<|im_start|>` or `<|im_end|>`.
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
    if not any(RESERVED_NAME.fullmatch(name) for name in known):
        for name in (IM_START, IM_END):
            if name not in resolved:
                raise ValueError(
                    f"the tokenizer from {tokenizer.source} has no special token {name!r} and no reserved "
                    "special ids to put it on, and the Hermes (ChatML) format needs <|im_start|> and "
                    "<|im_end|> as single tokens. Use a tokenizer whose vocabulary has them (tokenizer.path), "
                    "map them onto special ids it has (special_tokens={...}), or train in the checkpoint's own "
                    'format: data.chat_template = "checkpoint"'
                )
        return resolved
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


RenderFn = Callable[[Sequence[Message], Sequence[Mapping[str, Any]], int, str], tuple[list[int], list[int]]]
"""A chat format's renderer: (messages, tools, index of the first trained message, source) -> (tokens,
labels)."""


def preference_samples(render: RenderFn, pair: PreferencePair) -> tuple[Sample, Sample]:
    """The chosen and rejected samples of a DPO pair, each the shared prompt and its continuation, with
    only the continuation's assistant turns trained."""
    samples = []
    for continuation in (pair.chosen, pair.rejected):
        messages = (*pair.prompt, *continuation)
        tokens, labels = render(messages, pair.tools, len(pair.prompt), pair.source)
        samples.append(Sample(tokens, labels, category=pair.category))
    return samples[0], samples[1]


class ChatFormat:
    """Renders conversations to token ids and loss labels in the Hermes 3 format (module docstring).

    Args:
        tokenizer: the base tokenizer; the Hermes tags are made special tokens on top of it (those
            `hermes_special_tokens` gives an id; the others stay plain text).
        special_tokens: tag -> id overrides (see `hermes_special_tokens`).
        tokenizer_config: a checkpoint's tokenizer_config.json to read tag ids from.
        default_system_prompt: the system turn given to a conversation that has no system turn first and
            no tools (the official template's "You are a helpful assistant."); empty gives none.

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
        default_system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    ) -> None:
        self.special_tokens = hermes_special_tokens(
            tokenizer, tokenizer_config=tokenizer_config, overrides=special_tokens
        )
        self.tokenizer = tokenizer.with_special_tokens(self.special_tokens)
        self.default_system_prompt = default_system_prompt
        self._content_tags = frozenset(self.special_tokens) - {IM_START, IM_END}
        self._im_start = self.special_tokens[IM_START]
        self._im_end = self.special_tokens[IM_END]
        self.stop_ids = (self._im_end, self.tokenizer.eos_id)
        self._newline = self.tokenizer.encode("\n")
        # Headers, and system prompts (a persona, a tool list) that repeat across many records, are encoded
        # once each. The tool prompt is built once per distinct tool list, keyed by the schemas' `marshal`
        # bytes: equal bytes give back equal values of the same types, so the same JSON.
        self._encode_repeated = functools.lru_cache(maxsize=4096)(lambda text: tuple(self._encode(text)))
        self._memo_tool_prompt = functools.lru_cache(maxsize=1024)(
            lambda packed_tools: tool_system_prompt(marshal.loads(packed_tools))
        )

    @property
    def chat_template(self) -> str:
        """The Jinja chat template that renders what this format trains on (exported with the model)."""
        return hermes_chat_template(self.default_system_prompt)

    @property
    def end_of_turn(self) -> int:
        """The id that ends an assistant turn (`<|im_end|>`): the exported eos_token."""
        return self._im_end

    # Training samples ------------------------------------------------------------------------------------

    def render(self, conversation: Conversation) -> Sample:
        """Tokens and labels of a training conversation (every assistant turn trained).

        Raises:
            ValueError: a message with a role outside ROLES.
        """
        tokens, labels = self._render(conversation.messages, conversation.tools, 0, conversation.source)
        return Sample(tokens, labels, category=conversation.category)

    def render_preference(self, pair: PreferencePair) -> tuple[Sample, Sample]:
        """The chosen and rejected samples of a DPO pair; only the assistant turns after the shared
        prompt are trained, so the prompt tokens (identical in both) carry no label."""
        return preference_samples(self._render, pair)

    # apply_chat_template ---------------------------------------------------------------------------------

    def encode_messages(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | str | None = None,
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        bos: bool = True,
    ) -> list[int]:
        """Token ids of a conversation, as transformers' `apply_chat_template` gives them for the exported
        template (and as training renders it).

        Args:
            messages: `Message`s, or OpenAI-form dicts: `role`, `content`, an assistant's `tool_calls`
                ([{"function": {"name", "arguments"}}], arguments a dict or a JSON string kept as written),
                a tool result's `tool_call_id` / `name` (not rendered, as in the official template).
            tools: the JSON schemas of the offered functions (bare, OpenAI-style, or that list as a JSON
                string).
            add_generation_prompt: end with `<|im_start|>assistant\\n`, for the model to answer.
            continue_final_message: leave the last message (an assistant's) open, without `<|im_end|>`, so
                generation continues it (prefill).
            bos: start with BOS.

        Raises:
            ValueError: an unknown role or malformed message (naming the message), both generation modes
                at once, or continuing a final message that is not an assistant's.
        """
        parsed = parse_messages(list(messages), "messages") if messages else ()
        schemas = parse_tools(tools, "tools")
        if add_generation_prompt and continue_final_message:
            raise ValueError("pass add_generation_prompt or continue_final_message, not both")
        if continue_final_message and (not parsed or parsed[-1].role != "assistant"):
            raise ValueError("continue_final_message needs an assistant message last")
        tokens, _ = self._render(
            parsed, schemas, len(parsed), "messages", bos=bos, open_last=continue_final_message
        )
        if add_generation_prompt:
            tokens += self.generation_header()
        return tokens

    def render_text(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | str | None = None,
        **options: bool,
    ) -> str:
        """The text `encode_messages` encodes (its decode, byte for byte); same arguments."""
        return self.tokenizer.decode(self.encode_messages(messages, tools, **options))

    def render_generation_prompt(
        self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] = ()
    ) -> list[int]:
        """Token ids of the conversation so far followed by `<|im_start|>assistant\\n`."""
        tokens, _ = self._render(messages, tools, len(messages), "")
        return tokens + self.generation_header()

    def generation_header(self) -> list[int]:
        """`<|im_start|>assistant\\n`: what the model answers after."""
        return [self._im_start, *self._encode_repeated("assistant\n")]

    # Rendering ---------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        """Plain text with the Hermes tags as their ids (`<|im_start|>` and Llama's tokens stay text)."""
        return self.tokenizer.encode(text, allowed_special=self._content_tags)

    def _render(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]],
        train_from: int,
        source: str,
        *,
        bos: bool = True,
        open_last: bool = False,
    ) -> tuple[list[int], list[int]]:
        """Render messages; assistant turns at index >= train_from are trained. With `open_last` the last
        message ends without `<|im_end|>`.

        Every piece of text between two special tokens is encoded whole, as a Hugging Face tokenizer
        encodes the template's text, so the ids equal `apply_chat_template`'s (consecutive tool results
        too: SentencePiece-style tokenizers mark the start of every piece they are given). The one place
        where trained and untrained text meet inside such a piece is after an assistant header:
        `assistant\\n` + content is encoded whole and cut after the header's own tokens; where a token
        straddles the two (a newline the content starts with, merged with the header's), it is not
        trained.
        """
        tokens: list[int] = [self.tokenizer.bos_id] if bos else []
        trained: list[tuple[int, int]] = []
        im_start, im_end = self._im_start, self._im_end
        if tools:
            system = self._tool_prompt(tools)
        elif self.default_system_prompt and messages and messages[0].role != "system":
            system = self.default_system_prompt
        else:
            system = None
        if system is not None:
            tokens += (im_start, *self._encode_repeated(f"system\n{system}"), im_end, *self._newline)
        last = len(messages) - 1
        for index, message in enumerate(messages):
            role, content = message.role, message.content
            if role == "assistant":
                tokens.append(im_start)
                turn = self._encode(f"assistant\n{content}")
                header = self._encode_repeated("assistant\n")
                cut = len(header)
                if tuple(turn[:cut]) != header:
                    cut = next(i for i, (a, b) in enumerate(zip(turn, header)) if a != b) + 1
                tokens += turn[:cut]
                start = len(tokens)
                tokens += turn[cut:]
                if open_last and index == last:
                    break
                tokens.append(im_end)
                if index >= train_from:
                    trained.append((start, len(tokens)))
                tokens += self._newline
            elif role == "tool":
                # Consecutive results share one turn; as in the official template, a result that is not
                # the conversation's last ends in a newline, and the turn's <|im_end|> in none.
                opens_turn = index > 0 and messages[index - 1].role != "tool"
                if opens_turn:
                    tokens.append(im_start)
                if index == 0 or opens_turn:
                    results = "tool\n" if opens_turn else ""
                end = "" if index == last else "\n"
                results += f"<tool_response>\n{content}\n</tool_response>{end}"
                if index == last or messages[index + 1].role != "tool":
                    tokens += self._encode(results)
                    tokens.append(im_end)
            elif role in ("system", "user"):
                body = self._encode_repeated(f"system\n{content}") if role == "system" else None
                tokens.append(im_start)
                tokens += body if body is not None else self._encode(f"user\n{content}")
                tokens.append(im_end)
                tokens += self._newline
            else:
                raise ValueError(
                    f"{source or 'conversation'}: role {role!r} is not one of {', '.join(ROLES)}"
                )
        labels = [IGNORE_INDEX] * len(tokens)
        for start, end in trained:
            labels[start:end] = tokens[start:end]
        return tokens, labels

    def _tool_prompt(self, tools: Sequence[Mapping[str, Any]]) -> str:
        try:
            packed = marshal.dumps(tuple(tools))
        except ValueError:  # schemas marshal cannot write: built each time
            return tool_system_prompt(tools)
        return self._memo_tool_prompt(packed)
