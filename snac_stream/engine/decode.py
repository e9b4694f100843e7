"""``DecodeEngine``: codes in, audio out, for many streams in one batched step."""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np
import torch

from ..model.snac import SNACModel
from ..model.vq import codes_to_frames, frames_to_codes
from ..streaming.build import decoder_op
from .base import Slot, StreamEngine, cat_to


class DecodeEngine(StreamEngine):
    """Codes in, audio out, for up to ``max_streams`` independent streams at once.

    One step is ``step_frames`` coarse frames in (``submit``), ``step_samples`` samples out (``step``).
    """

    def __init__(self, model: SNACModel, max_streams: int, backend: Optional[str] = None, step_mode: str = "auto",
                 output_device: Optional[Union[str, torch.device]] = None, async_output: bool = False,
                 output_map: Optional[Callable[[torch.Tensor], Any]] = None):
        super().__init__(model, decoder_op(model), max_streams, backend, step_mode, output_device, async_output,
                         output_map)

    @functools.cached_property
    def _level_widths(self) -> List[int]:
        """Codes per step of each level."""
        return [self.step_frames * r for r in self.config.codes_per_frame]

    @functools.cached_property
    def _item_order(self) -> Optional[np.ndarray]:
        """Where each code of a queued step comes from in that step's frames (:func:`codes_to_frames`, flattened);
        None where they coincide (one coarse frame per step)."""
        if self.step_frames == 1:
            return None
        width = self.config.frame_codes
        positions = np.arange(self.step_frames * width).reshape(1, self.step_frames, width)
        return np.concatenate([level.reshape(-1) for level in frames_to_codes(positions, self.config.codes_per_frame)])

    # A queued step is one (1, sum(level_widths)) tensor or array: the step's codes of every level side by side,
    # so stacking thousands of streams is one concatenation, not one per level.
    def _zero_step(self) -> Any:
        return torch.zeros(1, sum(self._level_widths), dtype=torch.int64, device=self.model.device)

    def _stack(self, steps: List[Any]) -> Any:
        return list(cat_to(steps, self.model.device).split(self._level_widths, dim=1))

    def _advance(self, state: Any, codes: Any) -> torch.Tensor:
        return self.body.push(state, self.model.quantizer.from_codes(codes))

    def _rows(self, audio: torch.Tensor) -> List[torch.Tensor]:
        return list(audio.split(1))

    def _full_step(self, audio: torch.Tensor) -> bool:
        return audio.shape[-1] == self.step_samples

    def submit(self, sid: int, codes: Sequence[torch.Tensor]) -> None:
        """Queue codes for stream ``sid``: (1, t_i) per level, whole steps (``step_frames`` coarse frames)."""
        self.submit_many([sid], codes)

    def submit_many(self, sids: Sequence[int], codes: Sequence[torch.Tensor]) -> None:
        """Queue codes for several streams at once: row ``j`` of each level's (len(sids), t_i) tensor goes to
        stream ``sids[j]``; whole steps (``step_frames`` coarse frames), the same number for every stream.
        Checked as one batch: a bad code refuses the whole call and queues nothing."""
        slots = self._slots_of(sids)
        first = codes[0] if isinstance(codes, (list, tuple)) and codes else None
        codes = self.model.check_codes(codes, whole_windows=False, allow_empty=True, device=self._queue_device(first))
        self._queue_frames(slots, codes_to_frames(codes, self.config.codes_per_frame))

    def submit_frames(self, sids: Sequence[int], frames: Union[np.ndarray, torch.Tensor]) -> None:
        """:meth:`submit_many` for codes as coarse frames, (len(sids), T, config.frame_codes) integers: each
        frame's codes of every level side by side (``model.vq.codes_to_frames``), the layout a server keeps
        them in (a stream's pieces join by concatenation). Numpy arrays wait on the host as they are (a few
        array operations for the whole call); tensors go through :meth:`submit_many`'s checks."""
        width = self.config.frame_codes
        if not isinstance(frames, (np.ndarray, torch.Tensor)):
            raise TypeError(f"frames must be a numpy array or a tensor, got {type(frames).__name__}")
        if frames.ndim != 3 or frames.shape[2] != width:
            raise ValueError(f"frames must have shape (streams, coarse frames, {width}), got {tuple(frames.shape)}")
        if isinstance(frames, torch.Tensor):
            self.submit_many(sids, frames_to_codes(frames, self.config.codes_per_frame))
            return
        if not np.issubdtype(frames.dtype, np.integer):
            raise TypeError(f"frames must hold integers, got {frames.dtype}")
        slots = self._slots_of(sids)
        if frames.size:
            low, high = int(frames.min()), int(frames.max())
            if low < 0 or high >= self.config.codebook_size:
                raise ValueError(f"frames hold {low if low < 0 else high}, outside the codebook range "
                                 f"[0, {self.config.codebook_size})")
        self._queue_frames(slots, frames.astype(np.int64, copy=False))

    def _slots_of(self, sids: Sequence[int]) -> List[Slot]:
        slots = [self._slot(sid) for sid in sids]
        if len(set(sids)) != len(slots):
            raise ValueError(f"a stream appears more than once in {list(sids)}")
        return slots

    def _queue_frames(self, slots: List[Slot], frames: Union[np.ndarray, torch.Tensor]) -> None:
        """Queue checked frames (len(slots), T, width), whole steps, as one step item per stream and step."""
        if frames.shape[0] != len(slots):
            raise ValueError(f"codes for {len(slots)} streams need a batch of {len(slots)} rows, got {frames.shape[0]}")
        if frames.shape[1] % self.step_frames:
            raise ValueError(f"submit whole steps of {self.step_frames} coarse frames, got {frames.shape[1]}")
        steps = frames.shape[1] // self.step_frames
        if not steps or not slots:
            return
        # [j * steps + k] is stream j's queue item for its step k (views of one array: one call for all).
        items = frames.reshape(len(slots) * steps, -1)
        if self._item_order is not None:
            items = items[:, self._item_order]
        items = items.reshape(len(slots) * steps, 1, -1)
        rows = list(items) if isinstance(items, np.ndarray) else items.unbind(0)
        for k, slot in enumerate(slots):
            slot.queue.extend(rows[k * steps : (k + 1) * steps])

    def _no_output(self, rows: int) -> torch.Tensor:
        """(rows, 1, 0): no samples."""
        return torch.zeros(rows, 1, 0, device=self.model.device, dtype=self.model.dtype)
