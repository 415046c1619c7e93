"""Activation checkpointing and compilation of transformer blocks, applied from outside the model.

- "full": every block keeps only its input; its activations are recomputed in backward.
- "selective": every block keeps the outputs of its matmuls and attention (the expensive ops) and
  recomputes the cheap ones (norms, RoPE, SiLU, additions) in backward.

Both replace the block instance's `forward`, so parameter names (and so checkpoints) do not change.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from hermes.model.llama import Llama

MODES = ("none", "full", "selective")

_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward, selective: bool):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        extra = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _selective_policy)}
        return checkpoint(forward, *args, use_reentrant=False, **(extra if selective else {}), **kwargs)

    return run


def apply_activation_checkpointing(model: Llama, mode: str) -> Llama:
    """Checkpoint every block's activations by `mode` (one of MODES), in place."""
    if mode not in MODES:
        raise ValueError(f"Unknown activation checkpointing {mode!r}; choose one of {MODES}")
    if mode != "none":
        for block in model.layers:
            block.forward = _checkpointed(block.forward, selective=mode == "selective")
    return model


def compile_blocks(model: Llama) -> Llama:
    """torch.compile each transformer block (fullgraph off: packed attention may fall back to eager)."""
    for block in model.layers:
        block.compile()
    return model
