"""Reading Hugging Face tokenizer files: tokenizer.json (on tiktoken in Llama 3's layout, else on the
`tokenizers` library) and the special tokens of a tokenizer_config.json."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path

from hermes.data.tokenizer import (
    ACCEPTED_FILES,
    BOS_OFFSET,
    EOS_OFFSET,
    TiktokenTokenizer,
    Tokenizer,
    TokenizerFileError,
    check_ranks,
)


@functools.cache
def byte_level_alphabet() -> dict[int, str]:
    """str.translate table undoing GPT-2's byte -> printable character map of byte-level tokenizer.json
    files: each alphabet character becomes the latin-1 character of its byte. Latin-1 characters
    outside the alphabet become U+0100, which then fails latin-1 encoding."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [byte for byte in range(256) if byte not in printable]
    table = {code: "\u0100" for code in others}
    table.update({byte: chr(byte) for byte in printable})
    table.update({256 + n: chr(byte) for n, byte in enumerate(others)})
    return table


def read_added_tokens_decoder(path: str | Path) -> dict[str, int]:
    """Special tokens listed in a Hugging Face `tokenizer_config.json` (`added_tokens_decoder`).

    Args:
        path: the tokenizer_config.json.

    Returns:
        name -> id; empty when the file has no `added_tokens_decoder`.

    Raises:
        FileNotFoundError: no such file.
        TokenizerFileError: not JSON, or an entry that is not {"<id>": {"content": "<name>", ...}}.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer_config.json not found: {path}")
    config = read_json_object(path)
    decoder = config.get("added_tokens_decoder", {})
    try:
        return {entry["content"]: int(token_id) for token_id, entry in decoder.items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise TokenizerFileError(
            f"{path}: 'added_tokens_decoder' must map ids to objects with a 'content' name, e.g. "
            '{"128040": {"content": "<|im_end|>", "special": true}}'
        ) from None


def read_json_object(path: Path, expected: str = "") -> dict:
    """A tokenizer file's JSON object (tokenizer.json, tokenizer_config.json).

    Raises:
        TokenizerFileError: not valid JSON (with `expected`, what the file should be), or not an object.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        hint = f"; expected {expected}" if expected else ""
        raise TokenizerFileError(f"{path} is not valid JSON ({error}){hint}") from None
    if not isinstance(data, dict):
        raise TokenizerFileError(f"{path}: expected a JSON object at the top level")
    return data


def _llama3_pattern(data: Mapping[str, object]) -> str | None:
    """The Split regex of a tokenizer.json in Llama 3's layout, which tiktoken reproduces: a BPE model, no
    normalizer, and a pre-tokenizer that is one Split regex, alone or followed by a ByteLevel step without
    a regex of its own. None for any other layout."""
    model, pre_tokenizer = data.get("model"), data.get("pre_tokenizer")
    if (
        not isinstance(model, dict)
        or model.get("type", "BPE") != "BPE"
        or not isinstance(model.get("vocab"), dict)
    ):
        return None
    if data.get("normalizer") is not None or not isinstance(pre_tokenizer, dict):
        return None
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    if not isinstance(steps, list) or not steps or not isinstance(steps[0], dict):
        return None
    split, rest = steps[0], steps[1:]
    if split.get("type") != "Split" or not isinstance(split.get("pattern"), dict):
        return None
    if rest and (len(rest) > 1 or not isinstance(rest[0], dict) or rest[0].get("type") != "ByteLevel"):
        return None
    if rest and rest[0].get("use_regex", True):
        return None
    return split["pattern"].get("Regex")


def read_tokenizer_json(path: Path) -> Tokenizer:
    """A tokenizer.json: on tiktoken in Llama 3's layout, else on the `tokenizers` library."""
    data = read_json_object(path, ACCEPTED_FILES)
    pattern = _llama3_pattern(data)
    tokenizer = None if pattern is None else _read_llama3_json(path, data, pattern)
    if tokenizer is None:
        from hermes.data.hf_tokenizers_backend import TokenizersTokenizer

        tokenizer = TokenizersTokenizer.from_tokenizer_json(path, data)
    return tokenizer


def _read_llama3_json(path: Path, data: dict, pattern: str) -> TiktokenTokenizer | None:
    """A byte-level BPE tokenizer.json in Llama 3's layout as tiktoken ranks (vocab ids) plus its added
    tokens; None when its added tokens do not follow the ranks with BOS and EOS first, as Llama 3's do."""
    model = data["model"]
    try:
        names_by_id = {int(entry["id"]): entry["content"] for entry in data.get("added_tokens", [])}
    except (KeyError, TypeError, ValueError):
        raise TokenizerFileError(f"{path}: every 'added_tokens' entry needs 'id' and 'content'") from None
    config = path.with_name("tokenizer_config.json")
    if config.is_file():
        names_by_id.update({token_id: name for name, token_id in read_added_tokens_decoder(config).items()})
    added = {name: token_id for token_id, name in names_by_id.items()}
    if len(added) != len(names_by_id):
        repeated = next(name for name in added if list(names_by_id.values()).count(name) > 1)
        raise TokenizerFileError(
            f"{path}: added token {repeated!r} has more than one id (in added_tokens or the "
            "added_tokens_decoder of tokenizer_config.json beside it); give each name one id"
        )
    alphabet = byte_level_alphabet()
    vocab: dict[str, int] = model["vocab"]
    ranks: dict[bytes, int] = {}
    for token, token_id in vocab.items():
        if token_id in names_by_id:
            continue
        try:
            ranks[token.translate(alphabet).encode("latin-1")] = token_id
        except UnicodeEncodeError:
            raise TokenizerFileError(
                f"{path}: model.vocab token {token!r} has characters outside the byte-level alphabet; "
                "expected a byte-level BPE (GPT-2 / Llama 3 style)"
            ) from None
    if not {len(ranks) + BOS_OFFSET, len(ranks) + EOS_OFFSET} <= names_by_id.keys():
        return None
    check_ranks(ranks, path)
    _check_merge_order(model.get("merges", []), vocab, path)
    return TiktokenTokenizer(ranks, added, pattern=pattern, source=str(path))


def _check_merge_order(merges: list, vocab: dict[str, int], path: Path) -> None:
    """tiktoken merges by rank of the merged token, so merge i must not produce a lower id than merge i-1."""
    previous = -1
    for index, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token_id = vocab.get(left + right)
        if token_id is None:
            raise TokenizerFileError(
                f"{path}: model.merges[{index}] ({left!r} + {right!r}) yields a token missing from model.vocab"
            )
        if token_id < previous:
            raise TokenizerFileError(
                f"{path}: model.merges[{index}] ({left!r} + {right!r}) yields id {token_id}, lower than the "
                f"merge before it ({previous}); tiktoken needs vocab ids that follow the merge order "
                "(as in Llama 3's tokenizer.json)"
            )
        previous = token_id
