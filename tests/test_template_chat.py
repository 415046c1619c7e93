"""Training in a checkpoint's own chat template (data.chat_template = "checkpoint" or a Jinja file)."""

import json

import pytest
from jinja2 import Environment

from hermes.data.chat_files import read_chat_format, save_chat_format
from hermes.data.conversation import Conversation, Message, PreferencePair
from hermes.data.sample import IGNORE_INDEX
from hermes.data.template_chat import ChatTemplateError, TemplateChatFormat
from hermes.data.tokenizer import Tokenizer
from tests.test_chat import trained_spans

# Written after Llama 3.1 Instruct's layout: a system header with the knowledge and today's date, then
# `<|start_header_id|>{role}<|end_header_id|>\n\n{content | trim}<|eot_id|>` per message.
LLAMA31_STYLE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

CONVERSATION = (
    Message("system", "You are a helpful assistant."),
    Message("user", "What is 6 * 7?"),
    Message("assistant", "6 * 7 = 42."),
    Message("user", "And 6 * 8?"),
    Message("assistant", "48, since 6 * 8 = 6 * 7 + 6."),
)


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def chat(llama3) -> TemplateChatFormat:
    return TemplateChatFormat(llama3, LLAMA31_STYLE, template_source="test")


def reference_text(messages, add_generation_prompt=False) -> str:
    return (
        Environment(trim_blocks=True, lstrip_blocks=True)
        .from_string(LLAMA31_STYLE)
        .render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            bos_token="<|begin_of_text|>",
            add_generation_prompt=add_generation_prompt,
        )
    )


def test_trained_tokens_are_exactly_the_assistant_contents_and_their_eot(chat, llama3):
    sample = chat.render(Conversation(CONVERSATION))
    assert llama3.decode(sample.tokens) == reference_text(CONVERSATION)
    assert [llama3.decode(span) for span in trained_spans(sample.labels)] == [
        "6 * 7 = 42.<|eot_id|>",
        "48, since 6 * 8 = 6 * 7 + 6.<|eot_id|>",
    ]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(sample.tokens, sample.labels))
    assert chat.end_of_turn == llama3.token_id("<|eot_id|>") == 128009
    assert chat.stop_ids == (128009, 128001)


def test_generation_prompt_and_preference_pairs_use_the_template(chat, llama3):
    prompt = chat.render_generation_prompt(CONVERSATION[:2])
    assert llama3.decode(prompt) == reference_text(CONVERSATION[:2], add_generation_prompt=True)
    pair = PreferencePair(CONVERSATION[:2], (Message("assistant", "42"),), (Message("assistant", "41"),))
    chosen, rejected = chat.render_preference(pair)
    assert chosen.tokens[: len(prompt)] == prompt
    assert [llama3.decode(s) for s in trained_spans(chosen.labels)] == ["42<|eot_id|>"]
    assert [llama3.decode(s) for s in trained_spans(rejected.labels)] == ["41<|eot_id|>"]


def test_a_template_that_is_not_prefix_stable_is_refused_naming_the_turn(llama3):
    # Fine on a two-message probe, but from the fourth message on the text starts differently.
    unstable = "{% if messages | length > 3 %}LONG {% endif %}" + LLAMA31_STYLE
    chat = TemplateChatFormat(llama3, unstable, template_source="unstable.jinja")
    with pytest.raises(
        ChatTemplateError,
        match=r"data.jsonl:3: chat template unstable.jinja is not prefix-stable at message 3 \(user\)",
    ):
        chat.render(Conversation(CONVERSATION, source="data.jsonl:3"))
    with pytest.raises(ChatTemplateError, match="is not prefix-stable"):
        TemplateChatFormat(llama3, "{{ messages[-1]['content'] }}", template_source="last-only.jinja")
    with pytest.raises(ChatTemplateError, match="writes no special token after an assistant's content"):
        TemplateChatFormat(
            llama3, "{% for m in messages %}{{ m['content'] }}\n{% endfor %}", template_source="plain"
        )


def test_checkpoint_and_file_templates_are_read_and_exported(llama3, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    config = {"chat_template": LLAMA31_STYLE, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))
    from_checkpoint = read_chat_format(checkpoint, chat_template="checkpoint")
    template_file = tmp_path / "llama31.jinja"
    template_file.write_text(LLAMA31_STYLE)
    from_file = read_chat_format(None, chat_template=str(template_file))
    expected = TemplateChatFormat(llama3, LLAMA31_STYLE, template_source="test").render(
        Conversation(CONVERSATION)
    )
    for chat in (from_checkpoint, from_file):
        assert isinstance(chat, TemplateChatFormat)
        assert chat.render(Conversation(CONVERSATION)) == expected
    export = tmp_path / "export"
    save_chat_format(from_checkpoint, export)
    written = json.loads((export / "tokenizer_config.json").read_text())
    assert written["chat_template"] == LLAMA31_STYLE and written["eos_token"] == "<|eot_id|>"
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == [128009, 128001]
    with pytest.raises(FileNotFoundError, match="needs the checkpoint's tokenizer_config.json"):
        read_chat_format(tmp_path / "nothing-here", chat_template="checkpoint")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        read_chat_format(None, chat_template=str(tmp_path / "missing.jinja"))
