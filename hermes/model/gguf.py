"""GGUF, llama.cpp's single-file format, <-> hermes Llama, through the `gguf` package (llama.cpp's own Python
library; `pip install 'hermes[gguf]'`).

Written as llama.cpp's convert_hf_to_gguf writes a Llama: architecture "llama" and its `llama.*` shape keys;
tensors `token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up,
ffn_down}`, `output_norm` and `output` (left out when the embeddings are tied: llama.cpp then uses
`token_embd` as the head); Llama 3.1 RoPE scaling as the `rope_freqs` tensor (per frequency, the divisor
llama.cpp applies), linear scaling as `llama.rope.scaling.{type, factor}`; the tokenizer as
hermes.model.gguf_vocab writes it. Matrices are stored as F16, BF16 or Q8_0 (`FILE_TYPES`); norms and other
1-D tensors stay F32, and a matrix whose rows do not split into Q8_0 blocks of 32 falls back to F16, as in
llama.cpp.

llama.cpp rotates interleaved pairs (2i, 2i+1), as Meta's code does, so the q and k rows that hermes keeps
in halves (as Hugging Face does) are permuted to pairs when written and back when read.

Read: a file of architecture "llama" whose tensors are of a type `gguf.quants.dequantize` implements (F32,
F16, BF16 and Q8_0 are tested; Q4_0 ... Q6_K and the IQ types take the same path), dequantised to float32.
GGUF records Llama 3.1 RoPE scaling only as `rope_freqs` (llama.cpp writes no `rope.scaling.*` keys for
it), so the scaling is recovered from those divisors and checked to reproduce them: the factor is the
largest; the band is Meta's (high_freq_factor 4, original context 8192) when that fits, else fitted to the
smoothed frequencies with low_freq_factor 1 (the frequencies fix only the ratios of low, high and context)
and, with fewer than two smoothed, high 4. The recovered values give the same frequencies; for a
low_freq_factor other than 1 they are not the same numbers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import gguf
except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "GGUF files need the gguf package (llama.cpp's Python library): pip install 'hermes[gguf]'"
    ) from error

from hermes.model.config import LinearRopeScaling, LlamaConfig, RopeScaling
from hermes.model.gguf_vocab import GGUFVocabulary, add_vocabulary, read_vocabulary
from hermes.model.hf import load_pretrained, meta_qk_to_hf, stored_state
from hermes.model.llama import Llama
from hermes.model.rope import rope_frequencies

ARCHITECTURE = "llama"
QType = gguf.GGMLQuantizationType
FILE_TYPES: dict[str, tuple[QType, gguf.LlamaFileType]] = {
    "f16": (QType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
"""`--type` -> how matrices are stored, and the file's `general.file_type`."""

ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"

_T = gguf.MODEL_TENSOR
# hermes (= Meta) module -> llama.cpp tensor, per block and at the top.
_BLOCK_TENSORS = {
    "attention.wq": _T.ATTN_Q,
    "attention.wk": _T.ATTN_K,
    "attention.wv": _T.ATTN_V,
    "attention.wo": _T.ATTN_OUT,
    "feed_forward.w1": _T.FFN_GATE,
    "feed_forward.w2": _T.FFN_DOWN,
    "feed_forward.w3": _T.FFN_UP,
    "attention_norm": _T.ATTN_NORM,
    "ffn_norm": _T.FFN_NORM,
}
_TOP_TENSORS = {"tok_embeddings": _T.TOKEN_EMBD, "norm": _T.OUTPUT_NORM, "output": _T.OUTPUT}


def gguf_name(name: str) -> str:
    """llama.cpp's name of a hermes parameter: "layers.0.attention.wq.weight" -> "blk.0.attn_q.weight".

    Raises:
        ValueError: `name` is not a hermes Llama parameter.
    """
    parts = name.split(".")
    if parts[0] == "layers" and len(parts) > 3 and ".".join(parts[2:-1]) in _BLOCK_TENSORS:
        tensor = _BLOCK_TENSORS[".".join(parts[2:-1])]
        return gguf.TENSOR_NAMES[tensor].format(bid=int(parts[1])) + "." + parts[-1]
    if len(parts) == 2 and parts[0] in _TOP_TENSORS:
        return gguf.TENSOR_NAMES[_TOP_TENSORS[parts[0]]] + "." + parts[1]
    raise ValueError(f"{name!r} is not a hermes Llama parameter; it has no GGUF name")


