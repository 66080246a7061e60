"""llmkit: from your own raw text to a trained, evaluated and exported language model."""

__version__ = "0.1.0"
