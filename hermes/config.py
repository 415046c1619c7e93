"""Run configuration: one dataclass per TOML section, read from a file and `--section.key value` overrides.

The defaults are the embedded tiny example, so a launch script with no arguments trains the tiny model on the
bundled data. Unknown sections or keys, wrong types and values outside a key's choices are errors that name
the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from hermes.data.chat_template import DEFAULT_SYSTEM_PROMPT
from hermes.data.packing import OverlongPolicy
from hermes.model.attention import BACKENDS
from hermes.model.config import PRESETS
from hermes.parallel.activation_checkpointing import MODES as CHECKPOINTING_MODES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _opt(default: Any, help: str, choices: tuple[Any, ...] = (), *, at_least: float | None = None) -> Any:
    """A configuration field: its default, a one-line help, the accepted values (empty: any of its type)
    and, for numbers, the smallest accepted value; both are checked when the value is set."""
    metadata = {"help": help, "choices": tuple(choices), "at_least": at_least}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    recipe: str = _opt(
        "sft", "What the run trains (written into config.toml; set by the launch script).", ("sft", "dpo")
    )
    name: str = _opt("tiny-sft", "Run name; the run directory defaults to runs/<name>.")
    dir: str = _opt("", "Run directory (config.toml, metrics.jsonl, checkpoints/); empty = runs/<name>.")
    seed: int = _opt(0, "Seed of initialisation, shuffling and dropout.")
    allow_changes: list[str] = _opt(
        [],
        "Keys (section.key, or data.cache_key for changed data files) that a resume may change from what "
        "its checkpoint was trained with; the new values are applied and logged. Empty = refuse any change.",
    )


@dataclass
class ModelConfig:
    preset: str = _opt("tiny", "Model shape when starting fresh.", tuple(PRESETS))
    checkpoint: str = _opt("", "Hugging Face or Meta checkpoint directory to fine-tune; empty = fresh init.")
    dtype: str = _opt("float32", "Dtype of the master weights.", ("float32", "bfloat16"))
    attention_backend: str = _opt(
        "auto", "Attention kernel for packed rows (see hermes.model.attention).", BACKENDS
    )


@dataclass
class TokenizerConfig:
    path: str = _opt(
        "", "tokenizer.model / tokenizer.json / directory; empty = the checkpoint's, else Llama 3's."
    )


@dataclass
class DataConfig:
    train: list[str] = _opt(
        [],
        "Training data: JSONL (.jsonl, .jsonl.gz, .jsonl.zst), Parquet or Arrow files, directories "
        "written by datasets' save_to_disk, or dataset repository directories (see hermes.data.sources); "
        "empty = the bundled example.",
    )
    validation: list[str] = _opt(
        [], "Validation data, in the forms data.train takes; its loss is logged as val_loss (empty = none)."
    )
    validation_fraction: float = _opt(
        0.0,
        "Fraction of data.train's records held out of training for validation, chosen by a hash of each "
        "record's position (hermes.data.holdout); 0 = none.",
        at_least=0.0,
    )
    seq_len: int = _opt(1024, "Tokens per packed row.")
    overlong: str = _opt(
        "truncate", "What to do with a sample longer than seq_len.", typing.get_args(OverlongPolicy)
    )
    min_tokens: int = _opt(0, "Drop samples with fewer tokens (0 = no minimum).")
    max_tokens: int = _opt(0, "Drop samples with more tokens before packing (0 = no maximum).")
    drop_refusals: bool = _opt(True, "Drop conversations whose assistant turns contain refusal phrases.")
    mixture: dict[str, float] = _opt({}, "Category -> target share of tokens; empty = the data as it is.")
    cache_dir: str = _opt("", "Where tokenized data is cached; empty = <run dir>/../.cache/tokenized.")
    workers: int = _opt(
        0,
        "Processes that read, filter, render and tokenize data.train on the rank that builds the cache; "
        "0 = one per CPU core it may use. The result does not depend on it.",
        at_least=0,
    )
    chat_template: str = _opt(
        "hermes",
        'How conversations are rendered: "hermes" (the Hermes 3 format), "checkpoint" (model.checkpoint\'s '
        "own tokenizer_config.json chat_template), or the path of a Jinja chat template.",
    )
    default_system_prompt: str = _opt(
        DEFAULT_SYSTEM_PROMPT,
        "System turn of a conversation without one and without tools (the official Hermes 3 template's); "
        "empty = none.",
    )


@dataclass
class OptimConfig:
    name: str = _opt("adamw", "Optimizer.", ("adamw", "rmsprop"))
    lr: float = _opt(5e-3, "Peak learning rate.", at_least=0.0)
    weight_decay: float = _opt(
        0.01, "Decoupled weight decay (AdamW), on matrices only (not norms).", at_least=0.0
    )
    betas: list[float] = _opt([0.9, 0.999], "AdamW betas.")
    eps: float = _opt(1e-8, "Optimizer epsilon.")
    warmup_steps: int = _opt(5, "Linear warmup steps from 0 to the peak learning rate.", at_least=0)
    schedule: str = _opt("cosine", "Decay after warmup.", ("cosine", "linear", "constant"))
    min_lr_ratio: float = _opt(0.0, "Final learning rate as a fraction of the peak.", at_least=0.0)


@dataclass
class TrainConfig:
    epochs: int = _opt(3, "Passes over the data.", at_least=1)
    max_steps: int = _opt(40, "Stop after this many optimizer steps (0 = when the epochs end).", at_least=0)
    global_batch: int = _opt(4, "Packed rows per optimizer step, over all data-parallel ranks.", at_least=1)
    micro_batch: int = _opt(2, "Packed rows per forward/backward on one rank.", at_least=1)
    grad_clip: float = _opt(1.0, "Max global gradient norm (0 = no clipping).", at_least=0.0)
    checkpoint_every: int = _opt(
        20, "Save a checkpoint every this many steps (0 = only at epoch ends).", at_least=0
    )
    keep_checkpoints: int = _opt(
        3,
        "Keep the newest this many checkpoints (0 = all); epoch-end checkpoints are always kept.",
        at_least=0,
    )
    async_checkpoint: bool = _opt(False, "Write checkpoints in the background while training goes on.")
    export_hf: bool = _opt(True, "Write a Hugging Face directory (<run dir>/hf) at the end.")
    eval_every: int = _opt(
        0, "Validation loss every this many steps (0 = only at epoch ends; always at epoch ends).", at_least=0
    )
    export_every_epoch: bool = _opt(
        False,
        "At each epoch end write <run dir>/epochs/epoch-K/hf (LoRA runs: also epochs/epoch-K/adapter).",
    )
    epoch_tasks: list[str] = _opt(
        [],
        "lm-eval tasks each epoch's export is evaluated on during the run, into epochs/epoch-K/lm_eval.json "
        "(needs train.export_every_epoch and lm-eval; rank 0 evaluates while the others wait).",
    )
    epoch_tasks_include: str = _opt(
        "", "A folder of task YAMLs for train.epoch_tasks (lm-eval's include_path)."
    )
    export_fp8: bool = _opt(
        False, "Also write an FP8 (compressed-tensors FP8_DYNAMIC) directory (<run dir>/fp8) at the end."
    )


@dataclass
class ParallelConfig:
    dp_replicate: int = _opt(1, "Data-parallel replicas (HSDP: usually the number of nodes).")
    dp_shard: int = _opt(-1, "FSDP shard group size; -1 = the rest of the world.")
    tp: int = _opt(1, "Tensor-parallel degree (inside a node).", at_least=1)
    cpu_offload: bool = _opt(False, "Keep sharded parameters, gradients and optimizer states in CPU memory.")
    activation_checkpointing: str = _opt("none", "Recompute activations in backward.", CHECKPOINTING_MODES)
    param_dtype: str = _opt(
        "auto",
        "Dtype of compute (FSDP mixed precision); auto = bfloat16 on GPU, float32 on CPU.",
        ("auto", "float32", "bfloat16"),
    )
    reduce_dtype: str = _opt("float32", "Dtype of gradient reduction.", ("float32", "bfloat16"))
    compile: bool = _opt(False, "torch.compile each transformer block.")


@dataclass
class LoraConfig:
    rank: int = _opt(
        0, "LoRA rank r: SFT trains a LoRA adapter when > 0 (0 = all weights); DPO needs one.", at_least=0
    )
    alpha: float = _opt(16.0, "LoRA alpha (scale = alpha / r).")
    dropout: float = _opt(0.05, "Dropout on the adapter input.", at_least=0.0)
    targets: list[str] = _opt(["all-linear"], "Module names to adapt; all-linear = q/k/v/o/gate/up/down.")


@dataclass
class DpoConfig:
    beta: float = _opt(0.1, "DPO temperature beta.", at_least=0.0)
    label_smoothing: float = _opt(0.0, "Conservative DPO label smoothing.", at_least=0.0)
    neftune_alpha: float = _opt(5.0, "NEFTune noise scale (0 = off).", at_least=0.0)


@dataclass
class LoggingConfig:
    wandb: str = _opt("off", "Weights & Biases logging.", ("off", "offline", "online"))
    progress: bool = _opt(True, "A tqdm progress bar on rank 0 (step, epoch, loss, tokens/s, ETA).")
    profile_steps: list[int] = _opt(
        [],
        "Steps (1-based) whose torch profiler trace goes to RUN_DIR/profile/step-N-rank-R.json.",
        at_least=1,
    )
    memory_snapshot_step: int = _opt(
        0,
        "On CUDA, record the allocator's history from the first step and dump it after this step to "
        "RUN_DIR/profile/memory-step-N-rank-R.pickle (pytorch.org/memory_viz); 0 = off.",
        at_least=0,
    )
    showcase_prompts: int = _opt(
        0,
        "SFT: answer this many held-out prompts of the validation split greedily at step 0 and after "
        "training, score and print them with the validation loss (RUN_DIR/showcase.json); 0 = off.",
        at_least=0,
    )


@dataclass
class Config:
    """The SFT run configuration (`launch/sft.py`); DPOConfig adds the [dpo] section."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or f"runs/{self.run.name}")

    def to_toml(self) -> str:
        return tomli_w.dumps(dataclasses.asdict(self))


