"""The Llama 3.1 model: configuration, modules, checkpoint formats."""

from hermes.model.config import LlamaConfig, RopeScaling
from hermes.model.llama import Llama

__all__ = ["Llama", "LlamaConfig", "RopeScaling"]
