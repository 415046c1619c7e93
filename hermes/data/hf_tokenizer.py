"""A Hugging Face `tokenizer.json` equivalent to a tiktoken tokenizer (Llama 3), for exported models.

tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank. A BPE model
gives the same ids when its merges are every split of every token into two tokens, ordered by the rank
of the merged token, and `ignore_merges` maps a pre-token that is a whole token straight to it (as
tiktoken does).
"""

from __future__ import annotations

import functools
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from hermes.data.tokenizer import TiktokenTokenizer
from hermes.data.tokenizer_json import byte_level_alphabet


@functools.cache
def _byte_to_char() -> dict[int, str]:
    """str.translate table from a latin-1 character (one byte) to its character in GPT-2's byte-level
    alphabet: the inverse of `byte_level_alphabet`."""
    return {ord(latin): chr(code) for code, latin in byte_level_alphabet().items() if ord(latin) < 0x100}


def _merges(tokens: list[bytes], ranks: dict[bytes, int]) -> list[tuple[int, int]]:
    """BPE merges in tiktoken's order, as (rank of left, rank of right), for `tokens` listed by rank.

    Each token contributes every split into two tokens, sorted by (rank of left, rank of right).
    """
    merges: list[tuple[int, int]] = []
    for token in tokens:
        splits = [
            (ranks[token[:cut]], ranks[token[cut:]])
            for cut in range(1, len(token))
            if token[:cut] in ranks and token[cut:] in ranks
        ]
        merges.extend(sorted(splits))
    return merges


def tokenizers_from_tiktoken(tokenizer: TiktokenTokenizer) -> HFTokenizer:
    """The `tokenizers` equivalent of a tiktoken tokenizer: the same ids for any text, special tokens
    (its whole table, at their ids) included, laid out as Llama 3's tokenizer.json.

    Encoding with `add_special_tokens=True` prepends the BOS token (`tokenizer.bos_id`), as Llama 3's
    tokenizer.json does; special-token text in the input always becomes its id (tiktoken's
    `allowed_special="all"`).

    Args:
        tokenizer: a byte-level BPE tokenizer on tiktoken (Llama 3).

    Returns:
        The Hugging Face tokenizer.

    Raises:
        ValueError: a special-token name that is also the byte-level spelling of a BPE token.
    """
    ranks = tokenizer.mergeable_ranks
    tokens = sorted(ranks, key=ranks.__getitem__)
    to_alphabet = _byte_to_char()
    spelled = [token.decode("latin-1").translate(to_alphabet) for token in tokens]
    vocab = dict(zip(spelled, range(len(spelled))))
    special_tokens = tokenizer.special_tokens
    clashes = sorted(vocab.keys() & special_tokens.keys())
    if clashes:
        raise ValueError(
            f"special token {clashes[0]!r} of the tokenizer from {tokenizer.source} is spelled like BPE "
            f"token {vocab[clashes[0]]} in tokenizer.json's byte-level alphabet; rename the special token"
        )
    # The special tokens sit in the vocab at their ids, so that add_special_tokens keeps those ids.
    vocab.update(special_tokens)
    merges = [(spelled[left], spelled[right]) for left, right in _merges(tokens, ranks)]

    converted = HFTokenizer(models.BPE(vocab, merges, ignore_merges=True))
    converted.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    converted.decoder = decoders.ByteLevel()
    bos = next(name for name, token_id in special_tokens.items() if token_id == tokenizer.bos_id)
    converted.post_processor = processors.TemplateProcessing(
        single=[bos, "$A"],
        pair=[bos, "$A", f"{bos}:1", "$B:1"],
        special_tokens=[(bos, tokenizer.bos_id)],
    )
    converted.add_special_tokens(
        [
            AddedToken(name, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
            for name in sorted(special_tokens, key=special_tokens.__getitem__)
        ]
    )
    return converted


def save_tokenizer_json(tokenizer: TiktokenTokenizer, directory: str | Path) -> Path:
    """Write the `tokenizers_from_tiktoken` conversion of `tokenizer` as `directory/tokenizer.json`.

    Args:
        tokenizer: a byte-level BPE tokenizer on tiktoken (Llama 3).
        directory: where to write; created if missing.

    Returns:
        The path of the tokenizer.json.
    """
    path = Path(directory) / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizers_from_tiktoken(tokenizer).save(str(path))
    return path