@dataclass
class DPOConfig(Config):
    """The DPO run configuration (`launch/dpo.py`): SFT's sections and [dpo]."""

    dpo: DpoConfig = field(default_factory=DpoConfig)

    def __post_init__(self) -> None:
        self.run.recipe = "dpo"
        self.lora.rank = 32  # the report's DPO adapter: r 32, alpha 16, dropout 0.05


RECIPES: dict[str, type[Config]] = {"sft": Config, "dpo": DPOConfig}
"""The configuration root of each recipe, by `run.recipe`."""


class ConfigError(ValueError):
    """A configuration file or override that names an unknown key or holds a wrong value."""


def _coerce(key: str, value: Any, annotation: Any, choices: tuple[Any, ...]) -> Any:
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            items = [v for v in value.split(",") if v]
            value = items if item_type is str else [_parse_override_value(v) for v in items]
        elif not isinstance(value, list):
            value = [value]  # `--logging.profile_steps 3`: a list of one
        return [_coerce(key, v, item_type, ()) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} takes a table such as {{a = 0.5, b = 0.5}}, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", v, float, ()) for k, v in value.items()}
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} takes true or false, got {value!r}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    wrong_type = not isinstance(value, annotation) or (annotation is int and isinstance(value, bool))
    if annotation in (int, float, str) and wrong_type:
        raise ConfigError(f"{key} takes {annotation.__name__}, got {value!r}")
    if choices and value not in choices:
        raise ConfigError(f"{key} = {value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def _check_range(key: str, value: Any, at_least: float | None) -> None:
    """A number, or every item of a list of numbers, is at least `at_least`."""
    values = value if isinstance(value, list) else [value]
    if at_least is not None and any(v < at_least for v in values):
        raise ConfigError(f"{key} = {value!r} is out of range: it must be at least {at_least}")


def _parse_override_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply(config: Config, section: str, key: str, value: Any) -> None:
    sections = {f.name: f for f in dataclasses.fields(config)}
    if section not in sections:
        raise ConfigError(
            f"Unknown config section [{section}]; sections are {', '.join(sections)} "
            f"(the {config.run.recipe} configuration)"
        )
    target = getattr(config, section)
    fields = {f.name: f for f in dataclasses.fields(target)}
    if key not in fields:
        raise ConfigError(f"Unknown key {section}.{key}; [{section}] takes {', '.join(fields)}")
    if (section, key) == ("run", "recipe") and value != config.run.recipe:
        raise ConfigError(
            f"run.recipe = {value!r}, but this is the {config.run.recipe} configuration: use "
            f"launch/{value}.py for it"
        )
    hints = typing.get_type_hints(type(target))
    metadata = fields[key].metadata
    coerced = _coerce(f"{section}.{key}", value, hints[key], metadata["choices"])
    _check_range(f"{section}.{key}", coerced, metadata["at_least"])
    setattr(target, key, coerced)


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} not found; pass --config with an existing TOML file")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None


