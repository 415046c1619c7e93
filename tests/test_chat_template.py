"""The Hermes format against the official Hermes 3 templates, and the exported template and tokenizer files
against transformers' `apply_chat_template`."""

import json
from pathlib import Path

import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
)

from hermes.data.chat import ChatFormat
from hermes.data.chat_files import read_chat_format, save_chat_format
from hermes.data.records import parse_conversation
from hermes.data.tokenizer import Tokenizer
from hermes.model import Llama, LlamaConfig
from hermes.model.hf import save_pretrained
from tests.chat_conversations import DEVIATIONS, OFFICIAL

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "hermes3-chat-templates"
ALL = OFFICIAL + DEVIATIONS
IDS = [name for name, _, _ in ALL]


def transformers_environment() -> ImmutableSandboxedEnvironment:
    """Jinja as transformers' apply_chat_template sets it up (SOURCES.md beside the templates)."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = lambda value, **_: json.dumps(value, ensure_ascii=False)
    return environment


def official(messages, tools, add_generation_prompt) -> str:
    name = "tool_use" if tools else "default"
    source = (REFERENCE / f"Hermes-3-Llama-3.1-8B-{name}.jinja").read_text()
    return (
        transformers_environment()
        .from_string(source)
        .render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token="<|begin_of_text|>",
        )
    )


def open_ended(messages) -> bool:
    """Conversations that end with the user or a tool are rendered with the generation prompt."""
    return messages[-1]["role"] != "assistant"


@pytest.fixture(scope="module")
def chat() -> ChatFormat:
    return ChatFormat(Tokenizer.default())


@pytest.fixture(scope="module")
def export(chat, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("export")
    save_chat_format(chat, directory)
    return directory


@pytest.fixture(scope="module")
def hf_tokenizer(export):
    return AutoTokenizer.from_pretrained(export)


def test_there_are_at_least_twenty_conversations_of_each_kind_the_templates_express():
    assert len(OFFICIAL) >= 20
    assert any(tools for _, _, tools in OFFICIAL) and any(not tools for _, _, tools in OFFICIAL)


@pytest.mark.parametrize(("name", "messages", "tools"), OFFICIAL, ids=[n for n, _, _ in OFFICIAL])
def test_rendering_is_byte_identical_to_the_official_template(chat, name, messages, tools):
    generation = open_ended(messages)
    expected = official(messages, tools, generation)
    assert chat.render_text(messages, tools, add_generation_prompt=generation) == expected
    if not generation:
        # The training path (a JSONL record read, then rendered) trains on the same text.
        conversation = parse_conversation({"messages": messages, "tools": tools}, "test:1")
        assert chat.tokenizer.decode(chat.render(conversation).tokens) == expected


@pytest.mark.parametrize(("name", "messages", "tools"), DEVIATIONS, ids=[n for n, _, _ in DEVIATIONS])
def test_deviations_keep_what_the_official_template_loses(chat, name, messages, tools):
    text = chat.render_text(messages, tools, add_generation_prompt=open_ended(messages))
    if name == "text beside a tool call":
        assert "<|im_start|>assistant\nLet me check.\n<tool_call>\n" in text
        assert "Let me check." not in official(messages, tools, False)
    elif name == "tool calls without tools":
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
        assert "<|im_start|>tool\n<tool_response>\n3\n</tool_response>\n<|im_end|>" in text
    elif name == "call without arguments":
        assert '{"name": "ping", "arguments": {}}' in text
    else:
        assert '"description": "go(when: Any, who: Union[str,Any]) - \n\n    Args:\n' in text


@pytest.mark.parametrize(("name", "messages", "tools"), ALL, ids=IDS)
def test_exported_template_renders_what_hermes_trains_on(chat, name, messages, tools):
    generation = open_ended(messages)
    rendered = (
        transformers_environment()
        .from_string(chat.chat_template)
        .render(
            messages=messages, tools=tools, add_generation_prompt=generation, bos_token="<|begin_of_text|>"
        )
    )
    assert rendered == chat.render_text(messages, tools, add_generation_prompt=generation)


@pytest.mark.parametrize(("name", "messages", "tools"), ALL, ids=IDS)
def test_apply_chat_template_on_the_export_gives_hermes_ids(chat, hf_tokenizer, name, messages, tools):
    generation = open_ended(messages)
    theirs = hf_tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=generation, tokenize=True, return_dict=False
    )
    assert list(theirs) == chat.encode_messages(messages, tools, add_generation_prompt=generation)


def test_prefill_and_no_bos_match_transformers(chat, hf_tokenizer):
    messages = [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two,"}]
    prefill = chat.encode_messages(messages, continue_final_message=True)
    assert chat.tokenizer.decode(prefill).endswith("<|im_start|>assistant\nOne, two,")
    theirs = hf_tokenizer.apply_chat_template(
        messages, continue_final_message=True, tokenize=True, return_dict=False
    )
    assert prefill == list(theirs)
    without_bos = chat.encode_messages(messages[:1], bos=False, add_generation_prompt=True)
    assert without_bos == chat.encode_messages(messages[:1], add_generation_prompt=True)[1:]
    with pytest.raises(ValueError, match="needs an assistant message last"):
        chat.encode_messages(messages[:1], continue_final_message=True)


def test_exported_tokenizer_names_its_special_tokens(chat, hf_tokenizer, export):
    assert hf_tokenizer.bos_token == "<|begin_of_text|>"
    assert hf_tokenizer.eos_token == "<|im_end|>" and hf_tokenizer.eos_token_id == 128040
    assert hf_tokenizer.pad_token == "<|finetune_right_pad_id|>"
    for tag in ("<tool_call>", "<tools>", "<SCRATCHPAD>", "<|im_start|>"):
        assert hf_tokenizer.convert_tokens_to_ids(tag) == chat.special_tokens[tag]
    generation = json.loads((export / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [128040, 128001]
    assert generation["bos_token_id"] == 128000


class ForceAfter(LogitsProcessor):
    """Forces `token` once `steps` tokens have been generated (a random model never picks it itself)."""

    def __init__(self, prompt_length: int, steps: int, token: int) -> None:
        self.at, self.token = prompt_length + steps, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.token] = 0
        return scores


def test_transformers_generation_on_the_export_stops_at_im_end(chat, tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig.preset("debug").replace(bos_token_id=128000, eos_token_id=128040)
    save_pretrained(Llama(config), tmp_path)
    save_chat_format(chat, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert 128040 in GenerationConfig.from_pretrained(tmp_path).eos_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    force = LogitsProcessorList([ForceAfter(prompt.shape[1], 3, 128040)])
    output = model.generate(prompt, max_new_tokens=12, do_sample=False, logits_processor=force)
    new = output[0, prompt.shape[1] :].tolist()
    assert new[-1] == 128040 and len(new) == 4  # ended right at <|im_end|>, well before max_new_tokens


def test_a_hermes_export_is_read_back_with_its_default_system_prompt(tmp_path):
    custom = ChatFormat(Tokenizer.default(), default_system_prompt='Be "brief".\nAlways.')
    save_chat_format(custom, tmp_path)
    again = read_chat_format(tmp_path)
    assert isinstance(again, ChatFormat)
    assert again.default_system_prompt == 'Be "brief".\nAlways.'
    assert again.special_tokens == custom.special_tokens
    messages = [{"role": "user", "content": "Hi"}]
    assert again.encode_messages(messages) == custom.encode_messages(messages)
