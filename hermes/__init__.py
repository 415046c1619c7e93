"""hermes: fine-tune Llama 3.1 the way the Hermes 3 technical report describes, on raw PyTorch."""

__version__ = "0.1.0"
