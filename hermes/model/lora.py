"""LoRA (low-rank adapters) on the Llama block projections, saved and loaded in PEFT's file layout.

An adapted projection, e.g. `layers.0.attention.wq`, becomes a `LoRALinear` that keeps the original
`nn.Linear` as its child `base` and adds two Linears beside it:

    y = base(x) + (alpha / r) * lora_B(lora_A(lora_dropout(x)))     # lora_A: [r, in], lora_B: [out, r]

So the state dict names are `layers.0.attention.wq.base.weight` (frozen), `layers.0.attention.wq.lora_A.weight`
and `layers.0.attention.wq.lora_B.weight`. A tensor-parallel plan for an adapted model names
`attention.wq.base` where it named `attention.wq` (only an `nn.Linear` can be parallelised) and says how
`lora_A` / `lora_B` are split. `LoRALinear.weight` is the base weight, so `Llama.init_weights` still
initialises the base projections of an adapted model built on the meta device; `init_lora_weights`
initialises the adapters.

On disk (`save_adapter` / `load_adapter`) the layout is PEFT's: adapter_config.json plus
adapter_model.safetensors with keys `base_model.model.<Hugging Face module>.lora_A.weight`, which
`peft.PeftModel.from_pretrained` loads on top of the `transformers` model that `hermes.model.hf` exports.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from hermes.model.hf import (
    StoredTensor,
    check_against,
    full_cpu,
    hermes_name,
    hf_name,
    is_dtensor,
    is_writer,
    open_safetensors,
    read_json,
    whole_tensor,
)

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""PEFT's prefix before the Hugging Face name of a module in adapter_model.safetensors."""

# The projections of a block, hermes name -> Hugging Face name (accepted as an alias).
TARGETS = {
    "wq": "q_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "o_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
}
ALL_LINEAR = "all-linear"
_ALIASES = {**{name: name for name in TARGETS}, **{hf: ours for ours, hf in TARGETS.items()}}
_LORA_KEY = re.compile(r"(.+)\.(lora_A|lora_B)\.weight")

# adapter_config.json keys of PEFT features this implementation does not have: set, they would change the
# adapter's function (or its tensors), so loading refuses them rather than computing something else.
_UNSUPPORTED_PEFT_KEYS = (
    "use_rslora",
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "exclude_modules",
    "modules_to_save",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
)


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update: base(x) + (alpha / r) * B(A(dropout(x))).

    A starts kaiming-uniform (a = sqrt(5)) and B at zero, so the layer starts equal to its base. Dropout
    acts on the adapter's input in training mode only. With `disabled` set (see `adapter_disabled`) the
    layer computes its base alone.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        """
        Args:
            base: the projection to adapt; kept as the child `base`, its parameters frozen.
            rank: r, the inner width of the update.
            alpha: the update is scaled by alpha / r.
            dropout: probability of zeroing an adapter input element in training mode, in [0, 1).

        Raises:
            ValueError: rank is not a positive integer, or dropout is outside [0, 1).
        """
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.disabled = False
        self.base = base.requires_grad_(False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.reset_lora_parameters()

    @property
    def weight(self) -> nn.Parameter:
        """The base weight (so code that initialises or reads `module.weight` works on an adapted model)."""
        return self.base.weight

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A kaiming-uniform (a = sqrt(5)), B zeros: the update starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight, (alpha / r) * B @ A, whole and in float32 (sharded adapters are gathered:
        they are small)."""
        lora_a, lora_b = (whole_tensor(linear.weight).float() for linear in (self.lora_A, self.lora_B))
        return (lora_b @ lora_a) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.disabled:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, disabled={self.disabled}"


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """The model's LoRA layers with their module names, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]


def _resolve_targets(targets: str | Sequence[str]) -> set[str]:
    """hermes module names (wq, ...) for target names, Hugging Face aliases and "all-linear"."""
    names = [targets] if isinstance(targets, str) else list(targets)
    unknown = [name for name in names if name != ALL_LINEAR and name not in _ALIASES]
    if unknown or not names:
        valid = ", ".join([ALL_LINEAR, *TARGETS, *TARGETS.values()])
        what = f"unknown LoRA target{'s' if len(unknown) > 1 else ''} {unknown}" if unknown else "no targets"
        raise ValueError(f"{what}; valid names: {valid}")
    if ALL_LINEAR in names:
        return set(TARGETS)
    return {_ALIASES[name] for name in names}


def apply_lora(
    model: nn.Module,
    rank: int = 32,
    alpha: float = 16.0,
    dropout: float = 0.05,
    targets: str | Sequence[str] = (ALL_LINEAR,),
) -> nn.Module:
    """Replace the targeted block projections of `model` by `LoRALinear`s, in place, and freeze the rest.

    Works on a model on the meta device too: then materialise it (`to_empty`), initialise the base
    (`init_weights` or a checkpoint) and call `init_lora_weights(model)`.

    Args:
        model: a hermes Llama (or any module whose projections are named like its blocks').
        rank: r.
        alpha: the update is scaled by alpha / r (r 32, alpha 16: 0.5).
        dropout: dropout probability on the adapters' input, in training mode.
        targets: module names: wq, wk, wv, wo, w1, w2, w3, their Hugging Face names q_proj, k_proj, v_proj,
            o_proj, gate_proj, down_proj, up_proj, or "all-linear" (all seven in every block; never the
            output head).

    Returns:
        `model`, with only the LoRA parameters requiring gradients.

    Raises:
        ValueError: an unknown target name (the valid ones are listed), a bad rank or dropout, or a model
            that already has LoRA layers.
    """
    wanted = _resolve_targets(targets)
    if lora_layers(model):
        raise ValueError("The model already has LoRA layers; apply_lora once (merge_lora first to re-apply)")
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in wanted
    ]
    if not chosen:
        raise ValueError(f"No nn.Linear of the model is named {sorted(wanted)}; nothing to adapt")
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(module, rank, alpha, dropout))
    for name, param in model.named_parameters():
        param.requires_grad_(_LORA_KEY.fullmatch(name) is not None)
    return model


