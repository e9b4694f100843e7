"""snac-stream: real-time streaming SNAC codec.

``SNAC`` is the offline model (checkpoint-compatible with the official weights); ``SNAC.streaming_encoder``
and ``SNAC.streaming_decoder`` give exact chunked counterparts.
"""

from .config import HUB_IDS, PRESETS, SNACConfig
from .model import SNAC, CheckpointError
from .streaming import StreamingDecoder, StreamingEncoder
from .tokens import InterleavedLayout, OrpheusLayout, TokenLayout, get_layout

__version__ = "0.1.0"
__all__ = [
    "SNAC", "SNACConfig", "PRESETS", "HUB_IDS", "CheckpointError",
    "StreamingEncoder", "StreamingDecoder",
    "TokenLayout", "OrpheusLayout", "InterleavedLayout", "get_layout",
    "__version__",
]
