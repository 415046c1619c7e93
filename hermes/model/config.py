"""Llama 3.1 model configuration, its presets, and conversion to and from Hugging Face / Meta files."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling (Hugging Face `rope_type: "llama3"`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def ffn_hidden_dim(dim: int, multiplier: float | None, multiple_of: int) -> int:
    """Meta's SwiGLU hidden size rule: 2/3 of 4*dim, times the multiplier, rounded up to `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama 3.x decoder. Field names follow Meta's params.json."""

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
    hidden_dim: int = 14336
    """SwiGLU inner width (Hugging Face `intermediate_size`)."""
    head_dim: int | None = None
    """Width of one head; None means dim // n_heads."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 500000.0
    """RoPE base."""
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    """Llama 3.1 frequency scaling; None for plain RoPE (Llama 3.0, Llama 2)."""
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
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    def replace(self, **changes: Any) -> LlamaConfig:
        """A copy with some fields changed (e.g. a preset with fewer layers for a benchmark slice)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> LlamaConfig:
        """One of PRESETS: "llama3.1-8b", "llama3.1-70b", "llama3.1-405b", "tiny", "debug"."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None

    # Hugging Face config.json ---------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Read a Hugging Face `config.json` dict, in the transformers 4.x form (`rope_theta` +
        `rope_scaling`) or the 5.x form (`rope_parameters`)."""
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(
                f"config.json has model_type {model_type!r}; hermes reads Llama models ('llama')"
            )
        if hf.get("tie_word_embeddings"):
            raise ValueError("config.json sets tie_word_embeddings; Llama 3.1 has an untied output head")
        missing = [k for k in _HF_REQUIRED if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}: not a Llama config")
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
        rope_scaling = None
        if scaling:
            rope_type = scaling.get("rope_type", scaling.get("type"))
            if rope_type != "llama3":
                raise ValueError(
                    f"config.json rope scaling type {rope_type!r} is not supported (only 'llama3')"
                )
            rope_scaling = RopeScaling(
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            )
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        return cls(
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads", n_heads),
            vocab_size=hf["vocab_size"],
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
            "tie_word_embeddings": False,
            "initializer_range": 0.02,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": torch_dtype,
        }
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
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


PRESETS: dict[str, LlamaConfig] = {
    "llama3.1-8b": _llama31(4096, 32, 32, 1.3, 1024),
    "llama3.1-70b": _llama31(8192, 80, 64, 1.3, 4096),
    "llama3.1-405b": _llama31(16384, 126, 128, 1.2, 4096),
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