def init_lora_weights(model: nn.Module) -> None:
    """Initialise every adapter in place (A kaiming-uniform, B zeros), e.g. after `to_empty`."""
    for _, layer in lora_layers(model):
        layer.reset_lora_parameters()


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every LoRA layer computes its base alone: the model is its own frozen reference (DPO).

    Raises:
        ValueError: the model has no LoRA layers (the "reference" would silently be the policy).
    """
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError("adapter_disabled: the model has no LoRA layers; apply_lora (or load_adapter) first")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base, W += (alpha / r) * B @ A, and put the base Linear back in place.

    The sum is formed in float32 and rounded once to the weight's dtype. The result has the module tree
    and state dict names of the plain model (so `hermes.model.hf.save_pretrained` exports it); its
    parameters stay frozen.

    Raises:
        ValueError: the model is sharded (DTensor parameters); merge it with
            `hermes.parallel.materialize.merge_lora_into_shards`, or merge an unsharded copy, e.g. one built
            with `hf.load_pretrained(base)` and `load_adapter(model, adapter)`.
    """
    for name, layer in lora_layers(model):
        weight = layer.base.weight
        if is_dtensor(weight):
            raise ValueError(
                f"merge_lora: {name}.base.weight is sharded (DTensor); use "
                "hermes.parallel.materialize.merge_lora_into_shards, or merge an unsharded model"
            )
        weight.copy_(weight.float() + layer.delta_weight())
    return unwrap_lora(model)


def unwrap_lora(model: nn.Module) -> nn.Module:
    """Put each LoRA layer's base Linear back in its place (the adapters are dropped, merged or not)."""
    for name, layer in lora_layers(model):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    return model


# PEFT layout ---------------------------------------------------------------------------------------------


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under their state dict names (`layers.0.attention.wq.lora_A.weight`, ...);
    DTensors stay DTensors."""
    return {name: t for name, t in model.state_dict().items() if _LORA_KEY.fullmatch(name)}


def peft_key(name: str) -> str:
    """PEFT's key of a LoRA tensor: "layers.0.attention.wq.lora_A.weight" ->
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".

    Raises:
        ValueError: `name` is not a LoRA tensor of a Llama projection.
    """
    match = _LORA_KEY.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a LoRA tensor (<module>.lora_A.weight or <module>.lora_B.weight)")
    module = hf_name(f"{match[1]}.weight").removesuffix(".weight")
    return f"{PEFT_PREFIX}{module}.{match[2]}.weight"


def hermes_lora_key(key: str) -> str:
    """The state dict name of a PEFT LoRA key; the inverse of `peft_key`.

    Raises:
        ValueError: `key` is not a PEFT LoRA key of a Llama projection.
    """
    match = _LORA_KEY.fullmatch(key.removeprefix(PEFT_PREFIX))
    if not key.startswith(PEFT_PREFIX) or match is None:
        raise ValueError(f"{key!r} is not a PEFT LoRA key ({PEFT_PREFIX}<module>.lora_A.weight)")
    module = hermes_name(f"{match[1]}.weight").removesuffix(".weight")
    return f"{module}.{match[2]}.weight"


def _adapter_settings(model: nn.Module) -> dict:
    """r, lora_alpha, lora_dropout and target_modules (Hugging Face names) of the model's LoRA layers."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA layers; apply_lora (or load_adapter) first")
    settings = {(layer.rank, layer.alpha, getattr(layer.lora_dropout, "p", 0.0)) for _, layer in layers}
    if len(settings) > 1:
        raise ValueError(
            f"The model's LoRA layers differ in (rank, alpha, dropout): {sorted(settings)}; "
            "adapter_config.json holds one setting for all"
        )
    ((rank, alpha, dropout),) = settings
    present = {name.rpartition(".")[2] for name, _ in layers}
    return {
        "r": rank,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": [hf for ours, hf in TARGETS.items() if ours in present],
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str = "") -> None:
    """Write the adapters in PEFT's layout: adapter_config.json and adapter_model.safetensors.

    `peft.PeftModel.from_pretrained(transformers_model, directory)` loads them. DTensor parameters
    (FSDP / TP) are gathered; then every rank must call this, and only rank 0 writes.

    Args:
        model: a model with LoRA layers (all of one rank, alpha and dropout).
        directory: created with its parents if missing; existing adapter files are replaced.
        base_model_name_or_path: recorded in the config (the Hugging Face name or directory of the base).

    Raises:
        ValueError: the model has no LoRA layers, or layers of different settings.
    """
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        **_adapter_settings(model),
        "bias": "none",
        "base_model_name_or_path": base_model_name_or_path,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {peft_key(name): full_cpu(t) for name, t in lora_state_dict(model).items()}
    if not is_writer():
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def _read_adapter_config(path: Path) -> dict:
    config = read_json(path, "a PEFT adapter directory needs it beside adapter_model.safetensors")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}; only 'LORA' adapters load here")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(
                f"{path} has no {key!r}; a LoRA adapter config needs r, lora_alpha, target_modules"
            )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"{path}: bias is {config['bias']!r}; only 'none' is supported (adapters without bias)"
        )
    for key in _UNSUPPORTED_PEFT_KEYS:
        if config.get(key):
            raise ValueError(
                f"{path} sets {key} = {config[key]!r}, a PEFT feature hermes LoRA does not implement; "
                "use an adapter trained without it"
            )
    return config


