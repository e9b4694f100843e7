"""``DecodeEngine``: codes in, audio out, for many streams in one batched step."""

from __future__ import annotations

import functools
from typing import Any, List, Optional, Sequence, Union

import torch

from ..model.snac import SNACModel
from ..streaming.build import decoder_op
from .base import StreamEngine, cat_to


class DecodeEngine(StreamEngine):
    """Codes in, audio out, for up to ``max_streams`` independent streams at once.

    One step is ``step_frames`` coarse frames in (``submit``), ``step_samples`` samples out (``step``).
    """

    def __init__(self, model: SNACModel, max_streams: int, backend: Optional[str] = None, step_mode: str = "auto",
                 output_device: Optional[Union[str, torch.device]] = None, async_output: bool = False):
        super().__init__(model, decoder_op(model), max_streams, backend, step_mode, output_device, async_output)

    @functools.cached_property
    def _level_widths(self) -> List[int]:
        """Codes per step of each level."""
        return [self.step_frames * self.config.coarse_stride // s for s in self.config.vq_strides]

    # A queued step is one (1, sum(level_widths)) tensor: the step's codes of every level side by side, so
    # stacking thousands of streams is one concatenation, not one per level.
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
        slots = [self._slot(sid) for sid in sids]
        if len(set(sids)) != len(slots):
            raise ValueError(f"a stream appears more than once in {list(sids)}")
        first = codes[0] if isinstance(codes, (list, tuple)) and codes else None
        codes = self.model.check_codes(codes, whole_windows=False, allow_empty=True, device=self._queue_device(first))
        if codes[0].shape[0] != len(slots):
            raise ValueError(f"codes for {len(slots)} streams need a batch of {len(slots)} rows, "
                             f"got {codes[0].shape[0]}")
        frames = codes[0].shape[-1]
        if frames % self.step_frames:
            raise ValueError(f"submit whole steps of {self.step_frames} coarse frames, got {frames}")
        steps = frames // self.step_frames
        if not steps:
            return
        # (streams, steps, width) per level, side by side: [j, k] is stream j's queue item for its step k.
        merged = torch.cat([c.reshape(len(slots), steps, w) for c, w in zip(codes, self._level_widths)], dim=2)
        items = merged.reshape(len(slots) * steps, 1, merged.shape[-1]).unbind(0)  # one call for every view
        for k, slot in enumerate(slots):
            slot.queue.extend(items[k * steps : (k + 1) * steps])

    def _no_output(self, rows: int) -> torch.Tensor:
        """(rows, 1, 0): no samples."""
        return torch.zeros(rows, 1, 0, device=self.model.device, dtype=self.model.dtype)
