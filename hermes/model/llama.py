"""Llama 3.x in plain PyTorch: RMSNorm, grouped-query attention with scaled RoPE, SwiGLU, and an output head
that is its own weight (Llama 3.1) or the embedding table (tied, Llama 3.2 1B / 3B).

The model knows nothing of processes or meshes; hermes.parallel shards it from outside. Module names follow
Meta's checkpoints (tok_embeddings, layers.N.attention.wq, ...), which is also what the parallel plans name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from hermes.model.attention import KVCache, attention, masked_attention
from hermes.model.config import LlamaConfig
from hermes.model.inputs import IGNORE_INDEX, Packing
from hermes.model.rope import RopeCache, apply_rope

if TYPE_CHECKING:
    from torch.nn.modules.module import _IncompatibleKeys

LOGPROB_CHUNK_TOKENS = 1024
"""Tokens per chunk when computing label log-probabilities: bounds the float32 logits alive at once."""

KEEP_LOGITS_BYTES = 2**30
"""Up to this many bytes of float32 logits (all labelled tokens of a forward) are kept for backward;
beyond it each chunk is recomputed in backward instead (one more output-projection matmul per chunk)."""

TIED_HEAD_WEIGHT = "output.weight"
"""In a tied model, the state-dict name under which the embedding table appears a second time. Checkpoints
store the table once, under the embedding's name (as transformers writes no lm_head.weight), and
`Llama.load_state_dict` accepts a state without it."""


class _RMSNormFunction(torch.autograd.Function):
    """x * r * weight with r = rsqrt(mean(x^2) + eps) per row, float32, with its backward written out.

    torch's rms_norm is one fused kernel (forward and backward) on CUDA; elsewhere it is six ops, and
    autograd differentiates each (about a dozen passes over x in backward). This keeps r from forward and
    computes both gradients from it: with n = x r and u = g * weight,
    dx = r (u - n mean(u n)), dweight = the sum over rows of g n.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(torch.linalg.vecdot(x, x).unsqueeze(-1) / x.shape[-1] + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        normed = x * rstd
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed).sum(dim=tuple(range(grad.dim() - 1)))
        if ctx.needs_input_grad[0]:
            scaled = grad * weight
            mean = torch.linalg.vecdot(scaled, normed).unsqueeze(-1) / x.shape[-1]
            grad_x = scaled.addcmul_(normed, mean, value=-1).mul_(rstd)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps), computed in float32, cast back, times a learned weight.

    On float32 inputs and weight the cast is the identity and the norm is one op: torch's fused rms_norm on
    CUDA, `_RMSNormFunction` elsewhere. Other dtypes keep the cast before the product (one rounding of the
    normalised x, then one of the product), as Meta's and Hugging Face's implementations round.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if x.is_cuda:
                return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.to(x.dtype) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, attention_backend: str = "auto") -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.attention_head_dim
        self.backend = attention_backend
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        cache: KVCache | None = None,
        layer_id: int = 0,
    ) -> torch.Tensor:
        """Self-attention of x [batch, seq, dim], rotated by the RoPE tables cos, sin [batch, seq, head_dim]
        of `rope_cos_sin`; with `cache`, over the cached positions of layer `layer_id` as well (the cache's
        step must have begun, see `KVCache.begin`)."""
        batch, seq, _ = x.shape
        # -1 rather than n_heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(batch, seq, -1, self.head_dim)  # [batch, seq, heads, head_dim]
        k = self.wk(x).view(batch, seq, -1, self.head_dim)  # [batch, seq, kv_heads, head_dim]
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = attention(q, k, v, cu_seqlens, max_seqlen, backend=self.backend)
        else:
            k, v = cache.update(layer_id, k, v)  # [batch, cached + seq, kv_heads, head_dim]
            out = masked_attention(q, k, v, cache.mask)
        return self.wo(out.reshape(batch, seq, -1))

    def init_weights(self, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=out_std)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, out_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, mean=0.0, std=0.02)
        for linear in (self.w2, self.w3):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=out_std)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, config: LlamaConfig, attention_backend: str = "auto") -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, attention_backend)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cu_seqlens, max_seqlen, cache, self.layer_id)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self) -> None:
        # Depth-scaled init of the projections that write into the residual stream.
        out_std = 0.02 / math.sqrt(2 * (self.layer_id + 1))
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(out_std)
        self.feed_forward.init_weights(out_std)


