"""Many concurrent decode streams on one model: one batched step for all of them.

``DecodeEngine`` owns one model and a pool of ``max_streams`` stream slots. Streams open and close at any
time; each ``step()`` decodes one *step* (one attention window: 1 coarse frame at 24 kHz, 4 at 32/44 kHz)
for every stream that has one queued, in a single batched pass, so N streams cost one kernel sequence.

A stream's first steps (its warm-up, derived from the architecture: the steps before its layer states reach
their steady shapes) run on their own; after that the stream joins the batch, where every row is in the same
phase. Rows never mix: every layer acts on each batch row alone, the noise is keyed per row, and a closed
slot's row is zeroed before reuse. Output equals a single ``StreamingDecoder`` (and so offline ``decode``)
for every stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from .model.functional import use_backend
from .model.snac import SNAC
from .streaming.build import stream_op
from .streaming.ops import (assign_rows, batch_positions, row_state, select_rows, state_bytes, state_shapes,
                            zero_rows)


class EngineFull(RuntimeError):
    """Every stream slot is taken."""


@dataclass
class _Slot:
    sid: int
    queue: List[List[torch.Tensor]] = field(default_factory=list)  # whole steps of codes, per level
    state: Any = None  # own state while warming up; None once in the batch
    steps: int = 0  # steps decoded


class DecodeEngine:
    """Codes in, audio out, for up to ``max_streams`` independent streams at once.

    Units: one step is ``step_frames`` coarse frames in, ``step_samples`` samples out.
    """

    def __init__(self, model: SNAC, max_streams: int, backend: Optional[str] = None):
        if not isinstance(max_streams, int) or max_streams < 1:
            raise ValueError(f"max_streams must be a positive int, got {max_streams!r}")
        self.model = model
        self.config = model.config
        self.max_streams = max_streams
        self.backend = backend
        model.resolved_backend(backend)  # fail now on an unusable backend
        self.body = stream_op(model.decoder, model.latent_dim)
        self.step_frames = self.config.pad_multiple // self.config.frame_samples
        self.step_samples = self.step_frames * self.config.frame_samples
        self.latent_step = self.step_frames * self.config.coarse_stride
        self.warmup_steps, steady = self._derive_warmup()
        # The batch holds every row in the steady shape; rows are zero until a stream joins.
        self._batch = batch_positions(zero_rows(steady, max_streams), max_streams, model.device)
        self._slots: Dict[int, _Slot] = {}
        self._free: List[int] = list(range(max_streams))

    # ---- layout ---------------------------------------------------------------------------------
    def _init_state(self, batch: int) -> Any:
        return self.body.init_state(batch, self.model.device, self.model.dtype)

    def _derive_warmup(self) -> tuple[int, Any]:
        """Steps until a stream's state shapes stop changing and each step yields ``step_samples``, and a
        state in that steady shape."""
        state = self._init_state(1)
        zeros = torch.zeros(1, self.model.latent_dim, self.latent_step, device=self.model.device,
                            dtype=self.model.dtype)
        previous = None
        with torch.inference_mode(), use_backend("torch"):
            for step in range(1, 256):
                out = self.body.push(state, zeros)
                shapes = state_shapes(state)
                if out.shape[-1] == self.step_samples and shapes == previous:
                    return step - 1, state
                previous = shapes
        raise AssertionError("decoder state never reached a steady shape")

    @property
    def state_bytes_per_stream(self) -> int:
        """Bytes of decoder state one stream slot holds in the batch."""
        return state_bytes(self._batch) // self.max_streams

    @property
    def active_streams(self) -> int:
        return len(self._slots)

    # ---- streams --------------------------------------------------------------------------------
    def open(self) -> int:
        """Take a free slot for a new stream; returns its id."""
        if not self._free:
            raise EngineFull(f"all {self.max_streams} stream slots are in use")
        sid = self._free.pop(0)
        self._slots[sid] = _Slot(sid, state=self._init_state(1))
        return sid

    def submit(self, sid: int, codes: Sequence[torch.Tensor]) -> None:
        """Queue codes for stream ``sid``: (1, t_i) per level, whole steps (``step_frames`` coarse frames)."""
        slot = self._slot(sid)
        codes = self.model.check_codes(codes, whole_windows=False, allow_empty=True)
        if codes[0].shape[0] != 1:
            raise ValueError(f"submit takes one stream's codes (batch 1), got a batch of {codes[0].shape[0]}")
        frames = codes[0].shape[-1]
        if frames % self.step_frames:
            raise ValueError(f"submit whole steps of {self.step_frames} coarse frames, got {frames}")
        for j in range(0, frames, self.step_frames):
            slot.queue.append([c[:, j * c.shape[1] // frames : (j + self.step_frames) * c.shape[1] // frames]
                               for c in codes])

    def pending(self, sid: int) -> int:
        """Steps queued for stream ``sid``."""
        return len(self._slot(sid).queue)

    def step(self) -> Dict[int, torch.Tensor]:
        """Decode one queued step of every stream that has one: {stream id: (1, 1, n) final audio}."""
        out: Dict[int, torch.Tensor] = {}
        with torch.inference_mode(), use_backend(self.model.resolved_backend(self.backend)):
            batched = sorted(s.sid for s in self._slots.values() if s.state is None and s.queue)
            if batched:
                rows = torch.tensor(batched, device=self.model.device)
                codes = [torch.cat(level, dim=0) for level in zip(*(self._slots[s].queue.pop(0) for s in batched))]
                sub = select_rows(self._batch, rows)
                audio = self.body.push(sub, self.model.quantizer.from_codes(codes))
                self._batch = assign_rows(self._batch, rows, sub)
                for i, sid in enumerate(batched):
                    out[sid] = audio[i : i + 1]
                    self._slots[sid].steps += 1
            for slot in [s for s in self._slots.values() if s.state is not None and s.queue]:
                out[slot.sid] = self.body.push(slot.state, self.model.quantizer.from_codes(slot.queue.pop(0)))
                slot.steps += 1
                if slot.steps >= self.warmup_steps:
                    self._join(slot)
        return out

    def close(self, sid: int) -> torch.Tensor:
        """End stream ``sid``: decode what is queued, return its remaining audio (1, 1, n), free the slot."""
        slot = self._slot(sid)
        parts = []
        with torch.inference_mode(), use_backend(self.model.resolved_backend(self.backend)):
            state = slot.state if slot.state is not None else row_state(self._batch, sid)
            for codes in slot.queue:
                parts.append(self.body.push(state, self.model.quantizer.from_codes(codes)))
            tail = self.body.flush(state) if slot.steps or slot.queue else None
        if tail is not None:
            parts.append(tail)
        self._release(sid)
        if not parts:
            return torch.zeros(1, 1, 0, device=self.model.device, dtype=self.model.dtype)
        return torch.cat(parts, dim=-1)

    def abort(self, sid: int) -> None:
        """Drop stream ``sid`` without decoding the rest (a failed or vanished client)."""
        self._slot(sid)
        self._release(sid)

    # ---- internals ------------------------------------------------------------------------------
    def _slot(self, sid: int) -> _Slot:
        slot = self._slots.get(sid)
        if slot is None:
            raise KeyError(f"no open stream {sid!r}")
        return slot

    def _join(self, slot: _Slot) -> None:
        """Move a warmed-up stream into its batch row."""
        rows = torch.tensor([slot.sid], device=self.model.device)
        self._batch = assign_rows(self._batch, rows, slot.state)
        slot.state = None

    def _release(self, sid: int) -> None:
        del self._slots[sid]
        # Zero the row so nothing of this stream outlives it.
        rows = torch.tensor([sid], device=self.model.device)
        self._batch = assign_rows(self._batch, rows, zero_rows(select_rows(self._batch, rows), 1))
        self._free.append(sid)
        self._free.sort()
