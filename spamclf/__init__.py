"""spamclf: fine-tune GPT-2 into a text classifier with Lightning and Hydra."""

__version__ = "0.1.0"
