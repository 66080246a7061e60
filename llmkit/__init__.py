"""llmkit: from your own raw text to a trained, evaluated and exported language model."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmkit")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"
