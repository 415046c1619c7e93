"""Activation memory of hermes' Llama, term by term: what autograd keeps per token, and the output head.

Each `Term` is a tensor (or a group of same-sized tensors) that a forward keeps for backward, in bytes per
token, and whether tensor parallelism splits it. The lists follow `hermes.model.llama` op by op; they were
checked against autograd's saved-tensor hooks and against measured peaks (`hermes.planning.measure`).
a is the byte width of an activation (the compute dtype), d the model width, H / KV the query / key-value
heads of width hd, F the SwiGLU width, k the LoRA rank.

Per block, by activation checkpointing mode (`hermes.parallel.activation_checkpointing`):
  none:      each RMSNorm keeps its float32 input and 1/rms (4d + 4) and, below float32, its normalised
             output (a d); the product with the norm weight (a d) is kept by the projections it feeds; q
             and k after RoPE and v, a(H + 2KV)hd, and the attention output a H hd with its float32
             log-sum-exp 4H are kept by the flash-style kernel (O(seq): no seq x seq matrix); w1 out,
             silu(w1 out), w3 out and the gated product, 4aF. The residual stream itself is not kept (the
             norms keep float32 copies of it).
  selective: the block input and the outputs of every matmul and attention kernel: q, k, v, attention
             output and log-sum-exp, wo out, w1 out, w3 out, w2 out: a(3d + (2H + 2KV)hd + 2F) + 4H.
  full:      the block input, a d.
LoRA (all seven projections) with dropout keeps, per projection, its dropped input (a per input feature),
CUDA's boolean dropout mask (1 per input feature; CPU keeps a float mask, a) and A's rank-k output (a k);
the frozen projections keep no input, so the two "norm x weight" products and the gated product give way to
the dropped copies. Without dropout only the A outputs are added. The norms' weights are frozen too, so
they keep no normalised output. Selective checkpointing also keeps the A and B outputs.
Tensor parallelism (sequence parallel, `hermes.parallel.tensor_parallel`) divides everything by tp except
the sequence-gathered inputs of the column-parallel projections (the "norm x weight" products), the
partial sums that wo and w2 produce before their reduce-scatter (kept under selective) and the LoRA
tensors (the adapters are not parallelised).

Around the blocks, until the head's backward: the final norm (4d + 4 + a d; it gathers the sequence under
tp), the labelled hidden states that enter the head (a d), RoPE cos/sin (8 hd) and token ids, labels and
positions (24 bytes).

The output head (`hermes.model.llama.label_logprobs`) runs c = LOGPROB_CHUNK_TOKENS labelled tokens at a
time. When the float32 logits of all n labelled tokens fit in KEEP_LOGITS_BYTES, every chunk's float32
log-softmax is kept from forward to backward (4nV) and a chunk's backward adds the gradient from the loss
and the gradient of the logits (8cV); beyond that size each chunk is recomputed in backward, where its
log-softmax and the two gradients coexist (12cV). The head's weight gradient appears after the first
chunk's backward peak and adds to the later chunks' (less, when kept, the first chunk's freed log-softmax).
Without tensor parallelism a float32 head whose logits are kept runs all n as one chunk and adds no buffer
to them (`OutputHead.chunks_add_no_buffers`): 4nV, and its weight gradient beside them at the end.
The planner takes the worst case over n up to the micro-batch's tokens (the largest n that is still kept is
usually worse than recomputing). Loss parallelism splits the vocabulary, so all of it divides by tp.
"""

from __future__ import annotations

from dataclasses import dataclass

from hermes.model.config import LlamaConfig
from hermes.model.llama import KEEP_LOGITS_BYTES, LOGPROB_CHUNK_TOKENS

CHECKPOINTING = ("none", "full", "selective")
LORA_PROJECTIONS = 7


@dataclass(frozen=True)
class Term:
    """One kept tensor (or group of tensors), in bytes per token, and whether tensor parallelism splits it."""

    name: str
    bytes_per_token: float
    tp_sharded: bool = True

    def total(self, tokens: int, tp: int) -> float:
        return self.bytes_per_token * tokens / (tp if self.tp_sharded else 1)


def total(terms: list[Term], tokens: int, tp: int) -> float:
    """Bytes of `terms` for `tokens` tokens on one of `tp` tensor-parallel ranks."""
    return sum(term.total(tokens, tp) for term in terms)


def lora_inputs(c: LlamaConfig) -> int:
    """Sum of the input widths of a block's seven projections: q, k, v, w1, w3 (d), wo (H hd), w2 (F)."""
    return 5 * c.dim + c.n_heads * c.attention_head_dim + c.hidden_dim


def lora_outputs(c: LlamaConfig) -> int:
    """Sum of the output widths of a block's seven projections."""
    return (c.n_heads + 2 * c.n_kv_heads) * c.attention_head_dim + 2 * c.dim + 2 * c.hidden_dim


