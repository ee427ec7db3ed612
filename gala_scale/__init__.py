"""gala-scale: long-tailed image classification with the GALA loss and prediction re-balancing."""

__version__ = "0.1.0"
