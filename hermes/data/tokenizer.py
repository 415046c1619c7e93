"""Tokenizers behind one interface: Llama 3 (tiktoken BPE), SentencePiece (the Llama 2 family's
tokenizer.model) and any other Hugging Face tokenizer.json (the `tokenizers` library).

A Llama 3 tokenizer is 128000 byte-level BPE ranks plus 256 special tokens at ids 128000-128255.
`Tokenizer.from_file` reads it from Meta's `tokenizer.model` (tiktoken rank file) or from a Hugging Face
`tokenizer.json` in Llama 3's layout (a BPE model, no normalizer, one Split regex then ByteLevel, the
special tokens after the BPE ranks with BOS and EOS first); both run on tiktoken's native encoder. Special-token names drift between releases, so its key ids (BOS, EOS, pad)
are found by position, not by name. A `tokenizer.model` that is a SentencePiece protobuf is served by the
SentencePiece backend; every other tokenizer.json (GPT-2-style byte-level BPE, SentencePiece-derived BPE or
Unigram) by the `tokenizers` backend (hermes.data.hf_tokenizers_backend), whose key ids are named by the
tokenizer_config.json beside it. Hugging Face tokenizer files are parsed in hermes.data.tokenizer_json.

Special-token text (`<|begin_of_text|>` typed by a user) is encoded as plain text unless the caller
allows it by name; encoding never raises on it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import importlib.util
import itertools
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence, Set
from pathlib import Path
from typing import Literal

import sentencepiece
import tiktoken

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Llama 3's pre-tokenizer split pattern."""

NUM_SPECIAL_TOKENS = 256
"""Special tokens after the BPE ranks in Llama 3 (ids 128000-128255)."""

# Named special tokens by offset from the first special id (Llama 3.1); the other offsets are reserved.
_NAMED_OFFSETS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
}
BOS_OFFSET, EOS_OFFSET, _PAD_OFFSET = 0, 1, 4

RESERVED_NAME = re.compile(r"<\|reserved_special_token_\d+\|>")
"""Names of special ids that carry no meaning yet and may be renamed."""

# tiktoken panics on very long inputs: encode at most this many characters at a time, and cut runs of
# whitespace or non-whitespace longer than _MAX_RUN_CHARS (as Meta's reference tokenizer does).
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
# The lookbehinds make a match start only where a run starts, which keeps the scan linear.
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{_MAX_RUN_CHARS + 1},}}|(?<!\s)\s{{{_MAX_RUN_CHARS + 1},}}")

ACCEPTED_FILES = (
    "a tiktoken BPE rank file (tokenizer.model: lines of '<base64 token> <rank>'), a SentencePiece "
    "model (tokenizer.model), a Hugging Face tokenizer.json (BPE or Unigram), or a directory holding one "
    "of them"
)
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+")

AllowedSpecial = Literal["all"] | Set[str]
_SpecialSearch = tuple[frozenset[str], Callable[[str], re.Match[str] | None] | None]
"""Allowed special-token names, and a search for any of them in a text (None when none is allowed)."""


@functools.lru_cache(maxsize=64)
def _special_text_pattern(names: frozenset[str]) -> re.Pattern[str]:
    """A regex that finds whether a text holds any of `names`."""
    return re.compile("|".join(re.escape(name) for name in sorted(names)))


class TokenizerFileError(ValueError):
    """A tokenizer file that exists but cannot be read as what it claims to be."""


def llama3_special_token_names(count: int = NUM_SPECIAL_TOKENS) -> list[str]:
    """Names of Llama 3.1's special tokens, in id order.

    Reserved ones are numbered as Meta numbers them: offsets 2-3 -> 0-1, 5 -> 2, 11.. -> 3...

    Args:
        count: how many special tokens follow the BPE ranks.

    Returns:
        `count` names; name i belongs to id `len(ranks) + i`.
    """
    reserved = (f"<|reserved_special_token_{n}|>" for n in itertools.count())
    return [_NAMED_OFFSETS.get(offset) or next(reserved) for offset in range(count)]


