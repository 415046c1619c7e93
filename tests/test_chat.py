import json

import pytest

from hermes.data.chat import HERMES_SPECIAL_TOKENS, ChatFormat
from hermes.data.conversation import Conversation, Message, PreferencePair
from hermes.data.sample import IGNORE_INDEX
from hermes.data.tokenizer import Tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
FIRST_ANSWER = f"<SCRATCHPAD>The user wants the weather; call the tool.</SCRATCHPAD>\n{CALL}"
RESPONSE = '{"name": "get_weather", "content": {"temp_c": 18}}'
FINAL_ANSWER = "It is 18 °C in Paris right now."

ALL_ROLES = (
    Message("system", "You are Hermes, a helpful assistant."),
    Message("user", "What's the weather in Paris? <|begin_of_text|> <|im_end|>"),
    Message("assistant", FIRST_ANSWER),
    Message("tool", RESPONSE),
    Message("assistant", FINAL_ANSWER),
)


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def chat(llama3) -> ChatFormat:
    return ChatFormat(llama3)


def trained_spans(labels: list[int]) -> list[list[int]]:
    """Maximal runs of labelled tokens."""
    spans: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(label)
        previous = label
    return spans


def test_default_map_keeps_im_end_on_128040_and_off_llama_ids():
    tags = ["<|im_start|>", "<|im_end|>", "<tools>", "</tools>", "<tool_call>", "</tool_call>"]
    tags += ["<tool_response>", "</tool_response>"]
    for name in ["SCRATCHPAD", "REASONING", "INNER_MONOLOGUE", "PLAN", "EXECUTION", "REFLECTION"]:
        tags += [f"<{name}>", f"</{name}>"]
    for name in ["THINKING", "SOLUTION", "EXPLANATION", "UNIT_TEST"]:
        tags += [f"<{name}>", f"</{name}>"]
    assert sorted(HERMES_SPECIAL_TOKENS) == sorted(tags)
    assert HERMES_SPECIAL_TOKENS["<|im_end|>"] == 128040
    ids = list(HERMES_SPECIAL_TOKENS.values())
    assert len(set(ids)) == len(ids)
    assert all(128011 <= token_id <= 128255 for token_id in ids)


def test_trained_tokens_are_exactly_assistant_content_and_im_end(chat):
    sample = chat.render(Conversation(ALL_ROLES, tools=(WEATHER_TOOL,), category="tools"))
    assert len(sample.tokens) == len(sample.labels)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(sample.tokens, sample.labels))
    decoded = [chat.tokenizer.decode(span) for span in trained_spans(sample.labels)]
    assert decoded == [FIRST_ANSWER + "<|im_end|>", FINAL_ANSWER + "<|im_end|>"]
    assert sample.category == "tools"
    # The tool call and the reasoning tags are trained as their special ids.
    trained = [label for label in sample.labels if label != IGNORE_INDEX]
    for tag in ["<tool_call>", "</tool_call>", "<SCRATCHPAD>", "</SCRATCHPAD>"]:
        assert chat.special_tokens[tag] in trained
    assert chat.special_tokens["<tool_response>"] in sample.tokens
    assert chat.special_tokens["<tool_response>"] not in trained


def test_own_system_turn_follows_the_tool_list_and_no_default_is_added(chat):
    sample = chat.render(Conversation(ALL_ROLES, tools=(WEATHER_TOOL,)))
    turns = chat.tokenizer.decode(sample.tokens).split("<|im_end|>")
    assert turns[0].startswith("<|begin_of_text|><|im_start|>system\nYou are a function calling AI model.")
    assert '{"type": "function", "function": {"name": "get_weather"' in turns[0]
    assert turns[1] == "\n<|im_start|>system\nYou are Hermes, a helpful assistant."
    without_system = chat.tokenizer.decode(
        chat.render(Conversation(ALL_ROLES[1:], tools=(WEATHER_TOOL,))).tokens
    )
    assert without_system.count("<|im_start|>system") == 1
    assert "You are a helpful assistant." not in without_system


