from pathlib import Path

import pytest

from hermes.config import Config, ConfigError, load_config, parse_args

CONFIGS = Path(__file__).resolve().parent.parent / "launch" / "configs"


@pytest.mark.parametrize(
    ("name", "lr", "global_batch"),
    [("llama3.1-8b", 7e-6, 48), ("llama3.1-70b", 7e-6, 48), ("llama3.1-405b", 3.5e-6, 128)],
)
def test_paper_presets_hold_the_report_recipe(name, lr, global_batch):
    config = load_config(CONFIGS / f"{name}.toml")
    assert config.model.preset == name
    assert config.optim.name == "adamw" and config.optim.lr == lr and config.optim.weight_decay == 0.01
    assert config.optim.warmup_steps == 300 and config.optim.schedule == "cosine"
    assert config.train.epochs == 4 and config.train.global_batch == global_batch
    assert config.data.seq_len == 8192


def test_the_tiny_file_is_the_embedded_default_with_its_showcase():
    config = load_config(CONFIGS / "tiny.toml")
    # Only the default run holds records out and shows its answers on them (hermes.train.showcase).
    assert config.data.validation_fraction == 0.05 and config.logging.showcase_prompts == 50
    config.data.validation_fraction, config.logging.showcase_prompts = 0.0, 0
    assert config == Config()


def test_overrides_apply_after_the_file_with_types_checked():
    config = parse_args(
        [
            "--config",
            str(CONFIGS / "llama3.1-8b.toml"),
            "--optim.lr",
            "1e-5",
            "--data.train",
            "a.jsonl,b.jsonl",
        ]
    )
    assert config.optim.lr == 1e-5 and config.data.train == ["a.jsonl", "b.jsonl"]
    assert config.train.global_batch == 48
    assert parse_args(["--data.mixture", "{math = 0.7, coding = 0.3}"]).data.mixture == {
        "math": 0.7,
        "coding": 0.3,
    }
    assert parse_args(["--train.export_hf=false"]).train.export_hf is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optim.lr", "fast"], "optim.lr takes float, got 'fast'"),
        (["--optim.momentum", "0.9"], "Unknown key optim.momentum; [optim] takes name, lr,"),
        (["--training.epochs", "1"], "Unknown config section [training]; sections are run, model,"),
        (["--parallel.activation_checkpointing", "half"], "'half' is not one of 'none', 'full', 'selective'"),
        (["--train.epochs", "2.5"], "train.epochs takes int, got 2.5"),
        (["--train.export_hf", "1"], "train.export_hf takes true or false, got 1"),
        (["--optim.lr"], "Override --optim.lr has no value"),
        (["optim.lr", "1"], "must look like --section.key value"),
    ],
)
def test_bad_overrides_name_the_key_and_what_it_accepts(argv, message):
    with pytest.raises(ConfigError) as error:
        parse_args(argv)
    assert message in str(error.value)


def test_a_bad_file_is_reported_with_its_path(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[optim]\nlr = 'high'\n")
    with pytest.raises(ConfigError, match=r"run.toml: optim.lr takes float"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="missing.toml not found"):
        load_config(tmp_path / "missing.toml")


def test_resolved_config_round_trips_through_toml(tmp_path):
    config = parse_args(["--optim.lr", "3e-4", "--data.mixture", "{math = 1.0}"])
    path = tmp_path / "config.toml"
    path.write_text(config.to_toml())
    assert load_config(path) == config


def test_every_launch_config_parses_in_its_recipe_and_dpo_sections_stay_out_of_sft():
    from hermes.config import DPOConfig

    for path in CONFIGS.glob("*.toml"):
        recipe = DPOConfig if path.name.startswith("dpo") else Config
        config = load_config(path, recipe=recipe)
        assert config.run.recipe == ("dpo" if recipe is DPOConfig else "sft")
        assert (config.lora.rank > 0) == (recipe is DPOConfig), path.name
    with pytest.raises(ConfigError, match=r"Unknown config section \[dpo\].*\(the sft configuration\)"):
        parse_args(["--dpo.beta", "0.2"])
    assert parse_args(["--dpo.beta", "0.2"], DPOConfig).dpo.beta == 0.2
