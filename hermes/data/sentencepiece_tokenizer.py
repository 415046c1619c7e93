"""The SentencePiece backend of `hermes.data.tokenizer.Tokenizer` (the Llama 2 family's tokenizer.model)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence

import sentencepiece

from hermes.data.tokenizer import AllowedSpecial, Tokenizer, TokenizerFileError


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece (Llama 2 family). Special tokens are its control and unknown pieces.

    Allowed special tokens are cut out before SentencePiece sees the text, so each plain segment gets
    SentencePiece's own dummy-prefix handling. User-defined pieces are ordinary pieces here (SentencePiece
    matches them in any text). The pad id is the model's pad piece, else its unknown piece (never
    trained, unlike EOS).
    """

    def __init__(
        self,
        processor: sentencepiece.SentencePieceProcessor,
        special_tokens: Mapping[str, int] | None = None,
        *,
        source: str,
    ) -> None:
        if special_tokens is None:
            special_tokens = {
                processor.id_to_piece(i): i
                for i in range(processor.get_piece_size())
                if processor.is_control(i) or processor.is_unknown(i)
            }
        super().__init__(special_tokens, source)
        self._processor = processor
        self._names_by_id = {token_id: name for name, token_id in self._special_tokens.items()}
        if processor.bos_id() < 0 or processor.eos_id() < 0:
            raise TokenizerFileError(
                f"{source}: the SentencePiece model defines no BOS or EOS piece (bos_id "
                f"{processor.bos_id()}, eos_id {processor.eos_id()}); train it with bos_id/eos_id >= 0"
            )
        self.bos_id = processor.bos_id()
        self.eos_id = processor.eos_id()
        self.pad_id = processor.pad_id() if processor.pad_id() >= 0 else processor.unk_id()
        self.vocab_size = processor.get_piece_size()

    def encode(
        self,
        text: str,
        *,
        bos: bool = False,
        eos: bool = False,
        allowed_special: AllowedSpecial = frozenset(),
    ) -> list[int]:
        allowed = self._allowed(allowed_special)
        if allowed:
            alternatives = "|".join(re.escape(name) for name in sorted(allowed, key=len, reverse=True))
            parts = re.split(f"({alternatives})", text)
        else:
            parts = [text]
        plain = self._processor.encode(parts[::2])
        ids = [self.bos_id] * bos
        for index, segment in enumerate(plain):
            ids.extend(segment)
            if 2 * index + 1 < len(parts):
                ids.append(self._special_tokens[parts[2 * index + 1]])
        return ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        text = []
        for special, group in itertools.groupby(ids, key=self._names_by_id.get):
            run = list(group)
            text.append(special * len(run) if special else self._processor.decode(run))
        return "".join(text)

    def _with_table(self, special_tokens: dict[str, int]) -> Tokenizer:
        return SentencePieceTokenizer(self._processor, special_tokens, source=self.source)
