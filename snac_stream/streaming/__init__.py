"""Exact streaming: stateful chunked counterparts of the offline model, and the user-facing ``SNAC``.

``ops`` holds the per-layer mechanism (state objects, conv caches, overlap tails, delay lines, the
quantizer); ``build`` maps offline modules onto it; ``latency`` derives every delay from the ops' emission
counts; ``rows`` handles the batch rows of a state (one per stream, for the engines); ``codec`` gives the
chunked encoder and decoder, whose pushes of whole units run on CUDA as replays of a CUDA graph (``units``, on
``graphs``, which the engines use too); ``snac`` the model class that offers them.
"""

from .codec import StreamingDecoder, StreamingEncoder
from .snac import SNAC

__all__ = ["SNAC", "StreamingEncoder", "StreamingDecoder"]
