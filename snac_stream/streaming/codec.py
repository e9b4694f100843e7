"""Stateful chunked encoder and decoder, exact against offline ``encode`` / ``decode``.

Units: audio in samples at ``model.sampling_rate``; codes in coarse frames (one code of level 0, i.e.
``config.frame_samples`` samples of audio, ``vq_strides[0] // vq_strides[i]`` codes of level ``i``).

How a push runs (``push_mode``): ``"eager"`` runs the op chain on the chunk as it comes, a few hundred kernel
launches; ``"graphs"`` (the default on CUDA) runs a push of whole *units* (``units.UnitPass``: one coarse frame at
24 kHz, one attention window of 4 at 32/44 kHz, into the decoder; ``pad_multiple`` samples into the encoder)
as one replay of a CUDA graph per unit, once the stream is past its warm-up and has received a whole number of
units; every other push runs eagerly. ``"units"`` is that path uncaptured (the same buffers and decisions, on
any device). Outputs are the same in every mode: the same samples or codes after the same pushes.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, List, Optional, Sequence, TypeVar

import torch

from ..model.snac import SNACModel
from .build import decoder_op, encoder_op
from .graphs import model_stamp
from .latency import decoder_dial, decoder_latency_samples, encoder_latency
from .ops import Codes, StreamOp, cat_time, clone_state, no_codes
from .rows import steady_state
from .units import Inputs, UnitPass

PUSH_MODES = ("auto", "eager", "units", "graphs")
# Longer pushes run eagerly: one pass over a long chunk costs less than a replay per unit.
MAX_UNITS_PER_PUSH = 8

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
    """What the encoder and decoder share: the model, a batch of independent streams, a flushed flag, and the
    choice between an eager push and replays of the unit pass.

    ``body`` is the op chain the streams run; ``state`` its state for the batch. ``unit`` is the unit's size in
    what ``received`` counts (samples into the encoder, coarse frames into the decoder).
    """

    def __init__(self, model: SNACModel, batch_size: int, body: StreamOp, backend: Optional[str], unit: int,
                 push_mode: str):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if push_mode not in PUSH_MODES:
            raise ValueError(f"push_mode must be one of {PUSH_MODES}, got {push_mode!r}")
        self.model = model
        model.resolved_backend(backend)  # fail here, not at the first push, on an unusable backend
        self.backend = backend  # None: the model's
        self.push_mode = push_mode
        self._resolved_push_mode()  # fail here on "graphs" off CUDA
        self.config = model.config
        self.batch_size = batch_size
        self.body = body
        self.frame_samples = self.config.frame_samples
        self.unit = unit
        self._warmup_units: Optional[int] = None  # derived at the first push that could use the unit pass
        self._unit_pass: Optional[UnitPass] = None
        self._in_buffers: Optional[UnitPass] = None  # the pass whose buffers ``state``'s tensors are
        # Kept to check the pass is still the model's (weights moved or changed in place; see _stamp).
        self._parameters = list(model.parameters())
        self.reset()

    def reset(self) -> None:
        """Forget the current streams; the next push starts new ones."""
        self.state = self.body.init_state(self.batch_size, self.model.device, self.model.dtype)
        self._state_device = self.model.device
        self._in_buffers = None
        self.flushed = False
        self.received = 0  # samples (encoder) or coarse frames (decoder) pushed

    def _check_open(self) -> None:
        if self.flushed:
            raise RuntimeError("this stream was flushed; call reset() before pushing a new one")

    # ---- hooks ----------------------------------------------------------------------------------
    def _advance(self, state: Any, inputs: Inputs) -> Any:
        """Push ``inputs`` (checked, on the model's device) into ``state``; returns the outputs."""
        raise NotImplementedError

    def _zero_unit(self, batch: int) -> Inputs:
        """One unit of placeholder input for ``batch`` streams."""
        raise NotImplementedError

    def _split_units(self, inputs: Inputs, units: int) -> List[Inputs]:
        """``inputs`` of ``units`` whole units, unit by unit (views)."""
        raise NotImplementedError

    def _whole_unit(self, outputs: Any) -> bool:
        """Whether a push's outputs are a whole unit's (the steady emission)."""
        raise NotImplementedError

    # ---- how a push runs ------------------------------------------------------------------------
    def _resolved_push_mode(self) -> str:
        """``push_mode`` against the model's current device: "auto" is "graphs" on CUDA, "eager" elsewhere."""
        cuda = self.model.device.type == "cuda"
        if self.push_mode == "auto":
            return "graphs" if cuda else "eager"
        if self.push_mode == "graphs" and not cuda:
            raise ValueError(f"push_mode='graphs' needs the model on a CUDA device, it is on {self.model.device}")
        return self.push_mode

    def _push(self, inputs: Inputs, size: int) -> Any:
        """Advance the streams by ``inputs`` (``size`` samples or coarse frames, > 0); returns the outputs.

        Whole units (at most ``MAX_UNITS_PER_PUSH``) pushed at a whole number of units past the warm-up run
        unit by unit through the unit pass, in place; any other push runs eagerly on the state."""
        self._check_device()
        units = self._units_for(size)
        self.received += size
        if not units:
            self._in_buffers = None  # the eager push rebinds the state's tensors: they are the buffers no more
            return self._advance(self.state, inputs)
        unit_pass = self._current_pass()
        if self._in_buffers is not unit_pass:
            with torch.inference_mode():
                self.state = unit_pass.stage(self.state)
            self._in_buffers = unit_pass
        parts = [unit_pass.run(part) for part in self._split_units(inputs, units)]
        return parts[0] if units == 1 else cat_time(parts)

    def _check_device(self) -> None:
        """A stream runs where it started: refuse to go on after the model moved (a stream with nothing pushed
        yet starts again on the model's device)."""
        if self._parameters[0].device != self._state_device:
            if self.received:
                raise RuntimeError(f"the model moved to {self._parameters[0].device} while this stream ran on "
                                   f"{self._state_device}: call reset() to start a new stream there")
            self.reset()

    def _units_for(self, size: int) -> int:
        """The units a push of ``size`` runs as through the unit pass (0: it runs eagerly)."""
        if size % self.unit or self.received % self.unit or size > MAX_UNITS_PER_PUSH * self.unit:
            return 0
        if self._resolved_push_mode() == "eager":
            return 0
        return size // self.unit if self.received >= self.warmup_units * self.unit else 0

    @property
    def warmup_units(self) -> int:
        """Units a stream receives before its pushes of whole units can take the unit pass (derived once, from
        the architecture: a few placeholder pushes on the PyTorch backend)."""
        if self._warmup_units is None:
            self._warmup_units, _ = steady_state(
                self.body.init_state(1, self.model.device, self.model.dtype),
                lambda state: self._advance(state, self._zero_unit(1)), self._whole_unit)
        return self._warmup_units

    def _current_pass(self) -> UnitPass:
        """The unit pass for the model as it is now: a new one (its graphs captured anew) when the model has
        moved, its weights changed or its backend, precision or noise settings differ from the pass's."""
        stamp = self._stamp()
        if self._unit_pass is None or self._unit_pass.stamp != stamp:
            self._unit_pass = None  # free the old graphs before capturing new ones
            self._unit_pass = UnitPass(self._advance, self._zero_unit(self.batch_size), self.model.device,
                                       self.batch_size, captured=stamp[0] == "graphs", stamp=stamp)
        return self._unit_pass

    def _stamp(self) -> tuple:
        """What a captured pass depends on beyond its buffers: the push mode and ``graphs.model_stamp`` of the
        parameters this stream started with (replacing a parameter object is not seen: make a new streaming
        object then)."""
        return (self._resolved_push_mode(), *model_stamp(self.model, self._parameters, self.backend))

    def _flush_state(self) -> Any:
        """The body's flush on the state (eager)."""
        self._check_device()
        self._in_buffers = None
        return self.body.flush(self.state)


class StreamingEncoder(_Stream):
    """Audio in, codes out, chunk by chunk.

    ``push((B, 1, n) float)`` returns the codes of every coarse frame whose inputs are now all known (a list
    of (B, t_i) int64 per level, possibly ``t_i == 0``); ``flush()`` pads the stream exactly as the offline
    ``encode`` pads it and returns the rest. Their concatenation equals ``model.encode(audio)``.

    ``lookahead_samples``: samples beyond the end of a coarse frame that must arrive before its codes come
    out; ``latency_samples``: the worst case from the first sample of a coarse frame to its codes.

    ``push_mode`` (module doc): on CUDA, pushes of whole units of ``pad_multiple`` samples (one coarse frame at
    24 kHz, four at 32/44 kHz), up to ``MAX_UNITS_PER_PUSH`` of them, replay a CUDA graph once the stream is past
    its first few units and has received a whole number of units; pushes of other sizes run eagerly (and a
    stream pushed in other sizes stays eager until its total is a whole number of units again). The first
    replayed push captures the graph (tens of milliseconds). A model moved to another device needs ``reset()``.
    """

    def __init__(self, model: SNACModel, batch_size: int = 1, backend: Optional[str] = None,
                 push_mode: str = "auto"):
        super().__init__(model, batch_size, encoder_op(model), backend, model.config.pad_multiple, push_mode)
        latency = encoder_latency(model)
        self.lookahead_samples: int = latency.lookahead_samples
        self.latency_samples: int = latency.latency_samples

    def _no_codes(self) -> Codes:
        return no_codes(self.batch_size, self.config.n_codebooks, self.model.device)

    def _advance(self, state: Any, audio: torch.Tensor) -> Codes:
        return self.body.push(state, audio)

    def _zero_unit(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, 1, self.unit, device=self.model.device, dtype=self.model.dtype)

    def _split_units(self, audio: torch.Tensor, units: int) -> List[torch.Tensor]:
        return list(audio.split(self.unit, dim=-1))

    def _whole_unit(self, codes: Codes) -> bool:
        return codes[0].shape[-1] * self.frame_samples == self.unit

    @_runs_on_backend
    def push(self, audio: torch.Tensor) -> Codes:
        """(B, 1, n) float samples -> codes of the coarse frames that just became final."""
        self._check_open()
        if isinstance(audio, torch.Tensor) and audio.dim() == 3 and audio.shape[-1] == 0:
            return self._no_codes()
        audio = self.model.check_audio(audio)
        if audio.shape[0] != self.batch_size:
            raise ValueError(f"this encoder streams {self.batch_size} channels of audio, got a batch of {audio.shape[0]}")
        return self._push(audio, audio.shape[-1])

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
            parts.append(self._push(zeros, pad))
        tail = self._flush_state()
        parts.append(self._no_codes() if tail is None else tail)
        return cat_time(parts)


class StreamingDecoder(_Stream):
    """Codes in, audio out, chunk by chunk.

    ``push(codes)`` takes whole coarse frames (a list of (B, t_i) per level, ``t_i = k * vq_strides[0] //
    vq_strides[i]``, ``k >= 0``) and returns (B, 1, n) audio samples that are final; ``flush()`` returns the
    tail. Their concatenation equals ``model.decode(codes)`` within float rounding.

    ``lookahead_samples`` is the latency dial. ``None`` (default) is exact: a sample is emitted once every
    code it depends on has arrived, ``latency_samples`` after the end of the frames it belongs to. A smaller
    value emits earlier, computing the not-yet-final samples as if the stream ended there (the unknown
    future taken as the offline zero padding); those samples are then approximate and never revised.

    ``push_mode`` (module doc): on CUDA, pushes of whole units (one coarse frame at 24 kHz, one attention window
    of 4 coarse frames at 32/44 kHz), up to ``MAX_UNITS_PER_PUSH`` of them, replay a CUDA graph once the stream is
    past its first few units; other pushes (a single coarse frame at 32/44 kHz, longer pushes) run eagerly. With
    the dial set, the early samples are computed eagerly after the replayed push (on a copy of the state). The
    first replayed push captures the graph (tens of milliseconds). A model moved to another device needs
    ``reset()``.
    """

    def __init__(self, model: SNACModel, batch_size: int = 1, lookahead_samples: Optional[int] = None,
                 backend: Optional[str] = None, push_mode: str = "auto"):
        unit = model.config.pad_multiple // model.config.frame_samples  # coarse frames
        super().__init__(model, batch_size, decoder_op(model), backend, unit, push_mode)
        # Audio samples that received codes describe but the exact decoder cannot emit yet.
        self.latency_samples: int = decoder_latency_samples(model)
        self.lookahead_samples: Optional[int] = decoder_dial(model, lookahead_samples)

    def reset(self) -> None:
        super().reset()  # received: coarse frames
        self.exact_samples = 0  # samples the exact pipeline has produced
        self.emitted_samples = 0  # samples returned to the caller (>= exact_samples in early mode)

    @property
    def frames(self) -> int:
        """Coarse frames received."""
        return self.received

    @functools.cached_property
    def _level_widths(self) -> List[int]:
        """Codes per unit of each level."""
        return [self.unit * self.config.coarse_stride // s for s in self.config.vq_strides]

    def _advance(self, state: Any, codes: List[torch.Tensor]) -> torch.Tensor:
        return self.body.push(state, self.model.quantizer.from_codes(codes))

    def _zero_unit(self, batch: int) -> List[torch.Tensor]:
        return [torch.zeros(batch, w, dtype=torch.int64, device=self.model.device) for w in self._level_widths]

    def _split_units(self, codes: List[torch.Tensor], units: int) -> List[List[torch.Tensor]]:
        return [list(unit) for unit in zip(*(c.split(w, dim=-1) for c, w in zip(codes, self._level_widths)))]

    def _whole_unit(self, audio: torch.Tensor) -> bool:
        return audio.shape[-1] == self.unit * self.frame_samples

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
        out = self._emit(self._push(codes, k) if k else None)
        if self.lookahead_samples is not None and k:
            out = torch.cat([out, self._early()], dim=-1)
        return out

    def _early(self) -> torch.Tensor:
        """Samples up to ``lookahead_samples`` before the end of the received audio, as if the stream ended."""
        target = self.received * self.frame_samples - self.lookahead_samples
        if target <= self.emitted_samples:
            return self._no_audio()
        state = clone_state(self.state)
        window = self.config.attn_window_size
        missing = -self.received * self.config.coarse_stride % window if window else 0
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
        """End of stream: the remaining samples (``received * frame_samples`` in total)."""
        self._check_open()
        self.flushed = True
        if self.received == 0:
            return self._emit(None)
        window = self.config.attn_window_size
        if window and (self.received * self.config.coarse_stride) % window:
            step = math.lcm(self.config.coarse_stride, window) // self.config.coarse_stride
            raise ValueError(
                f"this model's decoder attends over windows of {window} latent frames: a stream must hold a "
                f"multiple of {step} coarse frames, got {self.received}"
            )
        return self._emit(self._flush_state())
