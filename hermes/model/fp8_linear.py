"""FP8 simulation for evaluation: the block projections of a Llama swapped for `FP8Linear`s, which compute as
an FP8_DYNAMIC checkpoint is served (hermes.model.fp8): float8 weights with per-channel scales, each input
token quantised to float8 with its own scale, the product accumulated in float32.

    model = apply_fp8(load_model(directory))   # or load_model(directory, fp8=True)

Only the seven projections of every block (wq, wk, wv, wo, w1, w2, w3, as hermes.model.lora names them)
are swapped; the embedding, the norms and the output head compute as before, in the model's dtype. The
module tree keeps its names: `layers.0.attention.wq` is an `FP8Linear` whose buffers are `weight`
(float8_e4m3fn [out, in]) and `weight_scale` (float32 [out, 1]).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from hermes.model.fp8 import FP8_DTYPE, dequantize, quantize_per_token, quantize_weight, scaled_matmul
from hermes.model.hf import is_dtensor
from hermes.model.lora import TARGETS, lora_layers, merge_lora

QuantizedWeight = tuple[torch.Tensor, torch.Tensor]
"""(float8_e4m3fn weight [out, in], scale [out, 1]), as an FP8 checkpoint stores a projection."""


class FP8Linear(nn.Module):
    """y = FP8(x) @ W_fp8.T with per-token scales on x and per-channel scales on W (no bias).

    A dtype cast of the module (`.to(torch.bfloat16)`, `.float()`) leaves the float8 weight and its float32
    scale exactly as they are; the output takes the input's dtype. Device moves apply as usual.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor) -> None:
        """
        Args:
            weight: float8_e4m3fn [out, in].
            weight_scale: [out, 1], any floating dtype (kept as float32, which holds every bfloat16,
                float16 and float32 scale exactly).

        Raises:
            ValueError: a weight that is not float8_e4m3fn, or a scale of another shape than [out, 1].
        """
        super().__init__()
        if weight.dtype != FP8_DTYPE or weight.dim() != 2:
            raise ValueError(
                f"FP8Linear needs a 2-D float8_e4m3fn weight, got {weight.dtype} {tuple(weight.shape)}"
            )
        if tuple(weight_scale.shape) != (weight.shape[0], 1):
            raise ValueError(
                f"FP8Linear needs one scale per output channel, shape ({weight.shape[0]}, 1); "
                f"got {tuple(weight_scale.shape)}"
            )
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.float())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """The FP8 layer of a bias-free `nn.Linear`, its weight quantised per channel (scale in the weight's
        dtype, as the FP8 export stores it).

        Raises:
            ValueError: the Linear has a bias, or a sharded (DTensor) weight.
        """
        if linear.bias is not None:
            raise ValueError("FP8Linear has no bias; the Llama projections it replaces have none")
        if is_dtensor(linear.weight):
            raise ValueError(
                "FP8 simulation needs an unsharded model; load it with hermes.generate.load_model"
            )
        return cls(*quantize_weight(linear.weight.detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, self.in_features)  # [tokens, in]
        x_fp8, x_scale = quantize_per_token(tokens)
        out = scaled_matmul(x_fp8, x_scale, self.weight, self.weight_scale, x.dtype)  # [tokens, out]
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """weight * weight_scale [out, in], in `dtype`."""
        return dequantize(self.weight, self.weight_scale, dtype)

    def _apply(self, fn, recurse=True):
        # Casts touch only floating-point tensors: the buffers cross as integer views of their bytes.
        self.weight, self.weight_scale = self.weight.view(torch.uint8), self.weight_scale.view(torch.int32)
        try:
            return super()._apply(fn, recurse)
        finally:
            self.weight = self.weight.view(FP8_DTYPE)
            self.weight_scale = self.weight_scale.view(torch.float32)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3fn"


def fp8_projections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The block projections FP8 quantises (`layers.N.attention.wq` ... `layers.N.feed_forward.w3`), with
    their module names, in module order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if name.startswith("layers.") and name.rpartition(".")[2] in TARGETS
    ]


@torch.no_grad()
def apply_fp8(model: nn.Module, stored: Mapping[str, QuantizedWeight] | None = None) -> nn.Module:
    """Swap every block projection of `model` for an `FP8Linear`, in place; LoRA adapters are merged first.

    Args:
        model: an unsharded hermes Llama (adapted or not); projections already in FP8 stay as they are.
        stored: module name -> (float8 weight, scale) to use as they are (an FP8 checkpoint's own, see
            hermes.model.fp8_checkpoint); every other projection is quantised from its weight.

    Returns:
        `model`.

    Raises:
        ValueError: a sharded (DTensor) model, or a projection with a bias.
    """
    stored = stored or {}
    if lora_layers(model):
        merge_lora(model)
    for name, module in fp8_projections(model):
        if isinstance(module, FP8Linear):
            continue
        if name in stored:
            layer = FP8Linear(*stored[name]).to(module.weight.device)
        else:
            layer = FP8Linear.from_linear(module)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return model
