"""One stream object's push of one *unit* through fixed buffers, captured as a CUDA graph on CUDA.

A unit is the smallest push after which a stream's state is back in the same phase: ``pad_multiple`` samples
into the encoder, ``pad_multiple // frame_samples`` coarse frames into the decoder (one coarse frame at 24 kHz,
one attention window of 4 at 32/44 kHz), the engines' step. Past its warm-up (``rows.steady_state``), a stream
that has received a whole number of units keeps the same state shapes from one unit to the next (its integer
counters grow by whole units), so a unit's push can run as one pass over fixed buffers: staged inputs, a state
whose tensors keep their addresses (updated in place), outputs rewritten at each pass. ``graphs.CUDAGraphed``
captures that pass once and replays it, one launch instead of hundreds; uncaptured, the same pass runs eagerly
(what the tests exercise without a GPU).

Counters. The pass leaves the buffers' integer counters (inputs received, outputs produced) as they were when
the state was staged: they decide only how many frames a push emits, and that repeats with the unit, so they
stay right modulo the unit, as the engines' batch keeps them. A stream that goes on eagerly from the buffers (a
push of another size, a flush, the decoder's early emission) computes with those counters and gets what it
would have got with its real ones.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, List, Union

import torch

from .graphs import CUDAGraphed
from .ops import Codes, clone_state
from .rows import batch_positions, copy_state_, rebound_copy

Inputs = Union[torch.Tensor, List[torch.Tensor]]  # audio (B, 1, n), or codes: one (B, t_i) tensor per level


def _tensors(x: Union[torch.Tensor, Codes]) -> List[torch.Tensor]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _copied(x: Union[torch.Tensor, Codes]) -> Union[torch.Tensor, Codes]:
    """A copy of a pass's outputs, which the next pass rewrites."""
    return [t.clone() for t in x] if isinstance(x, (list, tuple)) else x.clone()


class UnitPass:
    """Fixed buffers for one stream object (``batch`` streams) and its unit pass.

    ``advance(state, inputs)`` pushes one unit of ``inputs`` (shaped as ``inputs``, the zero buffers given here)
    into ``state`` and returns the outputs. :meth:`stage` copies a stream's state into the buffers and returns
    the state the stream holds from then on, whose tensors are the buffers; :meth:`run` pushes one unit through
    them. ``captured``: replay a CUDA graph (the model on CUDA), else run the pass eagerly. ``stamp`` records what
    the pass was made for (the caller's; a pass is never reused for another).
    """

    def __init__(self, advance: Callable[[Any, Inputs], Any], inputs: Inputs, device: torch.device, batch: int,
                 captured: bool, stamp: Any):
        self.advance = advance
        self.inputs = inputs
        self.device = device
        self.batch = batch
        self.stamp = stamp
        self.static: Any = None  # the state buffers, made by the first stage()
        self.passes: CUDAGraphed[int, Any] = CUDAGraphed(self._pass, device, enabled=captured, frozen=self._frozen)

    def stage(self, state: Any) -> Any:
        """Copy ``state`` (a stream's, in the steady phase at a whole number of units) into the buffers; returns a
        state holding the buffers themselves in new containers: a push run eagerly on it rebinds its fields and
        leaves the buffers as they were. Run under ``torch.inference_mode`` (the buffers are inference tensors)."""
        if self.static is None:
            # Per-row noise positions as tensors, advanced inside the pass.
            self.static = batch_positions(clone_state(state), self.batch, self.device)
        else:
            copy_state_(self.static, state)
        return rebound_copy(self.static)

    def run(self, inputs: Inputs) -> Union[torch.Tensor, Codes]:
        """Push one unit of ``inputs`` through the buffers (staged first); returns a copy of its outputs, made in
        the caller's grad mode (the pass runs under inference mode)."""
        with torch.inference_mode():
            for buffer, part in zip(_tensors(self.inputs), _tensors(inputs), strict=True):
                buffer.copy_(part)
            outputs = self.passes(1)
        return _copied(outputs)

    def _pass(self, units: int) -> Any:
        """One unit from the buffers: the state advanced on new containers, its tensors then written back in
        place. The buffers' counters stay as staged, uncaptured as in a replay (module doc)."""
        work = rebound_copy(self.static)
        outputs = self.advance(work, self.inputs)
        copy_state_(self.static, work, counters=False)
        return outputs

    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        """The passes run before a capture (for real) leave the buffers as they were."""
        saved = clone_state(self.static)
        try:
            yield
        finally:
            copy_state_(self.static, saved)