def hf_qk_to_gguf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the rows of a q or k weight [n_heads * head_dim, dim] from the halves (i, i + head_dim/2) that
    hermes and Hugging Face rotate to the interleaved pairs (2i, 2i+1) that llama.cpp rotates; the inverse
    of `hermes.model.hf.meta_qk_to_hf`."""
    rows, dim = weight.shape
    head_dim = rows // n_heads
    # [heads, 2 halves, head_dim/2, dim] -> [heads, head_dim/2 pairs, 2 members, dim]
    return weight.reshape(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(rows, dim)


def rope_freq_factors(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama 3.1 RoPE scaling: per frequency, plain / scaled (float32)."""
    plain = rope_frequencies(head_dim, theta, None).double()
    scaled = rope_frequencies(head_dim, theta, scaling).double()
    return (plain / scaled).float().numpy()


# Writing -------------------------------------------------------------------------------------------------


def export_gguf(directory: str | os.PathLike, output: str | os.PathLike, file_type: str = "f16") -> Path:
    """Convert a Hugging Face Llama directory (as hermes exports it) to one GGUF file.

    Args:
        directory: config.json, the safetensors, tokenizer.json and tokenizer_config.json.
        output: the .gguf file to write.
        file_type: how matrices are stored: one of `FILE_TYPES`.

    Returns:
        The file written.

    Raises:
        FileNotFoundError: a file of the directory is missing.
        ValueError: naming the key or tensor that does not fit (a config that is not a Llama one, a
            tokenizer llama.cpp cannot take, an unknown file type).
    """
    _check_file_type(file_type)
    model = load_pretrained(directory)
    vocabulary = read_vocabulary(directory, model.config.vocab_size)
    return save_gguf(model, output, vocabulary, file_type)


def save_gguf(
    model: Llama, path: str | os.PathLike, vocabulary: GGUFVocabulary, file_type: str = "f16"
) -> Path:
    """Write `model` and `vocabulary` as a llama.cpp GGUF file (module docstring). The file appears complete
    or not at all: it is written beside `path` and then moved there.

    Args:
        model: the model; its weights are read in float32 and stored as `file_type` says.
        path: the file to write.
        vocabulary: the tokenizer (`hermes.model.gguf_vocab.read_vocabulary`).
        file_type: one of `FILE_TYPES`.

    Returns:
        The file written.

    Raises:
        ValueError: an unknown file type, or a vocabulary whose size is not the model's.
    """
    qtype, ftype = _check_file_type(file_type)
    config = model.config
    if len(vocabulary.tokens) != config.vocab_size:
        raise ValueError(
            f"the vocabulary has {len(vocabulary.tokens)} tokens but the model {config.vocab_size} embedding "
            "rows; read it with read_vocabulary(directory, model.config.vocab_size)"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer spools each tensor to a temporary file as it is added, so one tensor is in memory at a time.
    writer = gguf.GGUFWriter(path=None, arch=ARCHITECTURE, use_temp_file=True)
    _add_shape(writer, config, ftype)
    add_vocabulary(writer, vocabulary)
    if isinstance(config.rope_scaling, RopeScaling):
        factors = rope_freq_factors(config.attention_head_dim, config.rope_theta, config.rope_scaling)
        writer.add_tensor(ROPE_FREQS, factors)
    for name, tensor in stored_state(model.state_dict(), config).items():
        weight = tensor.detach().to(device="cpu", dtype=torch.float32)
        if name.endswith("attention.wq.weight"):
            weight = hf_qk_to_gguf(weight, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            weight = hf_qk_to_gguf(weight, config.n_kv_heads)
        data, stored_type = _encode(weight.numpy(), qtype)
        writer.add_tensor(gguf_name(name), data, raw_dtype=stored_type)
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        writer.write_header_to_file(staging)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, path)
    finally:
        writer.close()
        staging.unlink(missing_ok=True)
    return path


def _check_file_type(file_type: str) -> tuple[QType, gguf.LlamaFileType]:
    if file_type not in FILE_TYPES:
        raise ValueError(f"GGUF file type {file_type!r} is not one of {', '.join(FILE_TYPES)}")
    return FILE_TYPES[file_type]


def _add_shape(writer: gguf.GGUFWriter, config: LlamaConfig, ftype: gguf.LlamaFileType) -> None:
    """The `llama.*` keys llama.cpp builds the model from, and the file type."""
    head_dim = config.attention_head_dim
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    if isinstance(config.rope_scaling, LinearRopeScaling):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling.factor)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _encode(array: np.ndarray, qtype: QType) -> tuple[np.ndarray, QType]:
    """A float32 tensor as stored: 1-D ones in F32; matrices in `qtype` (F16 where rows do not split into
    its blocks)."""
    if array.ndim == 1:
        return array, QType.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if array.shape[-1] % block:
        qtype = QType.F16
    return gguf.quants.quantize(array, qtype), qtype


