"""Stateful chunked encoder and decoder, exact against offline ``SNAC.encode`` / ``SNAC.decode``.

Units: audio in samples at ``model.sampling_rate``; codes in coarse frames (one code of level 0, i.e.
``config.frame_samples`` samples of audio, ``vq_strides[0] // vq_strides[i]`` codes of level ``i``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from ..model.snac import SNAC
from .build import stream_op
from .ops import StreamOp, clone_state


def _first_input_count(op_emitted, target: int, upper: int) -> int:
    """Smallest ``n`` with ``op_emitted(n) >= target`` (``op_emitted`` is non-decreasing)."""
    lo, hi = 0, upper
    while op_emitted(hi) < target:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if op_emitted(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _on_backend(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a push or flush on the stream's backend, resolved against the model's current device."""

    @functools.wraps(method)
    def wrapper(self: "_Stream", *args: Any, **kwargs: Any) -> Any:
        with self.model.compute(self.backend):
            return method(self, *args, **kwargs)

    return wrapper


def quantize_whole_frames(model: SNAC, latent: torch.Tensor, z: Optional[torch.Tensor]
                          ) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Quantize the whole coarse frames of ``cat(latent, z)``: (codes per level (B, t_i), leftover latent).

    ``latent`` (B, D, L) holds the frames of a coarse frame not yet whole; the VQ's stride pooling is aligned
    to absolute frame 0, so only whole groups of ``coarse_stride`` latent frames can be quantized.
    """
    if z is not None and z.shape[-1]:
        latent = torch.cat([latent, z], dim=-1) if latent.shape[-1] else z
    group = model.config.coarse_stride
    whole = latent.shape[-1] // group * group
    if whole == 0:
        return [latent.new_zeros(latent.shape[0], 0, dtype=torch.int64) for _ in range(model.n_codebooks)], latent
    return model.quantizer(latent[..., :whole])[1], latent[..., whole:]


def flush_codes(model: SNAC, body: StreamOp, state: Any, latent: torch.Tensor) -> List[torch.Tensor]:
    """The last codes of encoder streams whose input (padded as offline ``encode`` pads it) has all been
    pushed: the body's tail, quantized with the ``latent`` frames held back. Per level (B, t_i)."""
    codes, rest = quantize_whole_frames(model, latent, body.flush(state))
    if rest.shape[-1]:
        raise AssertionError("encoder ended between coarse frames; padding arithmetic is off")
    return codes


class _Stream:
    """What the encoder and decoder share: the model, a batch of independent streams, a flushed flag."""

    def __init__(self, model: SNAC, batch_size: int, body: StreamOp, backend: Optional[str]):
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
    """

    def __init__(self, model: SNAC, batch_size: int = 1, backend: Optional[str] = None):
        self.group = model.config.coarse_stride  # latent frames quantized together
        super().__init__(model, batch_size, stream_op(model.encoder, 1), backend)
        frames = lambda n: self.body.emitted(n) // self.group  # noqa: E731
        period = math.lcm(self.group, model.config.attn_window_size or 1) // self.group
        starts = [_first_input_count(frames, j + 1, self.frame_samples) for j in range(2 * period + 2)]
        # Samples beyond the end of coarse frame j that must arrive before its codes come out.
        self.lookahead_samples: int = max(n - (j + 1) * self.frame_samples for j, n in enumerate(starts))
        # Worst case, counted from the first sample of a coarse frame to the emission of its codes.
        self.latency_samples: int = max(n - j * self.frame_samples for j, n in enumerate(starts))

    def reset(self) -> None:
        super().reset()
        self.received = 0
        self.latent = torch.zeros(self.batch_size, self.model.latent_dim, 0, device=self.model.device,
                                  dtype=self.model.dtype)

    def _quantize(self, z: Optional[torch.Tensor]) -> List[torch.Tensor]:
        codes, self.latent = quantize_whole_frames(self.model, self.latent, z)
        return codes

    def _no_codes(self) -> List[torch.Tensor]:
        return [torch.zeros(self.batch_size, 0, dtype=torch.int64, device=self.model.device)
                for _ in range(self.config.n_codebooks)]

    @_on_backend
    def push(self, audio: torch.Tensor) -> List[torch.Tensor]:
        """(B, 1, n) float samples -> codes of the coarse frames that just became final."""
        self._check_open()
        if isinstance(audio, torch.Tensor) and audio.dim() == 3 and audio.shape[-1] == 0:
            return self._no_codes()
        audio = self.model.check_audio(audio)
        if audio.shape[0] != self.batch_size:
            raise ValueError(f"this encoder streams {self.batch_size} channels of audio, got a batch of {audio.shape[0]}")
        self.received += audio.shape[-1]
        return self._quantize(self.body.push(self.state, audio))

    @_on_backend
    def flush(self) -> List[torch.Tensor]:
        """End of stream: pad as offline ``encode`` does and return the remaining codes.

        An empty stream returns empty codes (offline ``encode`` rejects empty audio).
        """
        self._check_open()
        self.flushed = True
        if self.received == 0:
            return self._no_codes()
        pad = -self.received % self.config.pad_multiple
        if pad:
            zeros = torch.zeros(self.batch_size, 1, pad, device=self.model.device, dtype=self.model.dtype)
            head = self._quantize(self.body.push(self.state, zeros))
        else:
            head = self._no_codes()
        tail = flush_codes(self.model, self.body, self.state, self.latent)
        self.latent = self.latent[..., :0]
        return [torch.cat(pair, dim=-1) for pair in zip(head, tail)]


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

    def __init__(self, model: SNAC, batch_size: int = 1, lookahead_samples: Optional[int] = None,
                 backend: Optional[str] = None):
        super().__init__(model, batch_size, stream_op(model.decoder, model.latent_dim), backend)
        F = self.frame_samples
        held = [k * F - self.body.emitted(k * self.config.coarse_stride) for k in range(1, 64)]
        # Audio samples that received codes describe but the exact decoder cannot emit yet.
        self.latency_samples: int = max(held)
        if lookahead_samples is not None:
            if not isinstance(lookahead_samples, int) or lookahead_samples < 0:
                raise ValueError(f"lookahead_samples must be a non-negative int or None, got {lookahead_samples!r}")
            lookahead_samples = min(lookahead_samples, self.latency_samples)
        self.lookahead_samples: Optional[int] = lookahead_samples

    def reset(self) -> None:
        super().reset()
        self.frames = 0  # coarse frames received
        self.exact_samples = 0  # samples the exact pipeline has produced
        self.emitted_samples = 0  # samples returned to the caller (>= exact_samples in early mode)

    def _emit(self, exact: Optional[torch.Tensor]) -> torch.Tensor:
        """Return the part of freshly produced exact samples that was not already emitted early."""
        if exact is None:
            exact = torch.zeros(self.batch_size, 1, 0, device=self.model.device, dtype=self.model.dtype)
        start = self.exact_samples
        self.exact_samples += exact.shape[-1]
        out = exact[..., max(0, self.emitted_samples - start):]
        self.emitted_samples += out.shape[-1]
        return out

    @_on_backend
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
            return torch.zeros(self.batch_size, 1, 0, device=self.model.device, dtype=self.model.dtype)
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

    @_on_backend
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