def split_long_text(text: str) -> list[str]:
    """Cut text into pieces tiktoken can encode: at most 400,000 characters, and no run of over 25,000
    whitespace or non-whitespace characters. The cuts are those of Meta's reference tokenizer.

    Args:
        text: any string.

    Returns:
        Pieces whose concatenation is `text` (one piece when no cut is needed).
    """
    if len(text) <= _MAX_RUN_CHARS:
        return [text]
    pieces = []
    for start in range(0, len(text), _MAX_ENCODE_CHARS):
        chunk = text[start : start + _MAX_ENCODE_CHARS]
        cut = 0
        for run in _LONG_RUN.finditer(chunk):
            for boundary in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
                pieces.append(chunk[cut:boundary])
                cut = boundary
        pieces.append(chunk[cut:])
    return pieces


class Tokenizer(ABC):
    """Text <-> token ids, with named special tokens.

    Build one with `Tokenizer.from_file(path)` or `Tokenizer.default()`. Instances are immutable:
    `with_special_tokens` returns a new tokenizer.

    Attributes:
        vocab_size: number of ids (128256 for Llama 3).
        bos_id: id prepended by `encode(..., bos=True)` (<|begin_of_text|>).
        eos_id: end of text (<|end_of_text|>).
        pad_id: padding id (<|finetune_right_pad_id|> for Llama 3).
        source: where the tokenizer was read from, for messages.
    """

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    source: str

    def __init__(self, special_tokens: Mapping[str, int], source: str) -> None:
        self._special_tokens = dict(special_tokens)
        self._special_names = frozenset(self._special_tokens)
        self.source = source

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special-token name -> id (a copy)."""
        return dict(self._special_tokens)

    @abstractmethod
    def encode(
        self,
        text: str,
        *,
        bos: bool = False,
        eos: bool = False,
        allowed_special: AllowedSpecial = frozenset(),
    ) -> list[int]:
        """Encode text to ids.

        Args:
            text: the text.
            bos: prepend `bos_id`.
            eos: append `eos_id`.
            allowed_special: names of special tokens whose text becomes their id, or "all". Any other
                special-token text is encoded as plain text.

        Returns:
            Token ids.
        """

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text; special ids decode to their names."""

    @abstractmethod
    def _with_table(self, special_tokens: dict[str, int]) -> Tokenizer:
        """The same tokenizer with another (validated) special-token table."""

    def token_id(self, name: str) -> int:
        """Id of a special token.

        Raises:
            KeyError: the tokenizer has no special token of that name.
        """
        try:
            return self._special_tokens[name]
        except KeyError:
            ids = self._special_tokens.values()
            raise KeyError(
                f"{name!r} is not a special token of the tokenizer from {self.source} "
                f"({len(ids)} special tokens, ids {min(ids)}-{max(ids)}). Add it on a reserved id with "
                f"tokenizer.with_special_tokens({{{name!r}: <id>}}), or load a tokenizer.json / "
                "tokenizer_config.json that lists it in added_tokens."
            ) from None

    def with_special_tokens(self, mapping: Mapping[str, int]) -> Tokenizer:
        """A tokenizer where each name of `mapping` is the special token at its id.

        The ids must already be special ids (typically reserved ones); the names they had are dropped.

        Args:
            mapping: name -> special id.

        Returns:
            A new tokenizer (or this one when nothing changes).

        Raises:
            ValueError: an id that is not a special id of this tokenizer, two names on one id, or a name
                that already owns a different id.
        """
        names_by_id = {token_id: name for name, token_id in self._special_tokens.items()}
        claimed: dict[int, str] = {}
        for name, token_id in mapping.items():
            if token_id not in names_by_id:
                raise ValueError(
                    f"cannot make {name!r} special token {token_id}: {token_id} is not a special id of "
                    f"the tokenizer from {self.source} (special ids are "
                    f"{min(names_by_id)}-{max(names_by_id)}); pick one of its reserved ids"
                )
            if token_id in claimed:
                raise ValueError(f"{claimed[token_id]!r} and {name!r} both ask for special id {token_id}")
            current = self._special_tokens.get(name)
            if current is not None and current != token_id:
                raise ValueError(
                    f"{name!r} is already special token {current} in the tokenizer from {self.source}; "
                    f"it cannot also take id {token_id}: map it to {current} or leave it out"
                )
            claimed[token_id] = name
        if all(self._special_tokens.get(name) == token_id for name, token_id in mapping.items()):
            return self
        names_by_id.update(claimed)
        return self._with_table({name: token_id for token_id, name in names_by_id.items()})

    def _allowed(self, allowed_special: AllowedSpecial) -> frozenset[str]:
        if allowed_special == "all":
            return self._special_names
        return self._special_names.intersection(allowed_special)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r}, vocab_size={self.vocab_size})"

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer.

        Args:
            path: a `tokenizer.model` (tiktoken ranks or SentencePiece, told apart by content), a
                Hugging Face `tokenizer.json` (its `added_tokens`, and the `added_tokens_decoder` of a
                `tokenizer_config.json` beside it, give the special tokens; in Llama 3's layout it runs
                on tiktoken, else on the `tokenizers` library), or a directory holding tokenizer.json,
                tokenizer.model or original/tokenizer.model (first found wins).

        Returns:
            The tokenizer.

        Raises:
            FileNotFoundError: nothing readable at `path`.
            TokenizerFileError: the file is not a well-formed tokenizer of an accepted kind.
        """
        path = Path(path)
        if path.is_dir():
            candidates = [
                path / "tokenizer.json",
                path / "tokenizer.model",
                path / "original/tokenizer.model",
            ]
            found = next((candidate for candidate in candidates if candidate.is_file()), None)
            if found is None:
                raise FileNotFoundError(
                    f"no tokenizer in directory {path}: looked for "
                    f"{', '.join(str(c.relative_to(path)) for c in candidates)}; expected {ACCEPTED_FILES}"
                )
            path = found
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}; expected {ACCEPTED_FILES}")
        if path.suffix == ".json":
            from hermes.data.tokenizer_json import read_tokenizer_json

            return read_tokenizer_json(path)
        data = path.read_bytes()
        first_line = next((line for line in data.splitlines() if line.strip()), b"")
        if _TIKTOKEN_LINE.fullmatch(first_line.strip()):
            return TiktokenTokenizer.from_ranks(_read_tiktoken_ranks(data, path), source=str(path))
        try:
            processor = sentencepiece.SentencePieceProcessor(model_proto=data)
        except RuntimeError as error:
            raise TokenizerFileError(
                f"{path} is neither a tiktoken rank file (its first line is {first_line[:60]!r}, not "
                f"'<base64 token> <rank>') nor a SentencePiece model ({error}); expected {ACCEPTED_FILES}"
            ) from None
        from hermes.data.sentencepiece_tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer(processor, source=str(path))

    @classmethod
    def default(cls) -> Tokenizer:
        """The real Llama 3 tokenizer, shipped inside the `llama-models` package (no network).

        Raises:
            FileNotFoundError: `llama-models` is not installed.
        """
        return _default_tokenizer()


@functools.cache
def _default_tokenizer() -> Tokenizer:
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default Llama 3 tokenizer comes from the llama-models package, which is not installed: "
            "run `pip install llama-models==0.3.0` (it provides llama_models/llama3/tokenizer.model), or "
            "pass the path of a tokenizer.model / tokenizer.json"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed llama-models; run `pip install llama-models==0.3.0`, "
            "which provides llama_models/llama3/tokenizer.model"
        )
    return Tokenizer.from_file(path)


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE on tiktoken (Llama 3). Ids 0..len(ranks)-1 are BPE ranks; special ids follow."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_tokens: Mapping[str, int],
        *,
        pattern: str = LLAMA3_PATTERN,
        source: str,
    ) -> None:
        super().__init__(special_tokens, source)
        self._searches: dict[frozenset[str] | str, _SpecialSearch] = {}
        self._ranks = mergeable_ranks
        self._pattern = pattern
        self._encoding = tiktoken.Encoding(
            name=Path(source).name,
            pat_str=pattern,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self._special_tokens,
        )
        first_special = len(mergeable_ranks)
        special_ids = set(self._special_tokens.values())
        for role, offset in (("BOS", BOS_OFFSET), ("EOS", EOS_OFFSET)):
            if first_special + offset not in special_ids:
                raise TokenizerFileError(
                    f"{source}: expected the Llama 3 layout, {role} as special id {first_special + offset} "
                    f"(BPE ranks end at {first_special - 1}), but no special token has that id"
                )
        self.bos_id = first_special + BOS_OFFSET
        self.eos_id = first_special + EOS_OFFSET
        pad = first_special + _PAD_OFFSET
        self.pad_id = pad if pad in special_ids else self.eos_id
        self.vocab_size = max(special_ids) + 1

    @classmethod
    def from_ranks(cls, mergeable_ranks: dict[bytes, int], *, source: str) -> TiktokenTokenizer:
        """A Llama 3 tokenizer: the ranks plus 256 special tokens named as in Llama 3.1."""
        first = len(mergeable_ranks)
        names = llama3_special_token_names()
        return cls(mergeable_ranks, {name: first + i for i, name in enumerate(names)}, source=source)

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        """BPE token bytes -> rank, which is also its id (a copy)."""
        return dict(self._ranks)

    @property
    def pattern(self) -> str:
        """The pre-tokenizer split regex."""
        return self._pattern

    def encode(
        self,
        text: str,
        *,
        bos: bool = False,
        eos: bool = False,
        allowed_special: AllowedSpecial = frozenset(),
    ) -> list[int]:
        allowed, find_special = self._special_search(allowed_special)
        if find_special is not None and find_special(text):
            ids = self._encode_pieces(text, allowed)
        elif len(text) <= _MAX_RUN_CHARS:
            # Fast path: with no allowed name in the text, tiktoken's special-token path would give
            # exactly its ordinary encoding (most turns of a conversation hold no tag).
            ids = self._encoding.encode_ordinary(text)
        else:
            ids = self._encode_pieces(text, frozenset())
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def _special_search(self, allowed_special: AllowedSpecial) -> _SpecialSearch:
        """The allowed names and a search for them in a text (None when none is allowed); memoized for
        the frozensets (and "all") that callers pass again and again."""
        memo = isinstance(allowed_special, frozenset | str)
        search = self._searches.get(allowed_special) if memo else None
        if search is None:
            allowed = self._allowed(allowed_special)
            search = (allowed, _special_text_pattern(allowed).search if allowed else None)
            if memo:
                self._searches[allowed_special] = search
        return search

    def _encode_pieces(self, text: str, allowed: frozenset[str]) -> list[int]:
        """The general path: tiktoken's special-token encoding of each piece of `split_long_text`."""
        pieces = split_long_text(text)
        if len(pieces) == 1:
            return self._encoding.encode(text, allowed_special=allowed, disallowed_special=())
        batches = self._encoding.encode_batch(pieces, allowed_special=allowed, disallowed_special=())
        return list(itertools.chain.from_iterable(batches))

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode(list(ids))

    def _with_table(self, special_tokens: dict[str, int]) -> Tokenizer:
        return TiktokenTokenizer(self._ranks, special_tokens, pattern=self._pattern, source=self.source)


def _read_tiktoken_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerFileError(
                f"{path}, line {line_number}: expected '<base64 token> <rank>', got {line[:60]!r}; "
                f"expected {ACCEPTED_FILES}"
            ) from None
    check_ranks(ranks, path)
    return ranks


def check_ranks(ranks: dict[bytes, int], path: Path) -> None:
    """tiktoken needs ids 0..n-1, each once, and every single byte as a token."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerFileError(
            f"{path}: BPE ranks must be 0..{len(ranks) - 1}, each once (ranks repeat or leave gaps)"
        )
    missing = [byte for byte in range(256) if bytes([byte]) not in ranks]
    if missing:
        raise TokenizerFileError(
            f"{path}: {len(missing)} single bytes (first: {missing[0]:#04x}) have no token; a byte-level "
            "BPE needs all 256"
        )
