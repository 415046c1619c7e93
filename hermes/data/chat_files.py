"""A model directory's chat format: read from a checkpoint's tokenizer files, written beside an export.

An exported directory (SFT `hf/`, the DPO merged `hf/`, a PEFT adapter directory) gets:
- `tokenizer.json`: the tokenizer the run trained with, Hermes tags included as special tokens (for the
  tiktoken backend, converted by hermes.data.hf_tokenizer; for the `tokenizers` backend, its own, with
  the special tokens hermes added; for SentencePiece, its tokenizer.model is copied instead);
- `tokenizer_config.json`: `chat_template` (the template that renders exactly what was trained), the
  special tokens (`added_tokens_decoder`), `bos_token`, `eos_token` = the end of an assistant turn
  (`<|im_end|>` in the Hermes format), `pad_token`;
- `generation_config.json`: `eos_token_id` = [end of turn, end of text], so generation stops at the end
  of an assistant turn.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tokenizers import AddedToken

from hermes.data.chat import ChatFormat
from hermes.data.chat_template import DEFAULT_SYSTEM_PROMPT, hermes_template_system_prompt
from hermes.data.hf_tokenizer import save_tokenizer_json
from hermes.data.hf_tokenizers_backend import TokenizersTokenizer
from hermes.data.template_chat import TemplateChatFormat
from hermes.data.tokenizer import TiktokenTokenizer, Tokenizer, TokenizerFileError
from hermes.data.tokenizer_json import read_json_object

AnyChatFormat = ChatFormat | TemplateChatFormat
CHAT_TEMPLATE_CHOICES = ("hermes", "checkpoint")
"""`data.chat_template` values besides the path of a Jinja file."""


def read_chat_format(
    checkpoint: str | Path | None,
    *,
    tokenizer_path: str | Path | None = None,
    chat_template: str = "hermes",
    default_system_prompt: str | None = None,
) -> AnyChatFormat:
    """The tokenizer and chat format a run trains (or a model is served) with.

    Args:
        checkpoint: the model directory, or None for a fresh model.
        tokenizer_path: a tokenizer file or directory; empty = the checkpoint's own, else Llama 3's.
        chat_template: "hermes" (the Hermes 3 format, tag ids read from the checkpoint's
            tokenizer_config.json when it has one), "checkpoint" (the checkpoint's own `chat_template`),
            or the path of a Jinja file.
        default_system_prompt: the Hermes format's default system turn; None: the one of the template
            in the checkpoint's tokenizer_config.json when hermes exported it, else the official one.

    Raises:
        FileNotFoundError: a tokenizer, tokenizer_config.json or template file that is not there.
        TokenizerFileError: a tokenizer_config.json without a chat template.
        ChatTemplateError: a template that cannot be trained on.
    """
    directory = Path(checkpoint) if checkpoint else None
    if tokenizer_path:
        tokenizer = Tokenizer.from_file(tokenizer_path)
    elif directory and any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        tokenizer = Tokenizer.from_file(directory)
    else:
        tokenizer = Tokenizer.default()
    config_file = directory / "tokenizer_config.json" if directory else None
    has_config = config_file is not None and config_file.is_file()
    config = read_json_object(config_file) if has_config else {}
    if chat_template == "hermes":
        if default_system_prompt is None:
            exported = config.get("chat_template")
            exported = hermes_template_system_prompt(exported) if isinstance(exported, str) else None
            default_system_prompt = DEFAULT_SYSTEM_PROMPT if exported is None else exported
        return ChatFormat(
            tokenizer,
            tokenizer_config=config_file if has_config else None,
            default_system_prompt=default_system_prompt,
        )
    if chat_template == "checkpoint":
        if not has_config:
            raise FileNotFoundError(
                f'data.chat_template = "checkpoint" needs the checkpoint\'s tokenizer_config.json, and '
                f"{config_file or 'a fresh model'} has none; set model.checkpoint to a directory with one, "
                "or give data.chat_template the path of a Jinja file"
            )
        template, source = _template_of(config, config_file), f"{config_file} (chat_template)"
    else:
        path = Path(chat_template)
        if not path.is_file():
            raise FileNotFoundError(
                f'data.chat_template: {path} is not a file; give "hermes", "checkpoint" or the path of '
                "a Jinja chat template"
            )
        template, source = path.read_text(encoding="utf-8"), str(path)
    text = {
        key: value["content"] if isinstance(value, dict) else value
        for key, value in config.items()
        if key.endswith("_token") and isinstance(value, str | dict)
    }
    return TemplateChatFormat(tokenizer, template, template_source=source, special_token_text=text)


def check_vocabulary(tokenizer: Tokenizer, model_vocab: int, model_source: str) -> None:
    """The model must have an embedding row for every id the tokenizer can produce.

    Raises:
        ValueError: naming both sizes and both files.
    """
    if tokenizer.vocab_size > model_vocab:
        raise ValueError(
            f"the tokenizer from {tokenizer.source} has {tokenizer.vocab_size} ids but the model from "
            f"{model_source} has a vocabulary of {model_vocab}: they do not belong together. Give the "
            "checkpoint's own tokenizer (tokenizer.path, or tokenizer.json / tokenizer.model in the "
            "checkpoint directory)"
        )


def save_chat_format(
    chat: AnyChatFormat, directory: str | Path, *, base_tokenizer_config: str | Path | None = None
) -> list[Path]:
    """Write tokenizer.json (or the SentencePiece tokenizer.model), tokenizer_config.json and
    generation_config.json into `directory` (module docstring). The other keys of the base checkpoint's
    `base_tokenizer_config` (model_max_length, ...) are kept. Returns the files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = chat.tokenizer
    added: dict[int, AddedToken] = {}
    if isinstance(tokenizer, TiktokenTokenizer):
        written = [save_tokenizer_json(tokenizer, directory)]
    elif isinstance(tokenizer, TokenizersTokenizer):
        backend = tokenizer.backend
        backend.save(str(directory / "tokenizer.json"))
        written = [directory / "tokenizer.json"]
        added = backend.get_added_tokens_decoder()
    else:
        written = [Path(shutil.copy(tokenizer.source, directory / "tokenizer.model"))]
    names = {token_id: name for name, token_id in tokenizer.special_tokens.items()}
    base = Path(base_tokenizer_config) if base_tokenizer_config else None
    config: dict[str, Any] = read_json_object(base) if base is not None and base.is_file() else {}
    config |= {
        "added_tokens_decoder": {
            str(token_id): _added_token_entry(name, added.get(token_id))
            for token_id, name in sorted(names.items())
        },
        "bos_token": names[tokenizer.bos_id],
        "eos_token": names[chat.end_of_turn],
        "pad_token": names[tokenizer.pad_id],
        "chat_template": chat.chat_template,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    generation = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": list(dict.fromkeys(chat.stop_ids)),
        "pad_token_id": tokenizer.pad_id,
    }
    for name, content in (("tokenizer_config.json", config), ("generation_config.json", generation)):
        path = directory / name
        path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(path)
    return written


def _added_token_entry(name: str, token: AddedToken | None) -> dict[str, Any]:
    """An `added_tokens_decoder` entry with the flags of the written tokenizer.json's added token; without
    one (the converted and SentencePiece tokenizers), special with every other flag off, as those write
    their special tokens."""
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    if token is not None:
        flags = {flag: bool(getattr(token, flag)) for flag in flags}
    return {"content": name, **flags}


def _template_of(config: dict[str, Any], path: Path) -> str:
    """The chat template of a tokenizer_config.json: the string, or the `default` of a named list."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise TokenizerFileError(
            f'{path} has no chat_template (a string, or a list of {{"name", "template"}} with a '
            '"default"); use data.chat_template = "hermes" or the path of a Jinja file'
        )
    return template
