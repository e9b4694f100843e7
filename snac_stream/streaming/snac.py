"""``SNAC``, the user-facing codec: the offline model with its exact streaming encoder and decoder.

The offline model (layers, quantizer, ``encode`` / ``decode``, checkpoints) is ``model.snac.SNACModel`` and
knows nothing of streaming; this subclass adds the two streaming constructors on top, so dependencies point
one way (streaming -> model). It adds no modules: state-dict keys and checkpoints are the offline model's,
and ``SNAC.from_pretrained`` / ``SNAC.from_config`` return a ``SNAC``.
"""

from __future__ import annotations

from typing import Optional

from ..model.snac import SNACModel
from .codec import StreamingDecoder, StreamingEncoder


class SNAC(SNACModel):
    """Multi-Scale Neural Audio Codec: offline ``encode`` / ``decode`` and their streaming counterparts.

    Takes the reference ``snac.SNAC`` keyword arguments plus ``noise_mode``, ``noise_seed``, ``backend`` and
    ``precision`` (see :class:`SNACModel`). Audio is (B, 1, T) float at ``sampling_rate``; codes are a list of
    ``n_codebooks`` int64 tensors (B, T_i), coarse first. ``streaming_encoder()`` / ``streaming_decoder()``
    give stateful chunked counterparts of ``encode`` / ``decode``, exact against them for any chunking.
    """

    def streaming_encoder(self, batch_size: int = 1, backend: Optional[str] = None,
                          push_mode: str = "auto") -> StreamingEncoder:
        """A stateful encoder for ``batch_size`` independent streams: (B, 1, n) samples in, codes out.
        ``push_mode``: "auto" replays CUDA graphs for whole-unit pushes on CUDA, "eager" never does
        (``streaming.codec``)."""
        return StreamingEncoder(self, batch_size=batch_size, backend=backend, push_mode=push_mode)

    def streaming_decoder(self, batch_size: int = 1, lookahead_samples: Optional[int] = None,
                          backend: Optional[str] = None, push_mode: str = "auto") -> StreamingDecoder:
        """A stateful decoder for ``batch_size`` independent streams: codes in, (B, 1, n) samples out;
        ``lookahead_samples`` is its latency dial (``None``: exact); ``push_mode`` as for the encoder."""
        return StreamingDecoder(self, batch_size=batch_size, lookahead_samples=lookahead_samples, backend=backend,
                                push_mode=push_mode)
