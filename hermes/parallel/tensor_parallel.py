"""Tensor parallelism for Llama on DTensor, with sequence parallelism and loss parallelism.

The plan, per module (the residual stream between blocks is sharded on the sequence dimension):

| module                               | style                                                          |
|--------------------------------------|----------------------------------------------------------------|
| tok_embeddings                       | rowwise (vocabulary-sharded table), output sharded on sequence |
| layers.N.attention_norm, ffn_norm    | sequence parallel                                              |
| layers.N.attention, feed_forward     | gather the sequence before the projections                     |
| layers.N.attention.wq / wk / wv      | colwise (each rank holds heads / tp query and kv heads)        |
| layers.N.attention.wo                | rowwise, output reduce-scattered back to sequence shards       |
| layers.N.feed_forward.w1 / w3        | colwise                                                        |
| layers.N.feed_forward.w2             | rowwise, output reduce-scattered back to sequence shards       |
| norm                                 | gathers the sequence (packed label positions index all of it)   |
| output                               | colwise (vocabulary-sharded): log-probabilities by loss parallel|

Both the rowwise embedding and the colwise head shard their [vocab, dim] weight on the vocabulary
(`Shard(0)`), so a tied table (`tie_word_embeddings`) stays one DTensor serving both.

Attention sees the whole sequence of its local heads, so packed rows (cu_seqlens, restarting positions)
work as they do without tensor parallelism.

A LoRA-adapted projection (`hermes.model.lora.LoRALinear`) is parallelised on its `base` as above, and its
adapter so that the update lands in the base output's layout:

| base     | lora_A                                            | lora_B                                      |
|----------|---------------------------------------------------|---------------------------------------------|
| colwise  | colwise (rank split), output all-gathered         | colwise: output columns match the base's    |
| rowwise  | rowwise (input split), reduce-scattered on sequence| replicated, applied per token (sequence shards)|

Colwise adapters split the LoRA rank, so it must divide by tp.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from hermes.data.sample import IGNORE_INDEX
from hermes.model.llama import Llama, OutputHead
from hermes.model.lora import LoRALinear


class LossParallelOutputHead(OutputHead):
    """The output head with a vocabulary-sharded weight: log p(label) comes from a softmax computed across
    the shards (torch's loss_parallel), so no rank gathers the 128,256-wide logits.

    Forward and backward must run inside `torch.distributed.tensor.parallel.loss_parallel()`, which is
    not re-entrant and must also cover the backward pass (the head's log-probabilities are recomputed
    there): `loss_context(model)` enters it around each micro-batch's forward and backward."""

    def chunk_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self(hidden)  # a DTensor sharded on the vocabulary
        losses = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
        return -losses.full_tensor()

    def chunks_add_no_buffers(self) -> bool:
        return False  # F.cross_entropy's log-softmax and gradients, beside the logits


def loss_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """The context a micro-batch's forward and backward run in: loss parallelism when the model's output
    head is vocabulary-sharded, else nothing."""
    head = getattr(model, "output", None)
    return loss_parallel() if isinstance(head, LossParallelOutputHead) else contextlib.nullcontext()


def check_divisible(model: Llama, tp: int) -> None:
    """Heads, kv heads and the FFN width must split evenly over the tp ranks."""
    config = model.config
    for what, count in (
        ("n_heads", config.n_heads),
        ("n_kv_heads", config.n_kv_heads),
        ("hidden_dim", config.hidden_dim),
    ):
        if count % tp:
            raise ValueError(
                f"Tensor parallelism tp={tp} needs {what} ({count}) divisible by it; choose parallel.tp among the "
                f"divisors of {count}"
            )


def _projection_plan(block: torch.nn.Module, name: str, colwise: bool) -> dict[str, ParallelStyle]:
    """The styles of one projection: the Linear itself, or a LoRA layer's base and adapter."""
    base = ColwiseParallel() if colwise else RowwiseParallel(output_layouts=Shard(1))
    if not isinstance(block.get_submodule(name), LoRALinear):
        return {name: base}
    if colwise:
        adapter = {
            "lora_A": ColwiseParallel(output_layouts=Replicate()),
            "lora_B": ColwiseParallel(),
        }
    else:
        adapter = {
            "lora_A": RowwiseParallel(output_layouts=Shard(1)),
            "lora_B": SequenceParallel(use_local_output=True),
        }
    return {f"{name}.base": base, **{f"{name}.{part}": style for part, style in adapter.items()}}


def _check_lora_rank(model: Llama, tp: int) -> None:
    ranks = {layer.rank for layer in model.modules() if isinstance(layer, LoRALinear)}
    bad = sorted(rank for rank in ranks if rank % tp)
    if bad:
        raise ValueError(
            f"Tensor parallelism tp={tp} splits the LoRA rank of column-parallel adapters, but the rank "
            f"{bad[0]} is not divisible by it; choose lora.rank as a multiple of {tp}"
        )


def apply_tensor_parallel(model: Llama, tp_mesh: DeviceMesh) -> Llama:
    """Shard `model` over `tp_mesh` by the plan in the module docstring (in place; before FSDP)."""
    check_divisible(model, tp_mesh.size())
    _check_lora_rank(model, tp_mesh.size())
    # Some styles (SequenceParallel) re-create parameters as trainable; a frozen base must stay frozen.
    trainable = {name: param.requires_grad for name, param in model.named_parameters()}
    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
            ),
            "output": ColwiseParallel(
                input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False
            ),
        },
    )
    # Each style distributed its module's weight on its own: make the tied head the embedding's DTensor again.
    model.tie_weights()
    model.output.__class__ = LossParallelOutputHead
    for block in model.layers:
        plan = {
            "attention_norm": SequenceParallel(),
            # Attention's inputs: x, cos, sin, cu_seqlens, max_seqlen, cache, layer_id; only x is sharded.
            "attention": PrepareModuleInput(
                input_layouts=(Shard(1), *[None] * 6), desired_input_layouts=(Replicate(), *[None] * 6)
            ),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
        }
        for name in ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"):
            plan |= _projection_plan(block, name, colwise=True)
        for name in ("attention.wo", "feed_forward.w2"):
            plan |= _projection_plan(block, name, colwise=False)
        parallelize_module(block, tp_mesh, plan)
    for name, param in model.named_parameters():
        param.requires_grad_(trainable[name])
    return model