class _LabelLogSoftmax(torch.autograd.Function):
    """log_softmax(logits)[i, labels[i]] of float32 logits [tokens, vocab] that nothing else uses, computed
    in their own buffer: the log-softmax is written over the logits and kept for backward, where it becomes
    the logits' gradient in place, g * (onehot(label) - softmax). `F.cross_entropy` computes the same
    through four buffers of that size (the log-softmax, nll's zero-filled gradient, the log-softmax
    gradient, besides the logits); with a large vocabulary each is a pass over memory, and on CPU a fresh
    one of that size is first paged in, zeroed by the kernel.

    The buffer is returned as the first output (an input modified in place must be), for no use: its
    gradient is not taken. A second backward through the same graph fails on the saved log-softmax, which
    the first one overwrote.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # In place: torch's log-softmax kernels (CPU and CUDA) reduce a row, then write each value from itself.
        logprobs = torch.log_softmax(logits, dim=-1, out=logits)
        ctx.mark_dirty(logits)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logprobs, labels)
        return logprobs, logprobs.gather(1, labels[:, None]).squeeze(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, _: None, grad: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:
        if grad is None:
            return None, None
        logprobs, labels = ctx.saved_tensors
        grad_logits = logprobs.exp_().mul_(-grad[:, None])
        return grad_logits.scatter_add_(1, labels[:, None], grad[:, None]), None


class OutputHead(nn.Linear):
    """The output projection, dim -> vocab. `chunk_logprobs` gives log p(label) for a chunk of
    tokens; a parallel plan may swap in a subclass that computes it on a vocabulary-sharded weight."""

    def chunk_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """hidden [tokens, dim], labels [tokens] (token ids, none IGNORE_INDEX) -> float32
        log-probabilities [tokens]."""
        return _LabelLogSoftmax.apply(self(hidden).float(), labels)[1]

    def chunks_add_no_buffers(self) -> bool:
        """Whether `chunk_logprobs` allocates nothing but the float32 logits it works in: true when the
        weight is float32 (the cast is the identity and the log-softmax is written over the logits)."""
        return self.weight.dtype == torch.float32


class Llama(nn.Module):
    """Llama 3.x decoder.

    Build a large model without memory on the meta device, then materialise and initialise it:

        with torch.device("meta"):
            model = Llama(LlamaConfig.preset("llama3.1-405b"))
        model.to_empty(device="cuda")   # usually after sharding
        model.init_weights()

    A model built on a real device is initialised at construction.
    """

    def __init__(self, config: LlamaConfig, attention_backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(i, config, attention_backend) for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = OutputHead(config.dim, config.vocab_size, bias=False)
        self.rope = RopeCache(config.attention_head_dim, config.rope_theta, config.rope_scaling)
        self.tie_weights()
        self.register_load_state_dict_post_hook(_tie_after_load)
        if self.output.weight.device.type != "meta":
            self.init_weights()

    def tie_weights(self) -> None:
        """With `config.tie_word_embeddings`, make the output head's weight the embedding table: one
        Parameter under two names, so one gradient (the sum of both uses) and one optimizer state.

        Called at construction, by `to_empty` and after every `load_state_dict` (whose assign=True gives
        each name a Parameter of its own); call it again after anything else that replaces either
        Parameter.
        """
        if self.config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def to_empty(self, *, device: torch.device | str | int | None, recurse: bool = True) -> Llama:
        """`nn.Module.to_empty`, the head staying tied (leaving the meta device gives each name a new
        Parameter)."""
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    def set_attention_backend(self, backend: str) -> None:
        """Route every block's attention through `backend` (see hermes.model.attention.BACKENDS)."""
        for layer in self.layers:
            layer.attention.backend = backend

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter in place (after `to_empty` for a model built on meta)."""
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=1.0)
        for layer in self.layers:
            layer.init_weights()
        self.norm.reset_parameters()
        if self.config.tie_word_embeddings:
            return  # the head is the embedding table, initialised above
        bound = 3 * self.config.dim**-0.5
        nn.init.trunc_normal_(self.output.weight, mean=0.0, std=self.config.dim**-0.5, a=-bound, b=bound)

    def new_cache(
        self,
        batch: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        padding: Sequence[int] | torch.Tensor | None = None,
    ) -> KVCache:
        """An empty KV cache for incremental decoding of `batch` rows of up to `max_len` positions.

        Args:
            batch: rows.
            max_len: positions per row (prompt plus generated tokens, left padding included).
            dtype, device: of the cached keys and values; default those of the model's parameters.
            padding: left-padding positions of each row (prompts of different lengths), default none.

        Raises:
            ValueError: max_len exceeds the model's context, or a bad `padding` (see `KVCache.empty`).
        """
        if max_len > self.config.max_seq_len:
            raise ValueError(
                f"a KV cache of {max_len} positions exceeds the model's context of {self.config.max_seq_len}; "
                "shorten the prompt or the number of new tokens"
            )
        weight = self.output.weight
        return KVCache.empty(
            layers=len(self.layers),
            batch=batch,
            max_len=max_len,
            kv_heads=self.config.n_kv_heads,
            head_dim=self.config.attention_head_dim,
            dtype=dtype or weight.dtype,
            device=device or weight.device,
            padding=padding,
        )

    def hidden_states(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states [batch, seq, dim] (see `forward` for the arguments)."""
        batch, seq = tokens.shape
        # An upper bound on the positions when it is known without reading them (see RopeCache.cos_sin):
        # positions that restart at each packed sample stay below the row length.
        bound = seq if cu_seqlens is not None else None
        if cache is not None:
            if cu_seqlens is not None:
                raise ValueError(
                    "a KV cache takes one sequence per row; packed rows (cu_seqlens) are not supported"
                )
            cache.begin(seq)
            if position_ids is None:
                position_ids, bound = cache.positions(seq), cache.length + seq
        if position_ids is None:
            if cu_seqlens is not None:
                raise ValueError("packed rows (cu_seqlens) need position_ids that restart at each sample")
            position_ids, bound = torch.arange(seq, device=tokens.device).expand(batch, seq), seq
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope.cos_sin(position_ids, bound)  # [batch, seq, head_dim] each, shared by the blocks
        for layer in self.layers:
            h = layer(h, cos, sin, cu_seqlens, max_seqlen, cache)
        if cache is not None:
            cache.end(seq)
        return self.norm(h)

    def forward(
        self,
        tokens: torch.Tensor,
        packing: Packing | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab], or, given `labels`, their log-probabilities.

        Args:
            tokens: [batch, seq] token ids.
            packing: where packed samples start and end (position ids, cu_seqlens, max_seqlen in one
                object, as `hermes.data.packing.PackedBatch.packing` gives it); or pass the three below.
            position_ids: [batch, seq]; for packed rows they restart at 0 at each sample (so stay below seq).
            cu_seqlens: int32 cumulative sample offsets into the flattened batch*seq tokens (packed rows).
            max_seqlen: longest sample in the batch (fused kernels use it).
            labels: [batch, seq] target ids, already shifted (the target of position t), IGNORE_INDEX where
                untrained. When given, the result is the float32 log-probability of each target, [batch, seq]
                (0 where ignored), computed in chunks so full float32 logits never exist at once.
            cache: a `KVCache` (see `new_cache`) for incremental decoding: `tokens` are the next positions of
                each row; they attend to the cached ones and are added to the cache. position_ids default to
                the cache positions counted from each row's first real token.
        """
        if packing is not None:
            position_ids, cu_seqlens, max_seqlen = (
                packing.position_ids,
                packing.cu_seqlens,
                packing.max_seqlen,
            )
        hidden = self.hidden_states(tokens, position_ids, cu_seqlens, max_seqlen, cache)
        if labels is None:
            return self.output(hidden)
        return label_logprobs(hidden, self.output, labels)


def _tie_after_load(model: Llama, incompatible: _IncompatibleKeys) -> None:
    """`load_state_dict` post-hook: re-tie the head, and let a tied model's state leave out its alias."""
    model.tie_weights()
    if model.config.tie_word_embeddings and TIED_HEAD_WEIGHT in incompatible.missing_keys:
        incompatible.missing_keys.remove(TIED_HEAD_WEIGHT)