def load_run_config(path: str | Path) -> Config:
    """A run's config.toml, in the configuration of the recipe it records (run.recipe)."""
    recipe = _read_toml(Path(path)).get("run", {}).get("recipe", "sft")
    if recipe not in RECIPES:
        raise ConfigError(f"{path}: run.recipe = {recipe!r} is not one of {', '.join(map(repr, RECIPES))}")
    return load_config(path, recipe=RECIPES[recipe])


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, recipe: type[Config] = Config
) -> Config:
    """Defaults, then the TOML file at `path`, then `--section.key value` overrides (in order).

    Args:
        path: a TOML file, or None for the defaults.
        overrides: `--section.key value` (or `--section.key=value`) items.
        recipe: the configuration root: Config (SFT) or DPOConfig.

    Raises:
        ConfigError: unknown section or key, wrong type, value outside the choices or the range, malformed
            override.
        FileNotFoundError: `path` does not exist.
    """
    config = recipe()
    if path:
        path = Path(path)
        data = _read_toml(path)
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table")
            for key, value in table.items():
                try:
                    _apply(config, section, key, value)
                except ConfigError as err:
                    raise ConfigError(f"{path}: {err}") from None
    args = list(overrides or [])
    while args:
        flag = args.pop(0)
        name = flag[2:] if flag.startswith("--") else ""
        if "=" in name:
            name, text = name.split("=", 1)
        elif args:
            text = args.pop(0)
        else:
            raise ConfigError(f"Override {flag} has no value; write --section.key value")
        if name.count(".") != 1:
            raise ConfigError(f"Override {flag!r} must look like --section.key value (e.g. --optim.lr 1e-5)")
        section, key = name.split(".")
        _apply(config, section, key, _parse_override_value(text))
    return config


def parse_args(argv: list[str], recipe: type[Config] = Config) -> Config:
    """`[--config FILE] [--section.key value ...]` as given to a launch script."""
    argv = list(argv)
    path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a TOML file path")
        path = argv[i + 1]
        del argv[i : i + 2]
    return load_config(path, argv, recipe)
