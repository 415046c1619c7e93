"""Data: the Llama 3 tokenizer, Hermes ChatML rendering, record readers and filters, packing, loading."""

from hermes.data.chat import ChatFormat
from hermes.data.conversation import Conversation, Message, PreferencePair
from hermes.data.sample import IGNORE_INDEX, Sample
from hermes.data.tokenizer import Tokenizer

__all__ = ["IGNORE_INDEX", "ChatFormat", "Conversation", "Message", "PreferencePair", "Sample", "Tokenizer"]