def label_logprobs(
    hidden: torch.Tensor, output: OutputHead, labels: torch.Tensor, chunk_tokens: int = LOGPROB_CHUNK_TOKENS
) -> torch.Tensor:
    """log p(label) for every position, [batch, seq] float32, 0 where the label is IGNORE_INDEX.

    Only labelled positions go through the output projection (in SFT most prompt tokens carry no label, and
    the 128,256-wide head is the largest matmul of a small model). The projection and the float32 softmax
    run `chunk_tokens` at a time; under autograd, when the float32 logits of all labelled tokens would
    exceed KEEP_LOGITS_BYTES, each chunk is recomputed in backward instead of kept, so an 8192 x 128256 row
    never holds its float32 logits at once.

    Chunks bound the buffers that one chunk's forward and backward add to its logits. When the logits are
    kept for backward and the head adds none (`OutputHead.chunks_add_no_buffers`: a float32 head), chunks
    would save no memory, only split the projection and its weight gradient into smaller matmuls (on CPU
    two chunks of 1,024 tokens take about 12% longer than one of 2,048), so all labelled tokens run as one.
    """
    batch, seq, dim = hidden.shape
    flat_labels = labels.reshape(-1)
    positions = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    selected_hidden = hidden.reshape(-1, dim).index_select(0, positions)
    selected_labels = flat_labels.index_select(0, positions)
    vocab = output.weight.shape[0]
    recompute = torch.is_grad_enabled() and positions.numel() * vocab * 4 > KEEP_LOGITS_BYTES
    if torch.is_grad_enabled() and not recompute and output.chunks_add_no_buffers():
        chunk_tokens = max(positions.numel(), 1)
    pieces = []
    for start in range(0, positions.numel(), chunk_tokens):
        h, y = selected_hidden[start : start + chunk_tokens], selected_labels[start : start + chunk_tokens]
        if recompute:
            pieces.append(checkpoint(output.chunk_logprobs, h, y, use_reentrant=False))
        else:
            pieces.append(output.chunk_logprobs(h, y))
    # Built as [batch, seq] (not a view of a flat tensor): FSDP warns about views returned from forward.
    logprobs = torch.zeros(batch, seq, dtype=torch.float32, device=hidden.device)
    if not pieces:
        # Nothing labelled (e.g. an all-padding row): still a result connected to every parameter, since
        # under data parallelism each rank must run a full backward for the gradient collectives.
        first = output.chunk_logprobs(hidden.reshape(-1, dim)[:1], flat_labels.new_zeros(1))
        return logprobs + 0.0 * first.sum()
    return logprobs.index_put((positions // seq, positions % seq), torch.cat(pieces))
