"""Offline SNAC model: layers, quantizer, checkpoints. Streaming builds on these modules."""

from .checkpoint import CheckpointError
from .snac import SNACModel

__all__ = ["SNACModel", "CheckpointError"]
