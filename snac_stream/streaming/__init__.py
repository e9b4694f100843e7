"""Exact streaming: stateful chunked counterparts of the offline model.

``ops`` holds the per-layer mechanism (state objects, conv caches, overlap tails, delay lines);
``build`` maps offline modules onto it; ``codec`` gives the user-facing encoder and decoder.
"""

from .codec import StreamingDecoder, StreamingEncoder

__all__ = ["StreamingEncoder", "StreamingDecoder"]
