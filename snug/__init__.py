"""snug: fine-tune large language models inside the memory you have."""

__version__ = "0.1.0"
