"""Stateful chunked encoder and decoder, exact against offline ``encode`` / ``decode``.

Units: audio in samples at ``model.sampling_rate``; codes in coarse frames (one code of level 0, i.e.
``config.frame_samples`` samples of audio, ``vq_strides[0] // vq_strides[i]`` codes of level ``i``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch

from ..model.snac import SNACModel
from .build import decoder_op, encoder_op
from .latency import decoder_dial, decoder_latency_samples, encoder_latency
from .ops import Codes, StreamOp, clone_state, no_codes

_Method = TypeVar("_Method", bound=Callable[..., Any])


def _runs_on_backend(method: _Method) -> _Method:
    """Run a push or flush on the stream's backend, resolved against the model's current device, without
    autograd: the state a stream keeps between pushes must not carry a growing graph."""

    @functools.wraps(method)
    def wrapper(self: "_Stream", *args: Any, **kwargs: Any) -> Any:
        with self.model.on_backend(self.backend), torch.no_grad():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class _Stream:
    """What the encoder and decoder share: the model, a batch of independent streams, a flushed flag.

    ``body`` is the op chain the streams run; ``state`` its state for the batch.
    """

    def __init__(self, model: SNACModel, batch_size: int, body: StreamOp, backend: Optional[str]):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        model.resolved_backend(backend)  # fail here, not at the first push, on an unusable backend
        self.backend = backend  # None: the model's
        self.config = model.config
        self.batch_size = batch_size
        self.body = body
        self.frame_samples = self.config.frame_samples
        self.reset()

    def reset(self) -> None:
        """Forget the current streams; the next push starts new ones."""
        self.state = self.body.init_state(self.batch_size, self.model.device, self.model.dtype)
        self.flushed = False

    def _check_open(self) -> None:
        if self.flushed:
            raise RuntimeError("this stream was flushed; call reset() before pushing a new one")


class StreamingEncoder(_Stream):
    """Audio in, codes out, chunk by chunk.

    ``push((B, 1, n) float)`` returns the codes of every coarse frame whose inputs are now all known (a list
    of (B, t_i) int64 per level, possibly ``t_i == 0``); ``flush()`` pads the stream exactly as the offline
    ``encode`` pads it and returns the rest. Their concatenation equals ``model.encode(audio)``.

    ``lookahead_samples``: samples beyond the end of a coarse frame that must arrive before its codes come
    out; ``latency_samples``: the worst case from the first sample of a coarse frame to its codes.
    """

    def __init__(self, model: SNACModel, batch_size: int = 1, backend: Optional[str] = None):
        super().__init__(model, batch_size, encoder_op(model), backend)
        latency = encoder_latency(model)
        self.lookahead_samples: int = latency.lookahead_samples
        self.latency_samples: int = latency.latency_samples

    def reset(self) -> None:
        super().reset()
        self.received = 0  # samples pushed

    def _no_codes(self) -> Codes:
        return no_codes(self.batch_size, self.config.n_codebooks, self.model.device)

    @_runs_on_backend
    def push(self, audio: torch.Tensor) -> Codes:
        """(B, 1, n) float samples -> codes of the coarse frames that just became final."""
        self._check_open()
        if isinstance(audio, torch.Tensor) and audio.dim() == 3 and audio.shape[-1] == 0:
            return self._no_codes()
        audio = self.model.check_audio(audio)
        if audio.shape[0] != self.batch_size:
            raise ValueError(f"this encoder streams {self.batch_size} channels of audio, got a batch of {audio.shape[0]}")
        self.received += audio.shape[-1]
        return self.body.push(self.state, audio)

    @_runs_on_backend
    def flush(self) -> Codes:
        """End of stream: pad as offline ``encode`` does and return the remaining codes.

        An empty stream returns empty codes (offline ``encode`` rejects empty audio).
        """
        self._check_open()
        self.flushed = True
        if self.received == 0:
            return self._no_codes()
        pad = -self.received % self.config.pad_multiple
        parts = []
        if pad:
            zeros = torch.zeros(self.batch_size, 1, pad, device=self.model.device, dtype=self.model.dtype)
            parts.append(self.body.push(self.state, zeros))
        tail = self.body.flush(self.state)
        parts.append(self._no_codes() if tail is None else tail)
        return [torch.cat(levels, dim=-1) for levels in zip(*parts)]


class StreamingDecoder(_Stream):
    """Codes in, audio out, chunk by chunk.

    ``push(codes)`` takes whole coarse frames (a list of (B, t_i) per level, ``t_i = k * vq_strides[0] //
    vq_strides[i]``, ``k >= 0``) and returns (B, 1, n) audio samples that are final; ``flush()`` returns the
    tail. Their concatenation equals ``model.decode(codes)`` within float rounding.

    ``lookahead_samples`` is the latency dial. ``None`` (default) is exact: a sample is emitted once every
    code it depends on has arrived, ``latency_samples`` after the end of the frames it belongs to. A smaller
    value emits earlier, computing the not-yet-final samples as if the stream ended there (the unknown
    future taken as the offline zero padding); those samples are then approximate and never revised.
    """

    def __init__(self, model: SNACModel, batch_size: int = 1, lookahead_samples: Optional[int] = None,
                 backend: Optional[str] = None):
        super().__init__(model, batch_size, decoder_op(model), backend)
        # Audio samples that received codes describe but the exact decoder cannot emit yet.
        self.latency_samples: int = decoder_latency_samples(model)
        self.lookahead_samples: Optional[int] = decoder_dial(model, lookahead_samples)

    def reset(self) -> None:
        super().reset()
        self.frames = 0  # coarse frames received
        self.exact_samples = 0  # samples the exact pipeline has produced
        self.emitted_samples = 0  # samples returned to the caller (>= exact_samples in early mode)

    def _no_audio(self) -> torch.Tensor:
        return torch.zeros(self.batch_size, 1, 0, device=self.model.device, dtype=self.model.dtype)

    def _emit(self, exact: Optional[torch.Tensor]) -> torch.Tensor:
        """Return the part of freshly produced exact samples that was not already emitted early."""
        if exact is None:
            exact = self._no_audio()
        start = self.exact_samples
        self.exact_samples += exact.shape[-1]
        out = exact[..., max(0, self.emitted_samples - start):]
        self.emitted_samples += out.shape[-1]
        return out

    @_runs_on_backend
    def push(self, codes: Sequence[torch.Tensor]) -> torch.Tensor:
        """Whole coarse frames of codes -> (B, 1, n) audio samples that became final."""
        self._check_open()
        codes = self.model.check_codes(codes, whole_windows=False, allow_empty=True)
        if codes[0].shape[0] != self.batch_size:
            raise ValueError(f"this decoder streams a batch of {self.batch_size}, got codes for {codes[0].shape[0]}")
        k = codes[0].shape[-1]
        out = self._emit(self.body.push(self.state, self.model.quantizer.from_codes(codes)) if k else None)
        self.frames += k
        if self.lookahead_samples is not None and k:
            out = torch.cat([out, self._early()], dim=-1)
        return out

    def _early(self) -> torch.Tensor:
        """Samples up to ``lookahead_samples`` before the end of the received audio, as if the stream ended."""
        target = self.frames * self.frame_samples - self.lookahead_samples
        if target <= self.emitted_samples:
            return self._no_audio()
        state = clone_state(self.state)
        window = self.config.attn_window_size
        missing = -self.frames * self.config.coarse_stride % window if window else 0
        if missing:  # complete the attention window with zero latents
            zeros = torch.zeros(self.batch_size, self.model.latent_dim, missing, device=self.model.device,
                                dtype=self.model.dtype)
            tail = self.body.push(state, zeros)
            rest = self.body.flush(state)
            tail = torch.cat([tail, rest], dim=-1) if rest is not None else tail
        else:
            tail = self.body.flush(state)
        # tail starts at sample exact_samples; emit [emitted_samples, target)
        begin = self.emitted_samples - self.exact_samples
        early = tail[..., begin : target - self.exact_samples]
        self.emitted_samples += early.shape[-1]
        return early

    @_runs_on_backend
    def flush(self) -> torch.Tensor:
        """End of stream: the remaining samples (``frames * frame_samples`` in total)."""
        self._check_open()
        self.flushed = True
        if self.frames == 0:
            return self._emit(None)
        window = self.config.attn_window_size
        if window and (self.frames * self.config.coarse_stride) % window:
            step = math.lcm(self.config.coarse_stride, window) // self.config.coarse_stride
            raise ValueError(
                f"this model's decoder attends over windows of {window} latent frames: a stream must hold a "
                f"multiple of {step} coarse frames, got {self.frames}"
            )
        return self._emit(self.body.flush(self.state))
