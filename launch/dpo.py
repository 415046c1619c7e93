"""DPO entry point (LoRA adapter; the reference model is the same weights with the adapter off; the recipe
reads top to bottom in hermes/train/dpo.py).

    torchrun --standalone --nproc_per_node 2 launch/dpo.py [--config FILE] [--section.key value ...]

With no --config it uses launch/configs/dpo-tiny.toml: the tiny model exported by the default SFT run
(runs/tiny-sft/hf; run launch/sft.py first) trained on the bundled preference pairs.
"""

import sys
from pathlib import Path

from hermes.cli import run_cli, with_default_config
from hermes.train.dpo import main

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "dpo-tiny.toml"

if __name__ == "__main__":
    run_cli(main, with_default_config(sys.argv[1:], DEFAULT_CONFIG))
