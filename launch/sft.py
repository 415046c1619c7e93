"""Supervised fine-tuning entry point.

    torchrun --standalone --nproc_per_node 2 launch/sft.py [--config FILE] [--section.key value ...]

With no arguments it trains the tiny Llama 3.1 on the bundled example data (see launch/configs/).
"""

from hermes.train.sft import main

if __name__ == "__main__":
    main()
