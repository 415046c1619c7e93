"""Names and layouts of Llama checkpoints: hermes' parameter names (Meta's) <-> Hugging Face's, the q/k row
permutation between Meta's interleaved RoPE pairs and the halves hermes and Hugging Face rotate, and the way
Meta's model-parallel shards split each tensor. Pure tensor and string work: no file is read here
(hermes.model.hf reads and writes the files)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch

from hermes.model.config import LlamaConfig
from hermes.model.llama import TIED_HEAD_WEIGHT

# Per block: hermes (= Meta) module -> Hugging Face module.
_BLOCK_TO_HF = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_TO_HF = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_BLOCK_FROM_HF = {hf: ours for ours, hf in _BLOCK_TO_HF.items()}
_TOP_FROM_HF = {hf: ours for ours, hf in _TOP_TO_HF.items()}
_HERMES_BLOCK = re.compile(r"layers\.(\d+)\.(.+)\.(weight)")
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight)")
_TOP = re.compile(r"(.+)\.(weight)")

# Tensors some files carry that are not weights: Hugging Face's RoPE frequencies (older transformers) and
# Meta's precomputed rope.freqs (Llama 2). hermes recomputes both.
HF_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq")
_META_IGNORED = {"rope.freqs"}

T = TypeVar("T")

# Meta model-parallel shards: ColumnParallelLinear weights are split on dim 0 (output rows),
# RowParallelLinear on dim 1; norms are replicated. The embedding: see `merge_meta_shards`.
_META_CONCAT_DIM = {
    "attention.wq": 0,
    "attention.wk": 0,
    "attention.wv": 0,
    "feed_forward.w1": 0,
    "feed_forward.w3": 0,
    "output": 0,
    "attention.wo": 1,
    "feed_forward.w2": 1,
}


# Names ---------------------------------------------------------------------------------------------------


def hf_name(name: str) -> str:
    """Hugging Face name of a hermes parameter: "layers.0.attention.wq.weight" ->
    "model.layers.0.self_attn.q_proj.weight".

    Raises:
        ValueError: `name` is not a Llama parameter.
    """
    block = _HERMES_BLOCK.fullmatch(name)
    if block and block[2] in _BLOCK_TO_HF:
        return f"model.layers.{block[1]}.{_BLOCK_TO_HF[block[2]]}.{block[3]}"
    top = _TOP.fullmatch(name)
    if top and top[1] in _TOP_TO_HF:
        return f"{_TOP_TO_HF[top[1]]}.{top[2]}"
    raise ValueError(f"{name!r} is not a hermes Llama parameter; it has no Hugging Face name")


def hermes_name(name: str) -> str:
    """hermes (= Meta) name of a Hugging Face Llama parameter; the inverse of `hf_name`.

    Raises:
        ValueError: `name` is not a Hugging Face Llama parameter.
    """
    block = _HF_BLOCK.fullmatch(name)
    if block and block[2] in _BLOCK_FROM_HF:
        return f"layers.{block[1]}.{_BLOCK_FROM_HF[block[2]]}.{block[3]}"
    top = _TOP.fullmatch(name)
    if top and top[1] in _TOP_FROM_HF:
        return f"{_TOP_FROM_HF[top[1]]}.{top[2]}"
    raise ValueError(f"{name!r} is not a Hugging Face Llama parameter")


def hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under Hugging Face names (hermes rotates halves like Hugging Face: no permutation)."""
    return {hf_name(name): tensor for name, tensor in state.items()}


def stored_state(state: Mapping[str, T], config: LlamaConfig) -> dict[str, T]:
    """The entries of a (hermes-named) state dict that a checkpoint stores: all of them, except a tied
    model's `output.weight`, which is the embedding table a second time (`model.state_dict()` holds both
    names; a file holds the table once)."""
    return {n: t for n, t in state.items() if not (config.tie_word_embeddings and n == TIED_HEAD_WEIGHT)}


def from_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under hermes names; RoPE frequency buffers are dropped."""
    return {hermes_name(name): tensor for name, tensor in state.items() if not HF_IGNORED.fullmatch(name)}


def meta_qk_to_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the rows of a Meta q or k weight [n_heads * head_dim, dim] from interleaved RoPE pairs
    (2i, 2i+1) to the halves (i, i + head_dim/2) that hermes and Hugging Face rotate."""
    rows, dim = weight.shape
    head_dim = rows // n_heads
    # [heads, head_dim/2 pairs, 2 members, dim] -> [heads, 2 halves, head_dim/2, dim]
    return weight.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def _module_of(name: str) -> str:
    """The module a parameter belongs to, without block index: layers.3.attention.wq.weight -> attention.wq."""
    block = _HERMES_BLOCK.fullmatch(name)
    if block:
        return block[2]
    top = _TOP.fullmatch(name)
    return top[1] if top else name


def merge_meta_shards(
    shards: Sequence[Mapping[str, torch.Tensor]], files: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Join Meta model-parallel shards (consolidated.00.pth, ...) into full tensors, in Meta names.

    wq/wk/wv/w1/w3/output are concatenated on dim 0, wo/w2 on dim 1, norms taken from the first shard.
    The embedding is split on the vocabulary in Llama 3 (VocabParallelEmbedding: dim 0) and on the width
    in Llama 2 (ParallelEmbedding: dim 1); the replicated final norm's width tells which.

    Args:
        shards: one state dict per model-parallel rank, in rank order.
        files: the shards' file names, for error messages.

    Raises:
        ValueError: listing every tensor the shards do not all hold, or whose pieces do not fit together.
    """
    files = list(files) if files is not None else [f"shard {i}" for i in range(len(shards))]
    if len(shards) == 1:
        return {name: t for name, t in shards[0].items() if name not in _META_IGNORED}
    width = shards[0]["norm.weight"].shape[0] if "norm.weight" in shards[0] else None
    names = [n for n in dict.fromkeys(n for shard in shards for n in shard) if n not in _META_IGNORED]
    merged, problems = {}, []
    for name in names:
        holders = [f for f, shard in zip(files, shards) if name in shard]
        if len(holders) != len(shards):
            problems.append(f"{name} is in {', '.join(holders)} but not in every shard")
            continue
        pieces = [shard[name] for shard in shards]
        module = _module_of(name)
        dim = _META_CONCAT_DIM.get(module)
        if module == "tok_embeddings":
            dim = 1 if width is not None and pieces[0].shape[1] != width else 0
        if dim is None:
            merged[name] = pieces[0]
            continue
        try:
            merged[name] = torch.cat(pieces, dim=dim)
        except RuntimeError:
            shapes = ", ".join(f"{tuple(p.shape)} in {f}" for p, f in zip(pieces, files))
            problems.append(f"{name}: shard pieces {shapes} do not join on dim {dim}")
    if problems:
        raise ValueError("Meta checkpoint shards do not fit together:\n  " + "\n  ".join(problems))
    return merged


def from_meta_state_dict(
    state: Mapping[str, torch.Tensor], n_heads: int, n_kv_heads: int
) -> dict[str, torch.Tensor]:
    """A full (merged) Meta state dict as hermes tensors: the same names, q/k rows permuted to halves."""
    permute = {"attention.wq": n_heads, "attention.wk": n_kv_heads}
    out = {}
    for name, tensor in state.items():
        heads = permute.get(_module_of(name))
        out[name] = meta_qk_to_hf(tensor, heads) if heads else tensor
    return out
