"""``EncodeEngine``: audio in, codes out, for many streams in one batched step."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

import numpy as np
import torch

from ..model.snac import SNACModel
from ..streaming.build import encoder_op
from ..streaming.ops import Codes, no_codes
from .base import StreamEngine, cat_to, Slot


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)  # dtypes a CPU tensor shares with numpy


class EncodeEngine(StreamEngine):
    """Audio in, codes out, for up to ``max_streams`` independent streams at once.

    ``submit`` takes any number of samples; each ``step`` encodes one step (``step_samples`` samples) of
    every stream that has one buffered and returns its codes (a list of (1, t_i) per level, possibly empty
    while the stream's first frames wait for their look-ahead). ``close`` pads as offline ``encode`` does.
    """

    def __init__(self, model: SNACModel, max_streams: int, backend: Optional[str] = None, step_mode: str = "auto",
                 output_device: Optional[Union[str, torch.device]] = None, async_output: bool = False):
        super().__init__(model, encoder_op(model), max_streams, backend, step_mode, output_device, async_output)

    def _zero_step(self) -> Any:
        return torch.zeros(1, 1, self.step_samples, device=self.model.device, dtype=self.model.dtype)

    def _stack(self, steps: List[Any]) -> Any:
        return cat_to(steps, self.model.device)

    def _advance(self, state: Any, audio: torch.Tensor) -> Codes:
        return self.body.push(state, audio)

    def _rows(self, codes: Codes) -> List[Codes]:
        return [list(levels) for levels in zip(*(c.split(1) for c in codes))]

    def _full_step(self, codes: Codes) -> bool:
        return codes[0].shape[-1] == self.step_frames

    def submit(self, sid: int, audio: torch.Tensor) -> None:
        """Buffer (1, 1, n) float samples for stream ``sid``; whole steps are queued for ``step``."""
        self.submit_many([sid], [audio])

    def submit_many(self, sids: Sequence[int], audio: Sequence[torch.Tensor]) -> None:
        """Buffer ``audio[j]`` ((1, 1, n_j) float samples, any n_j) for stream ``sids[j]``, checked and moved
        as one piece. A bad piece refuses the whole call and buffers nothing."""
        slots = self._open_slots(sids)
        if len(audio) != len(slots):
            raise ValueError(f"{len(slots)} streams need {len(slots)} audio pieces, got {len(audio)}")
        for piece in audio:
            self.model.check_audio_shape(piece, allow_empty=True)
            if piece.shape[0] != 1:
                raise ValueError(f"submit takes one stream's audio (batch 1) per piece, got a batch of "
                                 f"{piece.shape[0]}")
        if not slots:
            return
        device = self._queue_device(audio[0])
        joined = audio[0].to(device) if len(audio) == 1 else cat_to(audio, device, dim=-1)
        if joined.shape[-1]:
            joined = self.model.check_audio(joined, device)
        # On the host, audio waits as numpy views of the same memory (slicing and joining per stream at a
        # fraction of a torch op's fixed cost, which a server pays for every stream of every tick); the step
        # joins a batch of them in one copy (``cat_to``).
        host = joined.device.type == "cpu" and joined.dtype in _NUMPY_FLOATS
        self._buffer(slots, joined.numpy() if host else joined, [piece.shape[-1] for piece in audio], device)

    def submit_arrays(self, sids: Sequence[int], samples: Sequence[np.ndarray]) -> None:
        """:meth:`submit_many` for samples as 1-D numpy float arrays, ``samples[j]`` for stream ``sids[j]`` (a
        server's input as it arrived): checked and joined by a few array operations for the whole call, not a
        tensor per piece. The same checks and all-or-nothing refusal."""
        if len(samples) != len(sids):
            raise ValueError(f"{len(sids)} streams need {len(sids)} audio pieces, got {len(samples)}")
        for piece in samples:
            # dtype.kind "f": np.issubdtype(dtype, np.floating) at a tenth of its cost (a server checks every piece)
            if not isinstance(piece, np.ndarray) or piece.ndim != 1 or piece.dtype.kind != "f":
                got = f"{getattr(piece, 'dtype', type(piece).__name__)} of shape {getattr(piece, 'shape', '?')}"
                raise TypeError(f"submit_arrays takes 1-D numpy float arrays, got {got}")
        if self.model.dtype not in _NUMPY_FLOATS:  # no numpy view of the model's dtype: as tensors
            self.submit_many(sids, [torch.from_numpy(piece).view(1, 1, -1) for piece in samples])
            return
        slots = self._open_slots(sids)
        if not slots:
            return
        joined = torch.from_numpy(np.concatenate(samples)).view(1, 1, -1)
        if joined.shape[-1]:
            joined = self.model.check_audio(joined, torch.device("cpu"))
        self._buffer(slots, joined.numpy(), [piece.size for piece in samples], torch.device("cpu"))

    def _open_slots(self, sids: Sequence[int]) -> List[Slot]:
        """The slots of ``sids``, each once, none whose input has ended."""
        slots = [self._slot(sid) for sid in sids]
        if len(set(sids)) != len(slots):
            raise ValueError(f"a stream appears more than once in {list(sids)}")
        for slot in slots:
            if slot.ended:
                raise ValueError(f"stream {slot.sid}'s input has ended (end_input): it takes no more audio")
        return slots

    def _buffer(self, slots: List[Slot], data: Union[torch.Tensor, np.ndarray], sizes: Sequence[int],
                device: torch.device) -> None:
        """Buffer checked samples: ``data`` (1, 1, sum(sizes)) holds each slot's new ``sizes[j]`` samples in
        turn (numpy on the host); whole steps are queued, the rest kept as the slot's ``partial``."""
        host = isinstance(data, np.ndarray)
        step = self.step_samples
        start = 0
        for slot, n in zip(slots, sizes):
            new, start = data[..., start : start + n], start + n
            slot.received += n
            held = slot.partial
            if n == step and (held is None or not held.shape[-1]):  # one whole step, none held: a server's usual
                slot.queue.append(new)
                slot.partial = None
                continue
            if held is not None and held.shape[-1]:
                new = (np.concatenate([_on_host(held), new], axis=-1) if host
                       else torch.cat([_on_device(held, device), new], dim=-1))
            whole = new.shape[-1] // self.step_samples * self.step_samples
            slot.queue.extend(new[..., j : j + self.step_samples] for j in range(0, whole, self.step_samples))
            slot.partial = new[..., whole:]

    def end_input(self, sid: int) -> int:
        """The end of stream ``sid``'s audio: its buffered remainder, padded with zeros to a whole step (as
        offline ``encode`` pads the end), is queued as its last step, to run in the batched step like any
        other; ``close`` or ``close_many`` after it has only the codec's flush left to run. Returns the steps
        queued (0 or 1). The stream takes no more audio."""
        slot = self._slot(sid)
        slot.ended = True
        tail = slot.partial
        if tail is None or not tail.shape[-1]:
            return 0
        slot.queue.append(self._padded(tail))
        slot.received += self.step_samples - tail.shape[-1]  # counted as input, as the padding offline encode adds
        slot.partial = tail[..., :0]
        return 1

    def _ends_in_batch(self, slot: Slot) -> bool:
        return super()._ends_in_batch(slot) and (slot.partial is None or not slot.partial.shape[-1])

    def _no_output(self, rows: int) -> Codes:
        return no_codes(rows, self.config.n_codebooks, self.model.device)

    def _queue_placeholder(self, sid: int, steps: int) -> None:
        """Whole steps and half a step more, which stays buffered (``close`` pads it)."""
        self.submit(sid, torch.zeros(1, 1, steps * self.step_samples + self.step_samples // 2,
                                     device=self.model.device, dtype=self.model.dtype))

    def _remainder(self, slot: Slot) -> List[torch.Tensor]:
        """The buffered samples short of a whole step, with the zeros offline ``encode`` pads them with (to a
        multiple of ``pad_multiple = step_samples``), as one whole step: the shapes of every other step, so
        closing a stream compiles no kernel for a length met only once. The codec's flush then pads nothing."""
        if slot.partial is None or not slot.partial.shape[-1]:
            return []
        return [self._padded(_on_device(slot.partial, self.model.device))]

    def _padded(self, tail: Union[torch.Tensor, np.ndarray]) -> Union[torch.Tensor, np.ndarray]:
        """(1, 1, n < step_samples) samples followed by zeros up to a whole step: (1, 1, step_samples)."""
        if isinstance(tail, np.ndarray):
            return np.concatenate([tail, np.zeros((1, 1, self.step_samples - tail.shape[-1]), tail.dtype)], axis=-1)
        return torch.cat([tail, tail.new_zeros(1, 1, self.step_samples - tail.shape[-1])], dim=-1)


def _on_host(samples: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """Buffered samples as a numpy array (they wait as one where they came from the host)."""
    return samples if isinstance(samples, np.ndarray) else samples.cpu().numpy()


def _on_device(samples: Union[torch.Tensor, np.ndarray], device: torch.device) -> torch.Tensor:
    """Buffered samples as a tensor on ``device``."""
    return (torch.from_numpy(samples) if isinstance(samples, np.ndarray) else samples).to(device)