def _norm(which: str, d: int, a: int, trained: bool, tp_sharded: bool = True) -> list[Term]:
    """An RMSNorm keeps its float32 input and 1/rms; below float32 (a < 4) also its normalised output when
    its weight trains, which float32's one-op norm recomputes in backward instead."""
    terms = [Term(f"{which}: float32 input and 1/rms", 4 * d + 4, tp_sharded)]
    return [*terms, Term(f"{which}: normalised output", a * d, tp_sharded)] if trained and a < 4 else terms


def block_terms(
    c: LlamaConfig, checkpointing: str, a: int, lora_rank: int = 0, lora_dropout: float = 0.0
) -> list[Term]:
    """What one block keeps for backward, per token.

    Args:
        c: the model shape.
        checkpointing: one of CHECKPOINTING.
        a: bytes of an activation element (the compute dtype).
        lora_rank: 0 for full fine-tuning, else the rank of LoRA on all seven projections.
        lora_dropout: the adapters' dropout probability (above 0 keeps dropped copies and masks).
    """
    d, hd, F, H, KV = c.dim, c.attention_head_dim, c.hidden_dim, c.n_heads, c.n_kv_heads
    adapters = a * LORA_PROJECTIONS * lora_rank
    if checkpointing == "full":
        return [Term("block input", a * d)]
    if checkpointing == "selective":
        terms = [
            Term("block input", a * d),
            Term("q, k, v projections", a * (H + 2 * KV) * hd),
            Term("attention output and log-sum-exp", a * H * hd + 4 * H),
            Term("wo and w2 outputs", 2 * a * d, tp_sharded=False),
            Term("w1 and w3 outputs", 2 * a * F),
        ]
        if lora_rank:
            terms.append(Term("LoRA A and B outputs", adapters + a * lora_outputs(c), tp_sharded=False))
        return terms
    dropped = lora_rank > 0 and lora_dropout > 0
    product = [] if dropped else [Term("projection input (norm x weight)", a * d, tp_sharded=False)]
    terms = [
        *_norm("attention_norm", d, a, trained=not lora_rank),
        *product,
        Term("q and k after RoPE, v", a * (H + 2 * KV) * hd),
        Term("attention output and log-sum-exp", a * H * hd + 4 * H),
        *_norm("ffn_norm", d, a, trained=not lora_rank),
        *product,
        Term("w1 out, silu(w1 out), w3 out", 3 * a * F),
    ]
    if dropped:
        terms.append(Term("LoRA dropped inputs and masks", (a + 1) * lora_inputs(c), tp_sharded=False))
    else:
        terms.append(Term("gated product", a * F))
    if lora_rank:
        terms.append(Term("LoRA A outputs", adapters, tp_sharded=False))
    return terms


def persistent_terms(c: LlamaConfig) -> list[Term]:
    """Kept through the whole backward: RoPE tables and the micro-batch's ids."""
    return [
        Term("RoPE cos and sin (float32)", 8 * c.attention_head_dim, tp_sharded=False),
        Term("token ids, labels, positions (int64)", 24, tp_sharded=False),
    ]


def around_block_terms(c: LlamaConfig, a: int, lora: bool = False) -> list[Term]:
    """Kept outside the blocks until the head's backward: final norm, head input, RoPE, ids."""
    return [
        *_norm("final norm", c.dim, a, trained=not lora, tp_sharded=False),
        Term("labelled hidden states (head input)", a * c.dim, tp_sharded=False),
        *persistent_terms(c),
    ]


def head_peak(vocab: int, tokens: int, tp: int, weight_grad: float, float32: bool) -> tuple[float, float]:
    """The output head's backward peak, worst case over the number of labelled tokens up to `tokens` (see the
    module docstring): (bytes of log-softmax outputs and gradients, bytes of the head's weight gradient
    alive at that moment).

    Args:
        vocab: vocabulary size V.
        tokens: tokens of the micro-batch (the most that can be labelled).
        tp: tensor-parallel ranks (loss parallelism splits the vocabulary).
        weight_grad: bytes of the head's unsharded weight gradient (0 when the head is frozen). The first
            chunk's backward creates it after its own peak, so it adds to the peaks of the later chunks.
        float32: whether the head computes in float32.
    """
    c = LOGPROB_CHUNK_TOKENS
    kept = min(tokens, KEEP_LOGITS_BYTES // (4 * vocab))
    last = kept - (kept - 1) // c * c  # tokens of the last chunk, the first one backward runs
    if float32 and tp == 1:
        keep = (4 * kept * vocab, weight_grad)
    else:
        keep = (
            (4 * kept + 8 * min(c, kept)) * vocab / tp,
            max(0.0, weight_grad - 4 * last * vocab / tp) if kept > c else 0.0,
        )
    recompute = (12 * min(c, tokens) * vocab / tp, weight_grad if tokens > c else 0.0)
    if tokens > kept and sum(recompute) > sum(keep):
        return recompute
    return keep
