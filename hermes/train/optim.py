"""Optimizers and learning-rate schedules.

Weight decay applies to matrices (linear and embedding weights) and not to vectors (RMSNorm weights), the
usual choice: decaying a norm's gain towards 0 only fights the normalisation.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from hermes.config import OptimConfig
from hermes.model.hf import whole_tensor


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed group (ndim >= 2) and an undecayed one (norm weights)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or RMSProp over the model's trainable parameters, fused on CUDA, foreach elsewhere."""
    groups = parameter_groups(model, config.weight_decay if config.name == "adamw" else 0.0)
    if not any(group["params"] for group in groups):
        raise ValueError("The model has no trainable parameters (all have requires_grad=False)")
    on_cuda = all(p.device.type == "cuda" for group in groups for p in group["params"])
    fast = {"fused": True} if on_cuda else {"foreach": True}
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, **fast)
    if config.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=config.lr, eps=config.eps, foreach=True)
    raise ValueError(f"Unknown optimizer {config.name!r}; choose 'adamw' or 'rmsprop'")


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Warmup: (step + 1) / warmup_steps, so the first update already moves and step warmup_steps - 1 is at the
    peak. After warmup, progress p = (step - warmup) / (total - warmup) goes from 0 to just under 1 and
    cosine gives min + (1 - min) * (1 + cos(pi * p)) / 2, linear min + (1 - min) * (1 - p).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"Unknown schedule {schedule!r}; choose 'cosine', 'linear' or 'constant'")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int) -> LambdaLR:
    """Warmup then `config.schedule` decay over `total_steps` optimizer steps."""
    return LambdaLR(
        optimizer,
        lambda step: lr_factor(step, config.warmup_steps, total_steps, config.schedule, config.min_lr_ratio),
    )


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most `max_norm` (0 = only measure); returns the
    norm before clipping.

    Gradients may be DTensors on different meshes (FSDP-only parameters and FSDP x TP ones), which torch's
    clip_grad_norm_ cannot stack together: the norm is taken per mesh, then combined.
    """
    groups: dict[object, list[torch.Tensor]] = {}
    for param in model.parameters():
        if param.grad is not None:
            groups.setdefault(getattr(param.grad, "device_mesh", None), []).append(param.grad)
    squares = 0.0
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        squares += float(whole_tensor(norm)) ** 2
    total = math.sqrt(squares)
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for grads in groups.values():
            torch._foreach_mul_(grads, scale)
    return total


def apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, config: OptimConfig) -> None:
    """Put `config`'s learning rate, betas, eps and weight decay into an optimizer and schedule whose state
    a checkpoint restored with other values (a resume told to apply changed optim.* values). The schedule
    keeps its position; the new peak applies from the current step on."""
    decayed = config.weight_decay if config.name == "adamw" else 0.0
    for index, (group, factor) in enumerate(zip(optimizer.param_groups, scheduler.lr_lambdas)):
        group["initial_lr"] = config.lr
        group["lr"] = config.lr * factor(scheduler.last_epoch)
        group["eps"] = config.eps
        group["weight_decay"] = decayed if index == 0 else 0.0
        if "betas" in group:
            group["betas"] = tuple(config.betas)
    scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
