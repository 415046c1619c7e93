"""Supervised fine-tuning entry point (the recipe reads top to bottom in hermes/train/sft.py).

    torchrun --standalone --nproc_per_node 2 launch/sft.py [--config FILE] [--section.key value ...]

With no --config it uses launch/configs/tiny.toml: the tiny Llama 3.1 on the bundled example data.
"""

import sys
from pathlib import Path

from hermes.cli import run_cli, with_default_config
from hermes.train.sft import main

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.toml"

if __name__ == "__main__":
    run_cli(main, with_default_config(sys.argv[1:], DEFAULT_CONFIG))