def test_default_system_prompt_is_added_only_without_a_system_turn_and_can_be_turned_off(llama3):
    plain = (Message("user", "Hi"), Message("assistant", "Hello"))
    default = ChatFormat(llama3)
    text = default.tokenizer.decode(default.render(Conversation(plain)).tokens)
    assert text.startswith("<|begin_of_text|><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    own = default.tokenizer.decode(default.render(Conversation(ALL_ROLES)).tokens)
    assert own.count("<|im_start|>system") == 1
    custom = ChatFormat(llama3, default_system_prompt="Answer briefly.")
    assert "system\nAnswer briefly.<|im_end|>" in custom.tokenizer.decode(
        custom.render(Conversation(plain)).tokens
    )
    off = ChatFormat(llama3, default_system_prompt="")
    assert off.tokenizer.decode(off.render(Conversation(plain)).tokens).startswith(
        "<|begin_of_text|><|im_start|>user\n"
    )


class OrderedSchema(dict):
    """A dict subclass, as a caller may pass."""


def test_tool_schemas_serialize_as_written_whatever_their_value_types(chat):
    # Schemas equal as Python values but of other JSON types (1, 1.0, true), a dict subclass, non-ASCII
    # text: each system turn lists its own parameters exactly as json.dumps writes them.
    def tool(default, name="f", cls=dict):
        return cls(
            name=name,
            description="d",
            parameters={"properties": {"x": {"type": "integer", "default": default}}},
        )

    variants = [tool(1), tool(1.0), tool(True), tool(1, cls=OrderedSchema), tool("°C", name="météo")]
    for schema in [*variants, *variants]:
        sample = chat.render(Conversation((Message("user", "q"), Message("assistant", "a")), tools=(schema,)))
        system_turn = chat.tokenizer.decode(sample.tokens).split("<|im_end|>")[0]
        assert f', "parameters": {json.dumps(schema["parameters"], ensure_ascii=False)}}}' in system_turn
        assert f'"name": "{schema["name"]}"' in system_turn


def test_tags_become_special_ids_but_typed_chat_and_llama_tokens_stay_text(llama3):
    chat = ChatFormat(llama3, default_system_prompt="")
    typed = "Say <|begin_of_text|> and <|im_end|> and <|eot_id|>, then "
    sample = chat.render(Conversation((Message("user", typed + "<tool_call></tool_call>"),)))
    im_start, im_end = chat.special_tokens["<|im_start|>"], chat.special_tokens["<|im_end|>"]
    tool_call, tool_call_end = chat.special_tokens["<tool_call>"], chat.special_tokens["</tool_call>"]
    newline = llama3.encode("\n")
    expected = [llama3.bos_id, im_start, *llama3.encode("user\n"), *llama3.encode(typed)]
    expected += [tool_call, tool_call_end, im_end, *newline]
    assert sample.tokens == expected
    assert sample.labels == [IGNORE_INDEX] * len(expected)


def test_generation_prompt_is_the_rendered_prefix_plus_assistant_header(chat):
    messages = ALL_ROLES[:2]
    prompt = chat.render_generation_prompt(messages)
    rendered = chat.render(Conversation(messages)).tokens
    assert prompt[: len(rendered)] == rendered
    assert chat.tokenizer.decode(prompt[len(rendered) :]) == "<|im_start|>assistant\n"
    assert chat.render_generation_prompt(messages, tools=(WEATHER_TOOL,))[-3:] == prompt[-3:]


def test_stop_ids_are_im_end_then_eos(chat):
    assert chat.stop_ids == (128040, 128001)


def test_preference_pair_trains_only_the_continuations(chat):
    prompt = (
        Message("user", "Hi"),
        Message("assistant", "Hello! How can I help?"),
        Message("user", "A joke?"),
    )
    pair = PreferencePair(
        prompt=prompt,
        chosen=(Message("assistant", "Why did the GPU cross the road?"),),
        rejected=(Message("assistant", "No."),),
        category="humor",
    )
    chosen, rejected = chat.render_preference(pair)
    prompt_tokens = chat.render_generation_prompt(prompt)
    for sample, answer in ((chosen, "Why did the GPU cross the road?"), (rejected, "No.")):
        assert sample.tokens[: len(prompt_tokens)] == prompt_tokens
        assert [chat.tokenizer.decode(s) for s in trained_spans(sample.labels)] == [answer + "<|im_end|>"]
        assert sample.category == "humor"


def test_tokenizer_config_ids_win_and_displaced_defaults_move_past_the_block(llama3, tmp_path):
    config = tmp_path / "tokenizer_config.json"
    decoder = {
        "128038": "<|im_start|>",
        "128039": "<|im_end|>",
        "128050": "<tool_call>",
        "128001": "<|end_of_text|>",
    }
    config.write_text(
        json.dumps({"added_tokens_decoder": {k: {"content": v, "special": True} for k, v in decoder.items()}})
    )
    chat = ChatFormat(llama3, tokenizer_config=config)
    expected = dict(HERMES_SPECIAL_TOKENS)
    expected.update({"<|im_start|>": 128038, "<|im_end|>": 128039, "<tool_call>": 128050})
    # </REASONING>'s default, 128050, now belongs to <tool_call>; the first free reserved id above it
    # is 128067, just past the default block 128039-128066.
    expected["</REASONING>"] = 128067
    assert chat.special_tokens == expected
    assert chat.stop_ids == (128039, 128001)
    sample = chat.render(Conversation((Message("user", "x"), Message("assistant", CALL))))
    assert sample.tokens[1] == 128038
    assert sample.labels[-2:] == [128039, IGNORE_INDEX]


def test_names_the_tokenizer_already_has_are_kept(llama3):
    tokenizer = llama3.with_special_tokens({"<|im_start|>": 128100, "<|im_end|>": 128101})
    chat = ChatFormat(tokenizer)
    assert chat.special_tokens["<|im_start|>"] == 128100
    assert chat.stop_ids[0] == 128101
    assert chat.special_tokens["<tools>"] == HERMES_SPECIAL_TOKENS["<tools>"]


def test_overrides_win_and_bad_overrides_are_refused(llama3):
    chat = ChatFormat(llama3, {"<|im_end|>": 128200})
    assert chat.stop_ids[0] == 128200
    displaced = ChatFormat(llama3, {"<|im_start|>": 128040})
    assert displaced.special_tokens["<|im_end|>"] == 128067  # first free reserved id above 128040
    with pytest.raises(ValueError, match="9906 is not a special id"):
        ChatFormat(llama3, {"<|im_end|>": 9906})
    has_im_end = llama3.with_special_tokens({"<|im_end|>": 128100})
    with pytest.raises(
        ValueError, match=r"'<\|im_start\|>' and '<\|im_end\|>' both resolve to special id 128100"
    ):
        ChatFormat(has_im_end, {"<|im_start|>": 128100})


def test_unknown_role_is_an_error_naming_the_source(chat):
    conversation = Conversation((Message("narrator", "Once upon a time"),), source="data.jsonl:7")
    with pytest.raises(ValueError, match="data.jsonl:7: role 'narrator' is not one of system, user"):
        chat.render(conversation)
