"""mixsd: inject new knowledge into causal language models with Mixed Contextual Self-Distillation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mixsd")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
