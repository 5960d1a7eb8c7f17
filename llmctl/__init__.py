"""llmctl: take a language model from a checkpoint to a served, evaluated, priced deployment."""

__version__ = "0.1.0"
