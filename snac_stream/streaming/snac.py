"""``SNAC``, the user-facing codec: the offline model with its exact streaming encoder and decoder.

The offline model (layers, quantizer, ``encode`` / ``decode``, checkpoints) is ``model.snac.SNACModel`` and
knows nothing of streaming; this subclass adds the two streaming constructors on top, so dependencies point
one way (streaming -> model). It adds no modules: state-dict keys and checkpoints are the offline model's,
and ``SNAC.from_pretrained`` / ``SNAC.from_config`` return a ``SNAC``.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from ..config import check_non_negative_int
from ..model.snac import SNACModel
from .codec import StreamingDecoder, StreamingEncoder
from .graphs import ShapeGraphs, model_stamp


@dataclasses.dataclass
class _Offline:
    """A model's offline graphs, and where its parameters live (``SNACModel._parameter_places``): reading
    them at every call takes about 10 us and sees a parameter replaced rather than updated."""
    places: List[Tuple[nn.Module, str]]
    graphs: Optional[ShapeGraphs] = None

    def parameters(self) -> List[nn.Parameter]:
        return [module._parameters[name] for module, name in self.places]  # type: ignore[misc]


# Offline calls of more audio samples than this (batch x samples: about 95 s at 44.1 kHz for one row) run
# eagerly: they are not launch-bound, and a graph keeps its intermediates' memory reserved (on an H100, offline
# calls of 64 x 10 s left 51 GiB in graph pools, and the next call ran out of memory).
OFFLINE_GRAPH_MAX_SAMPLES = 2**22

# Kept outside the module so that copying or pickling a model leaves them behind.
_OFFLINE: "weakref.WeakKeyDictionary[SNAC, _Offline]" = weakref.WeakKeyDictionary()


class SNAC(SNACModel):
    """Multi-Scale Neural Audio Codec: offline ``encode`` / ``decode`` and their streaming counterparts.

    Takes the reference ``snac.SNAC`` keyword arguments plus ``noise_mode``, ``noise_seed``, ``backend`` and
    ``precision`` (see :class:`SNACModel`) and ``offline_graphs``. Audio is (B, 1, T) float at
    ``sampling_rate``; codes are a list of ``n_codebooks`` int64 tensors (B, T_i), coarse first.
    ``streaming_encoder()`` / ``streaming_decoder()`` give stateful chunked counterparts of ``encode`` /
    ``decode``, exact against them for any chunking.

    ``offline_graphs`` (default 4): on CUDA, the second ``encode`` or ``decode`` of the same input shape
    captures a CUDA graph of the call and later calls of that shape replay it: the same kernels on the same
    inputs, so the same outputs, without the launch cost of each kernel (a batch-1 call is launch-bound). Up
    to this many shapes keep their graphs (the GPU memory of their intermediates stays reserved); 0 turns it
    off. Calls that autograd records (grad enabled and parameters that require it), ``noise_mode="torch"``
    decodes and calls of more than ``OFFLINE_GRAPH_MAX_SAMPLES`` audio samples (batch x samples) always run
    eagerly.
    """

    def __init__(self, *args: Any, offline_graphs: int = 4, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.offline_graphs = offline_graphs

    @property
    def offline_graphs(self) -> int:
        """How many input shapes of offline calls keep a CUDA graph (0: none)."""
        return self._offline_graphs

    @offline_graphs.setter
    def offline_graphs(self, shapes: int) -> None:
        self._offline_graphs = check_non_negative_int("offline_graphs", shapes)

    def _run_offline(self, name: str, fn: Any, inputs: List[torch.Tensor]) -> Any:
        offline = _OFFLINE.get(self)
        if offline is None:
            offline = _OFFLINE[self] = _Offline(self._parameter_places())
        parameters = offline.parameters()
        device = parameters[0].device
        if not self._replays(name, inputs, parameters, device):
            return fn(*inputs)
        if offline.graphs is None or offline.graphs.device != device:
            offline.graphs = ShapeGraphs(device, self.offline_graphs)
        offline.graphs.keep = self.offline_graphs
        return offline.graphs(name, fn, inputs, model_stamp(self, parameters))

    def _replays(self, name: str, inputs: List[torch.Tensor], parameters: List[nn.Parameter],
                 device: torch.device) -> bool:
        """Whether an offline call (``name`` "encode" or "decode" of checked ``inputs``) of a model whose
        parameters are on ``device`` goes through the CUDA graphs (see the class docstring)."""
        if (self.offline_graphs == 0 or device.type != "cuda" or (name == "decode" and self.noise_mode == "torch")
                or torch.cuda.is_current_stream_capturing()
                or (torch.is_grad_enabled() and any(p.requires_grad for p in parameters))):
            return False
        cfg = self.config
        # Encode: (B, 1, T) audio. Decode: codes, the first (B, F) at the coarsest stride, F coarse frames.
        samples = inputs[0].numel() if name == "encode" else (
            inputs[0].numel() * cfg.coarse_stride * cfg.hop_length)
        return samples <= OFFLINE_GRAPH_MAX_SAMPLES

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
