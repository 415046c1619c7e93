"""A Hugging Face tokenizer directory as llama.cpp's GGUF vocabulary, and that vocabulary written as GGUF
metadata.

Read: `tokenizer.json` (byte-level BPE with Llama 3's pre-tokenizer, as hermes exports it) and
`tokenizer_config.json` (bos / eos / pad tokens, chat template). Plain JSON: nothing of hermes.data is
needed, so this stays in the model package beside the GGUF weights.

Written (llama.cpp's keys, as its convert_hf_to_gguf writes a Llama 3 vocabulary): `tokenizer.ggml.model`
"gpt2", `tokenizer.ggml.pre` "llama-bpe", the tokens in their byte-level spelling, one token type each
(normal; control for special added tokens; user-defined for other added tokens; unused for the padding
rows of an embedding larger than the tokenizer), the merges as "left right" strings, the bos / eos /
padding ids, whether BOS is added, and `tokenizer.chat_template`. The eos id is the tokenizer_config's
`eos_token`: the end of an assistant turn (`<|im_end|>`) in hermes' exports, so llama.cpp stops there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from hermes.model.hf import read_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Llama 3's pre-tokenizer split pattern, which llama.cpp calls "llama-bpe"."""

_PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe"}
"""Split pattern -> llama.cpp's name for the pre-tokenizer; llama.cpp applies its own regex by name."""


@dataclass(frozen=True)
class GGUFVocabulary:
    """A tokenizer the way a GGUF file stores it."""

    tokens: list[str]
    """Token text by id, in the byte-level alphabet; one per embedding row."""
    token_types: list[int]
    """`gguf.TokenType` of each token."""
    merges: list[str]
    """BPE merges, best first, each "left right"."""
    pre: str
    """llama.cpp's name of the pre-tokenizer ("llama-bpe")."""
    bos_id: int
    eos_id: int
    """The id that ends generation: the end of an assistant turn in a chat export."""
    pad_id: int | None
    add_bos: bool
    """Whether encoding prepends BOS (the tokenizer.json post-processor, or tokenizer_config's add_bos_token)."""
    chat_template: str | list[dict[str, str]] | None


def read_vocabulary(directory: str | os.PathLike, vocab_size: int) -> GGUFVocabulary:
    """The GGUF vocabulary of a Hugging Face tokenizer directory, padded to the model's embedding rows.

    Args:
        directory: the folder with tokenizer.json and tokenizer_config.json.
        vocab_size: the model's vocabulary (embedding rows); ids the tokenizer lacks become unused
            "[PADn]" tokens, as llama.cpp writes them.

    Returns:
        The vocabulary.

    Raises:
        FileNotFoundError: either file is missing.
        ValueError: naming the file and key that does not fit: a tokenizer that is not byte-level BPE or
            whose pre-tokenizer llama.cpp has no name for, an id past the model's vocabulary, or a
            bos / eos / pad token that is not in the vocabulary.
    """
    directory = Path(directory)
    tokenizer_path = directory / TOKENIZER_FILE
    config_path = directory / TOKENIZER_CONFIG_FILE
    tokenizer = read_json(tokenizer_path, "a GGUF export writes the tokenizer from it")
    config = read_json(config_path, "a GGUF export writes the tokenizer from it")
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(
            f"{tokenizer_path}: model.type is {model.get('type')!r}; a GGUF vocabulary is written from a "
            "byte-level BPE tokenizer ('BPE') only"
        )
    ids: dict[str, int] = dict(model.get("vocab") or {})
    added = {entry["id"]: entry for entry in tokenizer.get("added_tokens") or []}
    ids |= {entry["content"]: token_id for token_id, entry in added.items()}
    largest = max(ids.values())
    if largest >= vocab_size:
        raise ValueError(
            f"{tokenizer_path} has token id {largest} but the model's vocabulary is {vocab_size}: they do "
            "not belong together"
        )
    text = {token_id: token for token, token_id in ids.items()}
    tokens, types = [], []
    for token_id in range(vocab_size):
        tokens.append(text.get(token_id, f"[PAD{token_id}]"))
        types.append(_token_type(token_id, text, added))
    bos_id = _special_id(config, "bos_token", ids, config_path)
    return GGUFVocabulary(
        tokens=tokens,
        token_types=types,
        merges=[m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []],
        pre=_pre_tokenizer(tokenizer.get("pre_tokenizer"), tokenizer_path),
        bos_id=bos_id,
        eos_id=_special_id(config, "eos_token", ids, config_path),
        pad_id=_special_id(config, "pad_token", ids, config_path, required=False),
        add_bos=bool(config.get("add_bos_token", _adds_bos(tokenizer, bos_id))),
        chat_template=config.get("chat_template"),
    )


def add_vocabulary(writer: gguf.GGUFWriter, vocabulary: GGUFVocabulary) -> None:
    """Write `vocabulary` as the `tokenizer.*` metadata of a GGUF file."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.token_types)
    writer.add_token_merges(vocabulary.merges)
    writer.add_bos_token_id(vocabulary.bos_id)
    writer.add_eos_token_id(vocabulary.eos_id)
    if vocabulary.pad_id is not None:
        writer.add_pad_token_id(vocabulary.pad_id)
    writer.add_add_bos_token(vocabulary.add_bos)
    writer.add_add_eos_token(False)
    if vocabulary.chat_template:
        writer.add_chat_template(vocabulary.chat_template)


def _token_type(token_id: int, text: Mapping[int, str], added: Mapping[int, dict[str, Any]]) -> int:
    if token_id not in text:
        return gguf.TokenType.UNUSED
    if token_id in added:
        return gguf.TokenType.CONTROL if added[token_id].get("special") else gguf.TokenType.USER_DEFINED
    return gguf.TokenType.NORMAL


def _pre_tokenizer(pre_tokenizer: Any, path: Path) -> str:
    """llama.cpp's name of a tokenizer.json `pre_tokenizer`: a regex Split followed by ByteLevel."""
    steps = pre_tokenizer.get("pretokenizers", []) if isinstance(pre_tokenizer, dict) else []
    splits = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = any(s.get("type") == "ByteLevel" for s in steps)
    if byte_level and len(splits) == 1 and splits[0] in _PRE_TOKENIZERS:
        return _PRE_TOKENIZERS[splits[0]]
    raise ValueError(
        f"{path}: pre_tokenizer is not Llama 3's (a Split on its pattern, then ByteLevel), the one "
        "pre-tokenizer hermes names for llama.cpp ('llama-bpe')"
    )


def _special_id(
    config: Mapping[str, Any], key: str, ids: Mapping[str, int], path: Path, *, required: bool = True
) -> int | None:
    """The id of tokenizer_config's `key` token (a string, or an AddedToken dict with "content")."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value is None:
        if required:
            raise ValueError(f"{path} has no {key}; a GGUF vocabulary needs it")
        return None
    if value not in ids:
        raise ValueError(f"{path}: {key} {value!r} is not a token of {TOKENIZER_FILE}")
    return ids[value]


def _adds_bos(tokenizer: Mapping[str, Any], bos_id: int) -> bool:
    """Whether tokenizer.json's post-processor puts BOS first (a TemplateProcessing that starts with it)."""
    processor = tokenizer.get("post_processor") or {}
    steps = processor.get("processors", [processor]) if processor.get("type") == "Sequence" else [processor]
    for step in steps:
        if step.get("type") != "TemplateProcessing" or not step.get("single"):
            continue
        first = step["single"][0].get("SpecialToken")
        special = (step.get("special_tokens") or {}).get(first["id"], {}) if first else {}
        if bos_id in special.get("ids", []):
            return True
    return False
