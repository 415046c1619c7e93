"""Llama-architecture model configuration (Llama 3.1, 3.2 and other Llama-shaped checkpoints), its presets,
and conversion to and from Hugging Face / Meta files."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling (Hugging Face `rope_type: "llama3"`)."""

    rope_type: ClassVar[str] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LinearRopeScaling:
    """Linear RoPE scaling, i.e. position interpolation (Hugging Face `rope_type: "linear"`): positions are
    divided by `factor`, which is every frequency divided by it."""

    rope_type: ClassVar[str] = "linear"
    factor: float


AnyRopeScaling = RopeScaling | LinearRopeScaling
ROPE_TYPES = ("default", "linear", "llama3")
"""The Hugging Face `rope_type`s hermes computes; "default" is plain RoPE (`rope_scaling` None)."""


def _rope_scaling_from_hf(settings: Mapping[str, Any], key: str) -> AnyRopeScaling | None:
    """The frequency scaling a Hugging Face RoPE dict describes: transformers 4.x `rope_scaling` or 5.x
    `rope_parameters`, its type under "rope_type" (or the older "type"; none means "default").

    Args:
        settings: the dict.
        key: its config.json key, named in errors.

    Raises:
        ValueError: a rope type hermes does not compute (the supported ones are named), or a missing field.
    """
    rope_type = settings.get("rope_type", settings.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"config.json {key} has rope_type {rope_type!r}, which hermes does not support; "
            f"supported: {', '.join(map(repr, ROPE_TYPES))}"
        )
    if rope_type == "default":
        return None
    kind = LinearRopeScaling if rope_type == "linear" else RopeScaling
    names = [f.name for f in dataclasses.fields(kind)]
    missing = [name for name in names if name not in settings]
    if missing:
        raise ValueError(f"config.json {key} (rope_type {rope_type!r}) lacks {', '.join(missing)}")
    values = {name: float(settings[name]) for name in names}
    if kind is RopeScaling:
        values["original_max_position_embeddings"] = int(settings["original_max_position_embeddings"])
    return kind(**values)


