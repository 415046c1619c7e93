"""The Llama model: configuration, modules, checkpoint formats."""

from hermes.model.config import LinearRopeScaling, LlamaConfig, RopeScaling
from hermes.model.llama import Llama

__all__ = ["LinearRopeScaling", "Llama", "LlamaConfig", "RopeScaling"]
