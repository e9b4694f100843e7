"""snac-stream: real-time streaming SNAC codec.

``SNAC`` is the codec (checkpoint-compatible with the official weights): offline ``encode`` / ``decode``, and
``SNAC.streaming_encoder`` / ``SNAC.streaming_decoder``, their exact chunked counterparts.
"""

from .config import HUB_IDS, PRESETS, SNACConfig
from .model import CheckpointError
from .streaming import SNAC, StreamingDecoder, StreamingEncoder
from .tokens import InterleavedLayout, OrpheusLayout, TokenLayout, get_layout

__version__ = "0.1.0"
__all__ = [
    "SNAC", "SNACConfig", "PRESETS", "HUB_IDS", "CheckpointError",
    "StreamingEncoder", "StreamingDecoder",
    "TokenLayout", "OrpheusLayout", "InterleavedLayout", "get_layout",
    "__version__",
]
