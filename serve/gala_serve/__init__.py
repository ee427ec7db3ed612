"""gala-serve: an Open Inference Protocol server for gala-scale artifacts (no torch needed)."""

__version__ = "0.1.0"