def ffn_hidden_dim(dim: int, multiplier: float | None, multiple_of: int) -> int:
    """Meta's SwiGLU hidden size rule: 2/3 of 4*dim, times the multiplier, rounded up to `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-architecture decoder (Llama 3.x). Field names follow Meta's params.json."""

    dim: int = 4096
    """Model (residual stream) width."""
    n_layers: int = 32
    """Number of transformer blocks."""
    n_heads: int = 32
    """Query heads per block."""
    n_kv_heads: int = 8
    """Key/value heads per block (grouped-query attention: each serves n_heads / n_kv_heads query heads)."""
    vocab_size: int = 128256
    """Rows of the embedding table and of the output head."""
    tie_word_embeddings: bool = False
    """The output head's weight is the embedding table, one parameter (Llama 3.2 1B / 3B)."""
    hidden_dim: int = 14336
    """SwiGLU inner width (Hugging Face `intermediate_size`)."""
    head_dim: int | None = None
    """Width of one head; None means dim // n_heads."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 500000.0
    """RoPE base."""
    rope_scaling: AnyRopeScaling | None = field(default_factory=RopeScaling)
    """RoPE frequency scaling: Llama 3.1's (`RopeScaling`), linear (`LinearRopeScaling`), or None for plain
    RoPE (Llama 3.0, Llama 2)."""
    max_seq_len: int = 131072
    """Context length the model was trained for (Hugging Face `max_position_embeddings`)."""
    bos_token_id: int = 128000
    eos_token_id: int | list[int] = 128001

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}) "
                "for grouped-query attention"
            )
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must divide by n_heads ({self.n_heads}), or set head_dim")
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    def replace(self, **changes: Any) -> LlamaConfig:
        """A copy with some fields changed (e.g. a preset with fewer layers for a benchmark slice)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> LlamaConfig:
        """One of PRESETS: "llama3.1-8b", "llama3.1-70b", "llama3.1-405b", "llama3.2-1b", "llama3.2-3b",
        "tiny", "debug"."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None

    # Hugging Face config.json ---------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Read a Hugging Face `config.json` dict, in the transformers 4.x form (`rope_theta` +
        `rope_scaling`) or the 5.x form (`rope_parameters`).

        Raises:
            ValueError: not a Llama config, or RoPE settings hermes does not compute (see `ROPE_TYPES`).
        """
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(
                f"config.json has model_type {model_type!r}; hermes reads Llama models ('llama')"
            )
        missing = [k for k in _HF_REQUIRED if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}: not a Llama config")
        rope = hf.get("rope_parameters") or {}
        rope_theta = float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))
        key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
        rope_scaling = _rope_scaling_from_hf(hf.get(key) or {}, key)
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        return cls(
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads", n_heads),
            vocab_size=hf["vocab_size"],
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            hidden_dim=hf["intermediate_size"],
            head_dim=None if head_dim in (None, hf["hidden_size"] // n_heads) else head_dim,
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=hf.get("max_position_embeddings", 131072),
            bos_token_id=hf.get("bos_token_id", 128000),
            eos_token_id=hf.get("eos_token_id", 128001),
        )

    def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """The `config.json` dict, in the transformers 4.x form that both 4.x and 5.x read."""
        hf: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.attention_head_dim,
            "vocab_size": self.vocab_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_seq_len,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": 0.02,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": torch_dtype,
        }
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {
                "rope_type": self.rope_scaling.rope_type,
                **dataclasses.asdict(self.rope_scaling),
            }
        return hf

    # Meta params.json ------------------------------------------------------------------------------------

    @classmethod
    def from_meta(cls, params: dict[str, Any], vocab_size: int | None = None) -> LlamaConfig:
        """Read Meta's original `params.json` (dim, n_layers, ..., ffn_dim_multiplier, multiple_of)."""
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
        if missing:
            raise ValueError(f"params.json lacks {', '.join(missing)}: not a Meta Llama params file")
        vocab = params.get("vocab_size", -1)
        if vocab in (None, -1):
            if vocab_size is None:
                raise ValueError("params.json has no vocab_size; pass it from the tokenizer")
            vocab = vocab_size
        return cls(
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            vocab_size=vocab,
            hidden_dim=ffn_hidden_dim(params["dim"], params.get("ffn_dim_multiplier"), params["multiple_of"]),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=RopeScaling() if params.get("use_scaled_rope") else None,
        )


_HF_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _llama31(dim: int, n_layers: int, n_heads: int, multiplier: float, multiple_of: int) -> LlamaConfig:
    return LlamaConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=8,
        hidden_dim=ffn_hidden_dim(dim, multiplier, multiple_of),
    )


def _llama32(dim: int, n_layers: int, n_heads: int) -> LlamaConfig:
    """Llama 3.2 1B / 3B: an explicit 8192-wide FFN, RoPE scaling factor 32, tied embeddings."""
    return LlamaConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=8,
        hidden_dim=8192,
        rope_scaling=RopeScaling(factor=32.0),
        tie_word_embeddings=True,
    )


PRESETS: dict[str, LlamaConfig] = {
    "llama3.1-8b": _llama31(4096, 32, 32, 1.3, 1024),
    "llama3.1-70b": _llama31(8192, 80, 64, 1.3, 4096),
    "llama3.1-405b": _llama31(16384, 126, 128, 1.2, 4096),
    "llama3.2-1b": _llama32(2048, 16, 32),  # head_dim 64
    "llama3.2-3b": _llama32(3072, 28, 24),  # head_dim 128
    # A laptop-sized Llama 3.1 with the real vocabulary, GQA (8 query heads share 2 kv heads) and llama3
    # RoPE scaling: what the default run trains on CPU.
    "tiny": LlamaConfig(
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=2,
        hidden_dim=ffn_hidden_dim(256, None, 256),
        max_seq_len=8192,
    ),
    # The smallest shape that keeps every feature (GQA, scaled RoPE, the real vocabulary): for tests.
    "debug": LlamaConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=ffn_hidden_dim(64, None, 64), max_seq_len=8192
    ),
}
