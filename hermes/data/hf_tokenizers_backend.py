"""The `tokenizers` backend of `hermes.data.tokenizer.Tokenizer`: every Hugging Face `tokenizer.json` that
is not in Llama 3's layout, run by Hugging Face's own implementation, so the ids are the library's. That is
byte-level BPE behind another pre-tokenizer (GPT-2's, as in SmolLM) and SentencePiece-derived files
(BPE with byte fallback or Unigram, behind Metaspace or a Prepend/Replace normalizer: Llama 2, Mistral).

Special tokens are every added token of tokenizer.json, the `added_tokens_decoder` of the
tokenizer_config.json beside it (its names win, by id), and that file's `bos_token`, `eos_token` and
`pad_token` (strings or AddedToken dicts). Each is an added token of the library's tokenizer (those that
were not are added as special tokens, as transformers adds them), so the tokenizer.json written for an
export lists them.

Key ids: BOS, EOS and pad are the config's `bos_token`, `eos_token` and `pad_token`. Missing ones come
from the post-processor (a special token it puts before the text is BOS, one after it EOS), then from the
added tokens' conventional names (`BOS_NAMES`, `EOS_NAMES`). No EOS is an error; BOS then falls back to
EOS (GPT-2's convention: `<|endoftext|>` is both), pad to EOS.

`allowed_special`: the library matches added tokens in any text, even with `add_special_tokens=False`.
Its `encode_special_tokens` flag (tokenizers 0.15.1 on; hermes requires 0.19) makes special added tokens
encode as plain text and leaves non-special ones matched. So a text is encoded whole by a copy of the tokenizer (built once per allowed set) in which
the allowed names are non-special added tokens, the others special, and the flag is set: the library
itself splits the text around the allowed tokens, with its own context rules (Metaspace's
prepend-to-the-first-piece, an added token's lstrip / rstrip) intact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from hermes.data.tokenizer import AllowedSpecial, Tokenizer, TokenizerFileError
from hermes.data.tokenizer_json import read_added_tokens_decoder, read_json_object

BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
"""Added-token names taken as BOS when neither tokenizer_config.json nor the post-processor names one."""
EOS_NAMES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>")
"""Added-token names taken as EOS when neither tokenizer_config.json nor the post-processor names one."""


class TokenizersTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json on the `tokenizers` library (module docstring).

    Args:
        backend: the library's tokenizer.
        special_tokens: name -> id; names that are not yet its added tokens are made special added
            tokens (a new token only at the next id after its vocabulary).
        bos_id, eos_id, pad_id: the key ids, among `special_tokens`.
        source: where it was read from, for messages.

    Raises:
        TokenizerFileError: an id that is an ordinary token of another name, a name that is an ordinary
            token of another id, or a new token that would not get its id.
    """

    def __init__(
        self,
        backend: HFTokenizer,
        special_tokens: Mapping[str, int],
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        source: str,
    ) -> None:
        super().__init__(special_tokens, source)
        self._backend = _with_special_tokens(backend, self._special_tokens, source)
        self._encoders: dict[frozenset[str], HFTokenizer] = {}
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.vocab_size = max(self._backend.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def from_tokenizer_json(cls, path: Path, data: dict[str, Any]) -> TokenizersTokenizer:
        """Read a tokenizer.json, with the tokenizer_config.json beside it when there is one.

        Args:
            path: the tokenizer.json.
            data: its parsed content.

        Returns:
            The tokenizer.

        Raises:
            TokenizerFileError: a model that is neither BPE nor Unigram, a file the library cannot read, a
                `*_token` of tokenizer_config.json that is no token, or no EOS (naming the file and key).
        """
        _check_model(data.get("model"), path)
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as error:  # the library raises a bare Exception
            raise TokenizerFileError(f"{path}: the tokenizers library cannot read it ({error})") from None
        table = {token.content: token_id for token_id, token in backend.get_added_tokens_decoder().items()}
        config_path = path.with_name("tokenizer_config.json")
        config = read_json_object(config_path) if config_path.is_file() else {}
        if config_path.is_file():
            _update_by_id(table, read_added_tokens_decoder(config_path))
        key_ids: dict[str, int] = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            name = _token_name(config, key, config_path)
            if name is None:
                continue
            token_id = table.get(name, backend.token_to_id(name))
            if token_id is None:
                raise TokenizerFileError(
                    f"{config_path}: {key!r} is {name!r}, which is not a token of {path}; name one of its "
                    "tokens or added tokens"
                )
            table.setdefault(name, token_id)
            key_ids[key] = token_id
        prepended, appended = _post_processor_tokens(data.get("post_processor"))
        bos = _first(key_ids.get("bos_token"), prepended, _named(table, BOS_NAMES))
        eos = _first(key_ids.get("eos_token"), appended, _named(table, EOS_NAMES))
        if eos is None:
            raise TokenizerFileError(
                f"{path}: no EOS token. {config_path} has no 'eos_token' (or is missing), the "
                f"post-processor appends no special token, and no added token is named "
                f'{" or ".join(EOS_NAMES)}; set "eos_token" in {config_path} to the name of the token '
                "that ends a text"
            )
        return cls(
            backend,
            table,
            bos_id=eos if bos is None else bos,
            eos_id=eos,
            pad_id=key_ids.get("pad_token", eos),
            source=str(path),
        )

    @property
    def backend(self) -> HFTokenizer:
        """The library's tokenizer with every special token as an added token (a copy): what an export
        writes."""
        return HFTokenizer.from_str(self._backend.to_str())

    def encode(
        self,
        text: str,
        *,
        bos: bool = False,
        eos: bool = False,
        allowed_special: AllowedSpecial = frozenset(),
    ) -> list[int]:
        ids = self._encoder(self._allowed(allowed_special)).encode(text, add_special_tokens=False).ids
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def _encoder(self, allowed: frozenset[str]) -> HFTokenizer:
        """A copy of the tokenizer that matches exactly the `allowed` special tokens (module docstring)."""
        encoder = self._encoders.get(allowed)
        if encoder is None:
            data = json.loads(self._backend.to_str())
            for entry in data["added_tokens"]:
                if entry["content"] in self._special_names:
                    entry["special"] = entry["content"] not in allowed
            encoder = HFTokenizer.from_str(json.dumps(data))
            encoder.encode_special_tokens = True
            self._encoders[allowed] = encoder
        return encoder

    def _with_table(self, special_tokens: dict[str, int]) -> Tokenizer:
        return TokenizersTokenizer(
            self._backend,
            special_tokens,
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            source=self.source,
        )

    def __getstate__(self) -> dict[str, Any]:
        # The encoders are rebuilt on demand: a pickled tokenizer loses its encode_special_tokens flag.
        return {**vars(self), "_encoders": {}}


def _check_model(model: object, path: Path) -> None:
    """A BPE model with a vocab object, or a Unigram model with a non-empty vocab list."""
    if isinstance(model, dict):
        kind, vocab = model.get("type", "BPE"), model.get("vocab")
        if (kind == "BPE" and isinstance(vocab, dict)) or (
            kind == "Unigram" and vocab and isinstance(vocab, list)
        ):
            return
    raise TokenizerFileError(
        f"{path}: 'model' must be a BPE model with a 'vocab' object (byte-level, or SentencePiece-derived "
        "with byte fallback) or a Unigram model with a non-empty 'vocab' list; for a SentencePiece model "
        "file pass its tokenizer.model"
    )


def _update_by_id(table: dict[str, int], names: Mapping[str, int]) -> None:
    """Give each id of `names` its name there, dropping the name the id had in `table`."""
    taken = set(names.values())
    kept = {name: token_id for name, token_id in table.items() if token_id not in taken}
    table.clear()
    table.update(kept | dict(names))


def _token_name(config: Mapping[str, Any], key: str, path: Path) -> str | None:
    """The token a tokenizer_config.json key names (a string or an AddedToken dict), or None."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise TokenizerFileError(
        f'{path}: {key!r} must be a token name or an AddedToken object {{"content": "<name>", ...}}, '
        f"not {value!r}"
    )


def _post_processor_tokens(processor: object) -> tuple[int | None, int | None]:
    """The ids of the special tokens a TemplateProcessing puts before and after a single text."""
    if not isinstance(processor, dict):
        return None, None
    if processor.get("type") == "Sequence":
        found = [_post_processor_tokens(step) for step in processor.get("processors", [])]
        return _first(*(before for before, _ in found)), _first(*(after for _, after in found))
    if processor.get("type") != "TemplateProcessing":
        return None, None
    ids = {
        name: (entry.get("ids") or [None])[0] for name, entry in processor.get("special_tokens", {}).items()
    }
    pieces = processor.get("single", [])
    names = [piece["SpecialToken"]["id"] if "SpecialToken" in piece else None for piece in pieces]
    text = names.index(None) if None in names else len(names)
    before = [ids.get(name) for name in names[:text]]
    after = [ids.get(name) for name in names[text + 1 :]]
    return _first(*before), _first(*reversed(after))


def _named(table: Mapping[str, int], names: Sequence[str]) -> int | None:
    return next((table[name] for name in names if name in table), None)


def _first(*values: int | None) -> int | None:
    return next((value for value in values if value is not None), None)


def _with_special_tokens(backend: HFTokenizer, table: Mapping[str, int], source: str) -> HFTokenizer:
    """`backend` with each name of `table` as the added token at its id (itself when so already).

    An added token at that id is renamed and made special (in the model's vocabulary too, where it is a
    vocabulary token); a vocabulary token of that name becomes a special added token; an id past the
    vocabulary becomes a new one. Added tokens that keep their name keep their flags.
    """
    added = backend.get_added_tokens_decoder()
    if all(token_id in added and added[token_id].content == name for name, token_id in table.items()):
        return backend
    data = json.loads(backend.to_str())
    entries = {entry["id"]: entry for entry in data["added_tokens"]}
    vocab = data["model"]["vocab"]
    for name, token_id in sorted(table.items(), key=lambda item: item[1]):
        known = backend.token_to_id(name)
        if known is not None and known != token_id:
            raise TokenizerFileError(
                f"{source}: cannot make {name!r} special token {token_id}: it is already token {known}"
            )
        entry = entries.get(token_id)
        if entry is None:
            current = backend.id_to_token(token_id)
            if current is not None and current != name:
                raise TokenizerFileError(
                    f"{source}: cannot make {name!r} special token {token_id}: that id is the ordinary "
                    f"token {current!r}"
                )
            entry = {"id": token_id, "content": name, "normalized": False, "special": True}
            entry |= {"single_word": False, "lstrip": False, "rstrip": False}
            data["added_tokens"].append(entry)
        elif entry["content"] != name:
            _rename_in_vocab(vocab, entry["content"], name, token_id)
            entry |= {"content": name, "special": True}
    renamed = HFTokenizer.from_str(json.dumps(data))
    for name, token_id in table.items():
        if renamed.token_to_id(name) != token_id:
            raise TokenizerFileError(
                f"{source}: special token {name!r} would get id {renamed.token_to_id(name)}, not {token_id}: "
                "tokens past the vocabulary take the next free ids, so give them consecutive ids after it"
            )
    return renamed


def _rename_in_vocab(vocab: dict[str, int] | list[list[Any]], old: str, new: str, token_id: int) -> None:
    """Rename token `token_id` of a BPE (dict) or Unigram ([piece, score] list) vocabulary, if it is one."""
    if isinstance(vocab, dict):
        if vocab.get(old) == token_id:
            del vocab[old]
            vocab[new] = token_id
    elif token_id < len(vocab) and vocab[token_id][0] == old:
        vocab[token_id][0] = new