def _check_matches(model: nn.Module, config: dict, path: Path) -> None:
    """The model's existing LoRA layers have the config's r and lora_alpha."""
    want = (config["r"], float(config["lora_alpha"]))
    have = sorted({(layer.rank, layer.alpha) for _, layer in lora_layers(model)})
    if have != [want]:
        raise ValueError(
            f"{path} says r = {want[0]}, lora_alpha = {want[1]:g}, but the model's LoRA layers have "
            f"(r, alpha) {have}; load into a model without LoRA (load_adapter applies the config's)"
        )


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Read a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) into `model`.

    A model without LoRA layers gets them first, with the config's r, lora_alpha, lora_dropout and
    target_modules (`apply_lora`). DTensor parameters (FSDP / TP) receive their shard of each tensor;
    then every rank must call this.

    Args:
        model: a hermes Llama, adapted or not.
        directory: the adapter directory (as written by `save_adapter` or by PEFT).

    Returns:
        `model`, with only the LoRA parameters requiring gradients.

    Raises:
        FileNotFoundError: the directory or one of its two files is missing.
        ValueError: the config is unreadable or describes something else (key named), or the tensors are
            missing, unexpected or of the wrong shape (each named with its file and shapes); a model that
            had no LoRA layers then keeps the freshly applied (untrained) ones.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Adapter directory {directory} does not exist")
    config_path = directory / ADAPTER_CONFIG_FILE
    config = _read_adapter_config(config_path)
    weights_path = directory / ADAPTER_WEIGHTS_FILE
    if not weights_path.exists():
        raise FileNotFoundError(
            f"{weights_path} is missing: it holds the adapter's tensors; copy it beside {ADAPTER_CONFIG_FILE} "
            "or save the adapter again"
        )
    if lora_layers(model):
        _check_matches(model, config, config_path)
    else:
        targets = config["target_modules"]
        targets = targets if isinstance(targets, str) else [t.rpartition(".")[2] for t in targets]
        try:
            apply_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), targets)
        except ValueError as err:
            raise ValueError(f"{config_path}: {err}") from err
    ours = lora_state_dict(model)
    stored: dict[str, StoredTensor] = {}
    unexpected: list[StoredTensor] = []
    with open_safetensors(weights_path) as handle:
        keys = handle.keys()
        for key in keys:
            entry = StoredTensor(key, tuple(handle.get_slice(key).get_shape()), ADAPTER_WEIGHTS_FILE)
            try:
                stored[hermes_lora_key(key)] = entry
            except ValueError:
                unexpected.append(entry)
        check_against(
            {name: t.shape for name, t in ours.items()},
            stored,
            unexpected,
            peft_key,
            lambda _: f"{ADAPTER_WEIGHTS_FILE} holds no such tensor",
            directory,
        )
        state = {name: _placed_like(handle.get_tensor(stored[name].name), t) for name, t in ours.items()}
    model.load_state_dict(state, strict=False)
    return model


def _placed_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` in the dtype of `like`, distributed like it if `like` is a DTensor."""
    tensor = tensor.to(like.dtype)
    if not is_dtensor(like):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor.to(like.device_mesh.device_type), like.device_mesh, like.placements)
