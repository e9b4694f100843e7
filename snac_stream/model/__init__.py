"""Offline SNAC model: layers, quantizer, checkpoints. Streaming builds on these modules."""

from .checkpoint import CheckpointError
from .snac import SNAC

__all__ = ["SNAC", "CheckpointError"]