# Reading -------------------------------------------------------------------------------------------------


def load_gguf(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Llama:
    """Read a llama.cpp GGUF file of architecture "llama" into a hermes Llama (module docstring).

    Args:
        path: the .gguf file.
        device: where the parameters go.
        dtype: the parameters' dtype; None: float32, which every GGUF type dequantises to exactly.

    Returns:
        The model, in training mode.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the key or tensor that does not fit: an architecture other than llama, a
            missing or per-layer shape key, RoPE scaling hermes does not compute, tensors missing,
            unexpected, of the wrong shape or of a type gguf cannot dequantise.
    """
    reader = _open(path)
    config = _read_config(reader, Path(path))
    state = _read_tensors(reader, config, Path(path))
    with torch.device("meta"):
        model = Llama(config)
    dtype = torch.float32 if dtype is None else dtype
    model.load_state_dict({n: t.to(device=device, dtype=dtype) for n, t in state.items()}, assign=True)
    return model


def read_gguf_config(path: str | os.PathLike) -> LlamaConfig:
    """The model shape a GGUF file's metadata (and its rope_freqs and output tensors) describe.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the key that does not fit (see `load_gguf`).
    """
    return _read_config(_open(path), Path(path))


def _open(path: str | os.PathLike) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as error:
        raise ValueError(
            f"{path} is not a readable GGUF file ({error}); write or download it again"
        ) from error


class _Metadata:
    """A GGUF file's key-value metadata, with errors that name the file and the key."""

    _REQUIRED = object()

    def __init__(self, reader: gguf.GGUFReader, path: Path) -> None:
        self.reader, self.path = reader, path

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        """The value of `key` (a list for an array), or `default` when the file has no such key."""
        field = self.reader.get_field(key)
        if field is None:
            if default is self._REQUIRED:
                raise ValueError(f"{self.path}: the GGUF metadata lacks {key}, which a Llama needs")
            return default
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            return [_scalar(field.parts[i], field.types[-1]) for i in field.data]
        return _scalar(field.parts[field.data[0]], field.types[0])

    def real(self, key: str, default: Any = _REQUIRED) -> float:
        return _shortest(self.get(key, default))

    def integer(self, key: str, default: Any = _REQUIRED) -> int:
        value = self.get(key, default)
        if not isinstance(value, int):
            raise ValueError(
                f"{self.path}: {key} is {value!r}, not one integer (hermes builds Llamas whose layers all "
                "have the same shape)"
            )
        return value


def _shortest(value: float) -> float:
    """A float32 as the shortest decimal that is that float32: 1e-05, not 9.99999974e-06."""
    return float(str(np.float32(value)))


def _scalar(part: np.ndarray, kind: gguf.GGUFValueType) -> Any:
    """One metadata value from the reader's raw parts: the UTF-8 bytes of a string, else a number."""
    return part.tobytes().decode("utf-8") if kind == gguf.GGUFValueType.STRING else part.tolist()[0]


def _read_config(reader: gguf.GGUFReader, path: Path) -> LlamaConfig:
    meta = _Metadata(reader, path)
    architecture = meta.get("general.architecture")
    if architecture != ARCHITECTURE:
        raise ValueError(
            f"{path}: general.architecture is {architecture!r}; hermes reads Llama GGUF files ({ARCHITECTURE!r})"
        )
    arch = ARCHITECTURE
    dim = meta.integer(f"{arch}.embedding_length")
    n_heads = meta.integer(f"{arch}.attention.head_count")
    head_dim = meta.integer(f"{arch}.attention.key_length", dim // n_heads)
    rope_dims = meta.integer(f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ValueError(
            f"{path}: {arch}.rope.dimension_count is {rope_dims} but heads are {head_dim} wide; hermes rotates "
            "whole heads"
        )
    tensors = {t.name: t for t in reader.tensors}
    embedding = tensors.get(gguf_name("tok_embeddings.weight"))
    tokens = reader.get_field("tokenizer.ggml.tokens")
    rows = len(tokens.data) if tokens is not None else embedding.shape[-1] if embedding is not None else None
    vocab_key = f"{arch}.vocab_size"
    rope_theta = meta.real(f"{arch}.rope.freq_base", 10000.0)
    defaults = LlamaConfig()
    return LlamaConfig(
        dim=dim,
        n_layers=meta.integer(f"{arch}.block_count"),
        n_heads=n_heads,
        n_kv_heads=meta.integer(f"{arch}.attention.head_count_kv", n_heads),
        vocab_size=meta.integer(vocab_key) if rows is None else meta.integer(vocab_key, int(rows)),
        tie_word_embeddings=gguf_name("output.weight") not in tensors,
        hidden_dim=meta.integer(f"{arch}.feed_forward_length"),
        head_dim=None if head_dim == dim // n_heads else head_dim,
        norm_eps=meta.real(f"{arch}.attention.layer_norm_rms_epsilon"),
        rope_theta=rope_theta,
        rope_scaling=_read_rope_scaling(meta, tensors.get(ROPE_FREQS), head_dim, rope_theta),
        max_seq_len=meta.integer(f"{arch}.context_length"),
        bos_token_id=meta.integer("tokenizer.ggml.bos_token_id", defaults.bos_token_id),
        eos_token_id=meta.integer("tokenizer.ggml.eos_token_id", defaults.eos_token_id),
    )


def _read_rope_scaling(
    meta: _Metadata, rope_freqs: gguf.ReaderTensor | None, head_dim: int, theta: float
) -> RopeScaling | LinearRopeScaling | None:
    """The RoPE scaling of `llama.rope.scaling.type` ("none" or "linear") or of the rope_freqs divisors."""
    key = f"{ARCHITECTURE}.rope.scaling.type"
    kind = meta.get(key, "none")
    if kind not in ("none", "linear"):
        raise ValueError(f"{meta.path}: {key} is {kind!r}; hermes computes 'none', 'linear' and Llama 3.1's")
    if kind == "linear":
        if rope_freqs is not None:
            raise ValueError(
                f"{meta.path}: {key} 'linear' and a {ROPE_FREQS} tensor together: hermes computes one"
            )
        return LinearRopeScaling(factor=meta.real(f"{ARCHITECTURE}.rope.scaling.factor"))
    if rope_freqs is None:
        return None
    factors = _dequantize(rope_freqs, meta.path).astype(np.float64).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise ValueError(
            f"{meta.path}: {ROPE_FREQS} has {factors.size} values, expected one per frequency ({head_dim // 2})"
        )
    return _llama3_scaling(factors, head_dim, theta, meta.path)


def _llama3_scaling(
    factors: np.ndarray, head_dim: int, theta: float, path: Path
) -> RopeScaling | LinearRopeScaling | None:
    """The scaling whose per-frequency divisors are `factors` (module docstring): Meta's smoothing band with
    the largest divisor as factor when it fits, else the band fitted to the smoothed frequencies."""
    factor = _shortest(factors.max())
    if np.allclose(factors, factor, rtol=1e-6):
        return None if math.isclose(factor, 1.0, rel_tol=1e-6) else LinearRopeScaling(factor=factor)
    candidates = [RopeScaling(factor=factor)]
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    # Per frequency: 1 where kept, 0 where divided by the factor; in the band between, with low = 1,
    # smooth = context / (wavelen * (high - 1)) - 1 / (high - 1).
    smooth = (1 / factors - 1 / factor) / (1 - 1 / factor)
    band = (smooth > 1e-4) & (smooth < 1 - 1e-4)
    if band.sum() >= 2:
        slope, intercept = np.polyfit(1 / wavelen[band], smooth[band], 1)
        if intercept < 0:
            high = round(float(1 - 1 / intercept), 4)
            context = round(float(-slope / intercept))
            candidates.append(RopeScaling(factor, 1.0, high, context))
    elif band.sum() == 1:
        context = round(float((smooth[band][0] * 3 + 1) * wavelen[band][0]))
        candidates.append(RopeScaling(factor, 1.0, 4.0, context))
    else:  # no frequency smoothed: the longest context whose band still falls below the divided ones
        context = math.ceil(wavelen[smooth < 1e-4].min()) - 1
        candidates.append(RopeScaling(factor, 1.0, 4.0, context))
    for scaling in candidates:
        if np.allclose(rope_freq_factors(head_dim, theta, scaling), factors, rtol=1e-4):
            return scaling
    raise ValueError(
        f"{path}: {ROPE_FREQS} holds frequency divisors that no Llama 3.1 RoPE scaling gives; hermes "
        "computes only that one (and linear)"
    )


def _read_tensors(reader: gguf.GGUFReader, config: LlamaConfig, path: Path) -> dict[str, torch.Tensor]:
    """The hermes state dict of the file's tensors, checked against `config`, q and k back in halves."""
    with torch.device("meta"):
        expected = {n: t.shape for n, t in stored_state(Llama(config).state_dict(), config).items()}
    names = {gguf_name(n): n for n in expected}
    found = {t.name: t for t in reader.tensors if t.name != ROPE_FREQS}
    problems = []
    for theirs, ours in names.items():
        tensor = found.get(theirs)
        shape = tuple(expected[ours])
        if tensor is None:
            problems.append(f"{theirs} is missing (expected shape {shape})")
        elif _shape(tensor) != shape:
            problems.append(f"{theirs} has shape {_shape(tensor)}, expected {shape}")
    problems += [
        f"{n} (shape {_shape(t)}) is not a weight of this model" for n, t in found.items() if n not in names
    ]
    if problems:
        raise ValueError(
            f"GGUF file {path} does not match the model its metadata describes "
            f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(problems)
        )
    state = {}
    for theirs, ours in names.items():
        weight = torch.from_numpy(_dequantize(found[theirs], path).reshape(tuple(expected[ours])).copy())
        if ours.endswith("attention.wq.weight"):
            weight = meta_qk_to_hf(weight, config.n_heads)
        elif ours.endswith("attention.wk.weight"):
            weight = meta_qk_to_hf(weight, config.n_kv_heads)
        state[ours] = weight
    return state


def _shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    """A GGUF tensor's shape in torch order (GGUF lists the fastest-varying dimension first)."""
    return tuple(int(n) for n in reversed(tensor.shape))


def _dequantize(tensor: gguf.ReaderTensor, path: Path) -> np.ndarray:
    try:
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    except NotImplementedError as error:
        raise ValueError(
            f"{path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package "
            "cannot dequantise"
        ) from error
