"""Batch rows of a stream-op state: one row per independent stream (the engines' and the graphed pushes' toolkit).

Tensors in a state have the batch (stream) on dim 0. Integer counters (inputs received, outputs produced)
only decide how many frames the next push emits; streams that receive the same number of frames per push
agree on that once they are past their start, so a batch keeps one set. The noise position is the
exception: it keys each stream's noise, so batched states hold it as an int64 tensor (B,), one per row.

States are the nested lists and dataclasses the ops of ``streaming.ops`` make (``StreamOp.init_state``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Tuple

import torch

from ..kernels.rows import RowsOf
from ..model.functional import use_backend
from .ops import CONTEXT_STATES, Joined, PositionState


def _map_state(fn: Callable[..., Any], state: Any, *others: Any) -> Any:
    """Apply ``fn`` to the leaves of a (nested) state: tensors, counters and noise positions (``PositionState``);
    ``others`` are states of the same structure whose matching leaves ``fn`` also receives."""
    if isinstance(state, list):
        return [_map_state(fn, s, *(o[i] for o in others)) for i, s in enumerate(state)]
    if dataclasses.is_dataclass(state) and not isinstance(state, PositionState):
        return type(state)(**{f.name: _map_state(fn, getattr(state, f.name), *(getattr(o, f.name) for o in others))
                              for f in dataclasses.fields(state)})
    return fn(state, *others)


def batch_positions(state: Any, batch: int, device: torch.device) -> Any:
    """A batched state with per-row noise positions (int64 tensors) instead of one shared int (positions that
    are tensors already are kept)."""
    def per_row(v: Any) -> Any:
        if isinstance(v, PositionState) and not isinstance(v.position, torch.Tensor):
            return PositionState(torch.full((batch,), v.position, dtype=torch.int64, device=device))
        return v
    return _map_state(per_row, state)


def select_rows(state: Any, rows: torch.Tensor) -> Any:
    """The sub-state of the streams in ``rows`` (a copy); counters are shared, noise positions per row."""
    def pick(v: Any) -> Any:
        if isinstance(v, PositionState):
            return PositionState(pick(v.position))
        return v.index_select(0, rows) if isinstance(v, torch.Tensor) else v
    return _map_state(pick, state)


def rows_in_place(state: Any, rows: torch.Tensor) -> Any:
    """The sub-state of the streams in ``rows``, to be advanced and written back into ``state`` itself (a steady
    step): the convs' contexts as :class:`RowsOf` of ``state``'s own tensors, which their ops read through the
    kernels and renew in place; the other tensors gathered as :func:`select_rows` does. ``assign_rows`` then
    skips the contexts. Saves gathering the contexts (nearly all of a decoder's state) and copying the new
    ones twice."""
    def pick(v: Any) -> Any:
        if isinstance(v, CONTEXT_STATES) and isinstance(v.context, torch.Tensor):
            fields = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
            return type(v)(**{**fields, "context": RowsOf(v.context, rows)})
        if isinstance(v, list):
            return [pick(s) for s in v]
        if dataclasses.is_dataclass(v) and not isinstance(v, PositionState):
            return type(v)(**{f.name: pick(getattr(v, f.name)) for f in dataclasses.fields(v)})
        return select_rows(v, rows)
    return pick(state)


def assign_rows(state: Any, rows: torch.Tensor, sub: Any, counters: bool = True) -> Any:
    """Write ``sub`` (a state of ``len(rows)`` streams) into ``rows`` of ``state``, in place; returns the
    updated state (its tensors are ``state``'s own, so views and captured graphs of them stay valid).

    Tensors must agree in shape beyond the batch dim: the streams are in the same phase. ``sub``'s tensors may
    be :class:`~snac_stream.streaming.ops.Joined` (a push under ``ops.deferred_joins``): each piece is written
    into its place. With ``counters``, counters take the sub-state's values, which are the same for every stream
    in that phase; without, they keep ``state``'s. No host synchronisation: the write can be captured.
    """
    def put(dst: Any, src: Any) -> Any:
        if isinstance(src, RowsOf):  # a context renewed in its rows (``rows_in_place``)
            if src.batch is not dst:
                dst.index_copy_(0, rows, src.gathered())
            return dst
        if isinstance(dst, PositionState):
            position = src.position
            if not isinstance(position, torch.Tensor):  # a single stream's noise position
                position = torch.full((len(rows),), position, dtype=torch.int64, device=dst.position.device)
            return PositionState(dst.position.index_copy_(0, rows, position))
        if isinstance(dst, torch.Tensor):
            if dst.shape[1:] != src.shape[1:]:
                raise ValueError(f"stream state {tuple(src.shape)} does not fit the batch's {tuple(dst.shape)}")
            for place, part in _pieces(dst, src):
                place.index_copy_(0, rows, part.to(dst.dtype))
            return dst
        return src if counters else dst
    return _map_state(put, state, sub)


def _pieces(dst: torch.Tensor, src: Any) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(view of ``dst``, tensor) pairs that write ``src`` into ``dst`` along time: one pair for a tensor, one
    per non-empty piece of a :class:`Joined` (its views written in place: no joined copy is made)."""
    if not isinstance(src, Joined):
        return [(dst, src)]
    pairs, at = [], 0
    for part in src.parts:
        n = part.shape[-1]
        if n:
            pairs.append((dst[..., at:at + n], part))
        at += n
    return pairs


def rebound_copy(state: Any) -> Any:
    """The same tensors in new containers: a push rebinds the copy's fields and leaves ``state`` as it was."""
    return _map_state(lambda v: PositionState(v.position) if isinstance(v, PositionState) else v, state)


def copy_state_(dst: Any, src: Any, counters: bool = True) -> None:
    """In place: ``dst`` takes ``src``'s values, every tensor of ``dst`` keeping its address (a captured CUDA
    graph reads them there), and with ``counters`` every integer counter (noise positions are tensors in
    ``dst``: copied, or filled from ``src``'s ints, either way). The states have the same structure and tensor
    shapes (the same phase). No host synchronisation: the copy can be captured."""
    if isinstance(dst, list):
        for d, s in zip(dst, src, strict=True):
            copy_state_(d, s, counters)
    elif isinstance(dst, PositionState):
        if isinstance(src.position, torch.Tensor):
            dst.position.copy_(src.position)
        else:
            dst.position.fill_(src.position)
    elif dataclasses.is_dataclass(dst):
        for f in dataclasses.fields(dst):
            d, s = getattr(dst, f.name), getattr(src, f.name)
            if isinstance(d, torch.Tensor):
                if d.shape != s.shape:
                    raise ValueError(f"a state tensor {tuple(s.shape)} does not fit the fixed buffer "
                                     f"{tuple(d.shape)}: the states are not in the same phase")
                if s is not d:
                    d.copy_(s)
            elif isinstance(d, list) or dataclasses.is_dataclass(d):
                copy_state_(d, s, counters)
            elif counters:
                setattr(dst, f.name, s)
    # anything else (a stateless op's None) holds nothing


def steady_state(state: Any, advance: Callable[[Any], Any], full: Callable[[Any], bool]) -> Tuple[int, Any]:
    """The warm-up of a stream: advance ``state`` by step after step (``advance(state)`` pushes one step of
    placeholder input and returns its output) until a step leaves the state's shapes as they were and yields a
    whole step of output (``full(output)``). Returns the steps before that one, after which every step has the
    same shapes, and the state (advanced in place).

    Shapes and counters depend only on how much input a stream has received, not on its values or on how it was
    chunked: the warm-up holds for any stream. Runs on the PyTorch backend (no kernel compiled for shapes met
    only here), without autograd."""
    previous = None
    with torch.inference_mode(), use_backend("torch"):
        for step in range(1, 256):
            out = advance(state)
            shapes = state_shapes(state)
            if full(out) and shapes == previous:
                return step - 1, state
            previous = shapes
    raise AssertionError("stream state never reached a steady shape")


def row_state(state: Any, row: int) -> Any:
    """The state of one stream of a batch, as a single-stream state (batch 1, plain int noise position)."""
    def single(v: Any) -> Any:
        if not isinstance(v, PositionState):
            return v
        return PositionState(int(v.position[0]) if isinstance(v.position, torch.Tensor) else v.position)
    return _map_state(single, select_rows(state, torch.tensor([row], device=_first_tensor(state).device)))


def zero_rows(state: Any, batch: int) -> Any:
    """Same structure as ``state`` with ``batch`` rows of zeros in every tensor (noise positions 0; counters kept)."""
    def zero(v: Any) -> Any:
        if isinstance(v, PositionState):
            return PositionState(zero(v.position) if isinstance(v.position, torch.Tensor) else 0)
        return v.new_zeros(batch, *v.shape[1:]) if isinstance(v, torch.Tensor) else v
    return _map_state(zero, state)


def state_shapes(state: Any) -> List[Any]:
    """The shapes of a state's tensors, in order (counters left out)."""
    shapes: List[Any] = []
    _map_state(lambda v: shapes.append(tuple(v.shape)) if isinstance(v, torch.Tensor) else None, state)
    return shapes


def state_bytes(state: Any) -> int:
    """Bytes held by the tensors of a state."""
    total = 0

    def count(v: Any) -> Any:
        nonlocal total
        v = v.position if isinstance(v, PositionState) else v
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        return v

    _map_state(count, state)
    return total


def state_batch(state: Any) -> int:
    """The number of streams (batch rows) ``state`` holds (a steady step's contexts in place count their rows)."""
    return _first_leaf(state, (torch.Tensor, RowsOf)).shape[0]


def _first_tensor(state: Any) -> torch.Tensor:
    return _first_leaf(state, torch.Tensor)


def _first_leaf(state: Any, kinds: Any) -> Any:
    """The first leaf of ``state`` that is an instance of ``kinds``."""
    found: List[Any] = []
    _map_state(lambda v: found.append(v) if isinstance(v, kinds) else None, state)
    return found[0]
