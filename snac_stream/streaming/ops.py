"""Streaming counterparts of the offline layers: one mechanism, used by every layer.

A ``StreamOp`` turns a layer of the offline model into a stateful one that consumes a stream of
(B, C, n) chunks and returns, after each chunk, every output frame that has just become final, i.e. whose
whole receptive field has arrived. ``flush`` marks the end of the stream: the op applies the right-hand
zero padding the offline layer would, and returns the rest. Concatenating everything ``push`` and ``flush``
return equals the offline layer's output for any chunking.

The state of each op lives in a small object of its own (created by ``init_state``): the ops hold weights
only, so one op serves any number of streams and a state can be reset or copied freely.

The non-causal convolutions of SNAC are handled without changing them: a conv keeps the inputs it still
needs (its left context, initialised to the zeros of the offline padding), and emits an output only once
its right context has arrived. The delays this creates are not declared anywhere; they follow from the
counts, and ``emitted(n)`` gives them in closed form so latencies are derived, not hard-coded.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import nn

from ..model import functional
from ..model.layers import NoiseBlock, ResidualUnit, conv_shape


class StreamOp:
    """Base class. Subclasses define ``init_state``, ``push``, ``flush`` and ``emitted``."""

    out_channels: int

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> Any:
        return None

    def push(self, state: Any, x: torch.Tensor) -> torch.Tensor:
        """Consume (B, C_in, n) and return the (B, C_out, m) outputs that became final."""
        raise NotImplementedError

    def flush(self, state: Any) -> torch.Tensor:
        """End of stream: apply the offline right padding and return the remaining outputs."""
        raise NotImplementedError

    def emitted(self, n: int) -> int:
        """Outputs emitted in total after ``n`` inputs, before any flush."""
        raise NotImplementedError

    def empty(self, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(like.shape[0], self.out_channels, 0)


def _cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape[-1] == 0:
        return b
    if b.shape[-1] == 0:
        return a
    return torch.cat([a, b], dim=-1)


class Pointwise(StreamOp):
    """A layer that acts on each frame alone (snake, 1x1 conv, tanh): stateless."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], out_channels: int):
        self.fn = fn
        self.out_channels = out_channels

    def push(self, state: Any, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) if x.shape[-1] else self.empty(x)

    def flush(self, state: Any) -> Optional[torch.Tensor]:
        return None

    def emitted(self, n: int) -> int:
        return n


@dataclass
class _WindowState:
    context: torch.Tensor  # inputs still needed, left padding first (B, C, L)
    received: int = 0  # inputs pushed so far
    produced: int = 0  # outputs returned so far


class SlidingWindow(StreamOp):
    """A layer whose output ``j`` reads inputs ``[j*s - p, j*s - p + span)`` of a zero-padded sequence.

    This covers every conv of SNAC and the fused residual unit. Output ``j`` is final once input
    ``j*s + span - p - 1`` has arrived. The state keeps the inputs not yet consumed (the cache), starting
    with ``p`` zeros (the left padding); ``compute(x, context, length)`` reads ``cat(context, x)`` without
    the caller building it, and returns ``length`` outputs.
    """

    def __init__(self, compute: Callable[..., torch.Tensor], *, span: int, stride: int, pad: int,
                 in_channels: int, out_channels: int):
        self.compute = compute
        self.span = span
        self.stride = stride
        self.pad = pad
        self.in_channels = in_channels
        self.out_channels = out_channels

    @classmethod
    def conv(cls, conv: nn.Conv1d, alpha: Optional[torch.Tensor] = None, activation: Optional[str] = None
             ) -> "SlidingWindow":
        """``nn.Conv1d`` with symmetric zero padding, any kernel, dilation, stride; optional snake before it."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("streaming supports explicit zero padding only")
        shape = conv_shape(conv)

        def compute(x: torch.Tensor, context: torch.Tensor, length: int) -> torch.Tensor:
            return functional.conv(x, conv.weight, conv.bias, context=context, length=length, alpha=alpha,
                                   activation=activation, **shape)

        span = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
        return cls(compute, span=span, stride=conv.stride[0], pad=conv.padding[0],
                   in_channels=conv.in_channels, out_channels=conv.out_channels)

    @classmethod
    def residual_unit(cls, unit: ResidualUnit, channels: int) -> "SlidingWindow":
        """The whole residual unit; its cache is also the skip path's delay line."""
        def compute(x: torch.Tensor, context: torch.Tensor, length: int) -> torch.Tensor:
            return unit.compute(x, context=context, length=length)

        return cls(compute, span=2 * unit.pad + 1, stride=1, pad=unit.pad, in_channels=channels,
                   out_channels=channels)

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> _WindowState:
        return _WindowState(torch.zeros(batch, self.in_channels, self.pad, device=device, dtype=dtype))

    def _run(self, state: _WindowState, x: torch.Tensor, count: int) -> torch.Tensor:
        """Compute ``count`` outputs from ``cat(context, x)``; keep the inputs later outputs still need."""
        y = self.compute(x, state.context, count) if count > 0 else self.empty(x)
        consumed = count * self.stride
        held = state.context.shape[-1]
        # Copies, never views: the caller may reuse the buffer it pushed.
        if consumed >= held:
            state.context = x[..., consumed - held:].clone()
        else:
            state.context = torch.cat([state.context[..., consumed:], x], dim=-1)
        state.produced += count
        return y

    def push(self, state: _WindowState, x: torch.Tensor) -> torch.Tensor:
        state.received += x.shape[-1]
        return self._run(state, x, self.emitted(state.received) - state.produced)

    def flush(self, state: _WindowState) -> torch.Tensor:
        zeros = state.context.new_zeros(*state.context.shape[:2], self.pad)
        return self._run(state, zeros, self.total(state.received) - state.produced)

    def emitted(self, n: int) -> int:
        return max(0, (n + self.pad - self.span) // self.stride + 1) if n > 0 else 0

    def total(self, n: int) -> int:
        """Offline output length for ``n`` inputs."""
        return max(0, (n + 2 * self.pad - self.span) // self.stride + 1)


@dataclass
class _TransposedState:
    context: torch.Tensor  # the last input frame (B, C_in, 1): the first tap of the next output frame
    to_skip: int  # leading outputs the offline padding crops away
    received: int = 0


class ConvTranspose(StreamOp):
    """``nn.ConvTranspose1d`` with kernel ``2s``, stride ``s`` (SNAC's upsampling), any padding ``p <= s`` and
    output padding up to ``p``.

    Written as a 2-tap conv over input frames (``functional.conv_transpose``): input frame ``i`` completes
    outputs ``[i*s, (i+1)*s)`` together with frame ``i - 1``, kept as the state. The offline layer crops
    ``p`` outputs on the left; the flush adds the last frame's tail up to the offline length.
    """

    def __init__(self, conv: nn.ConvTranspose1d):
        self.conv = conv
        self.stride = conv.stride[0]
        self.pad = conv.padding[0]
        self.extra = conv.output_padding[0]
        if conv.kernel_size[0] != 2 * self.stride or conv.dilation[0] != 1 or conv.groups != 1:
            raise ValueError("streaming ConvTranspose expects kernel 2*stride, dilation 1, groups 1")
        if self.pad > self.stride or self.extra > self.pad:
            raise ValueError("streaming ConvTranspose expects padding <= stride and output_padding <= padding")
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> _TransposedState:
        # A zero frame is the offline layer's left padding.
        return _TransposedState(torch.zeros(batch, self.in_channels, 1, device=device, dtype=dtype), self.pad)

    def _run(self, state: _TransposedState, x: torch.Tensor, length: Optional[int] = None) -> torch.Tensor:
        skip = min(state.to_skip, x.shape[-1] * self.stride)
        y = functional.conv_transpose(x, self.conv.weight, self.conv.bias, stride=self.stride,
                                      context=state.context, crop=skip, length=length)
        state.to_skip -= skip
        return y

    def push(self, state: _TransposedState, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 0:
            return self.empty(x)
        state.received += x.shape[-1]
        y = self._run(state, x)
        state.context = x[..., -1:].clone()  # a copy: do not keep the whole chunk alive
        return y

    def flush(self, state: _TransposedState) -> Optional[torch.Tensor]:
        if state.received == 0:
            return None
        # The right padding's frame: the last input frame's tail, up to the offline length (T+1)s - 2p + extra.
        keep = self.stride - self.pad + self.extra - state.to_skip
        return self._run(state, torch.zeros_like(state.context), max(0, keep))

    def emitted(self, n: int) -> int:
        return max(0, n * self.stride - self.pad)


class Chain(StreamOp):
    """Ops in sequence. On flush, each op's tail is pushed into the next op before that op is flushed."""

    def __init__(self, ops: Sequence[StreamOp]):
        self.ops = list(ops)
        self.out_channels = self.ops[-1].out_channels

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> List[Any]:
        return [op.init_state(batch, device, dtype) for op in self.ops]

    def push(self, state: List[Any], x: torch.Tensor) -> torch.Tensor:
        for op, s in zip(self.ops, state):
            x = op.push(s, x)
        return x

    def flush(self, state: List[Any]) -> Optional[torch.Tensor]:
        tail: Optional[torch.Tensor] = None
        for op, s in zip(self.ops, state):
            pushed = op.push(s, tail) if tail is not None else None
            rest = op.flush(s)
            parts = [t for t in (pushed, rest) if t is not None]
            tail = _cat(*parts) if len(parts) == 2 else (parts[0] if parts else None)
        return tail

    def emitted(self, n: int) -> int:
        for op in self.ops:
            n = op.emitted(n)
        return n


@dataclass
class _CounterState:
    position: int = 0  # absolute index of the next frame


class Noise(StreamOp):
    """Noise block: stateless but for the absolute position that keys its deterministic noise."""

    def __init__(self, block: NoiseBlock, channels: int):
        self.block = block
        self.out_channels = channels

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> _CounterState:
        return _CounterState()

    def push(self, state: _CounterState, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 0:
            return x
        y = self.block.apply_at(x, state.position)
        state.position = state.position + x.shape[-1]  # rebinds: a batch's position tensor is never written in place
        return y

    def flush(self, state: _CounterState) -> Optional[torch.Tensor]:
        return None

    def emitted(self, n: int) -> int:
        return n


@dataclass
class _BlockState:
    pending: torch.Tensor  # frames of the block being filled (B, C, L < size)


class Blockwise(StreamOp):
    """A layer that maps each aligned block of ``size`` frames on its own (local attention windows, VQ groups).

    Frames are buffered until a block is whole. A partial block at the end of the stream is an error: the
    offline model would reject it too.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], size: int, in_channels: int, out_channels: int,
                 what: str):
        self.fn = fn
        self.size = size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.what = what

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> _BlockState:
        return _BlockState(torch.zeros(batch, self.in_channels, 0, device=device, dtype=dtype))

    def push(self, state: _BlockState, x: torch.Tensor) -> torch.Tensor:
        state.pending = _cat(state.pending, x)
        whole = state.pending.shape[-1] // self.size * self.size
        if whole == 0:
            return self.empty(x)
        y = self.fn(state.pending[..., :whole])
        state.pending = state.pending[..., whole:]
        return y

    def flush(self, state: _BlockState) -> None:
        left = state.pending.shape[-1]
        if left:
            raise ValueError(f"stream ended inside a {self.what} of {self.size} frames ({left} frames left over)")
        return None

    def emitted(self, n: int) -> int:
        return n // self.size * self.size


def clone_state(state: Any) -> Any:
    """Independent copy of a (nested) op state, for look-ahead decoding and tests."""
    return copy.deepcopy(state)


# ---- batch rows of a state: one row per independent stream ---------------------------------------------
#
# Tensors in a state have the batch (stream) on dim 0. Integer counters (inputs received, outputs produced)
# only decide how many frames the next push emits; streams that receive the same number of frames per push
# agree on that once they are past their start, so a batch keeps one set. The noise position is the
# exception: it keys each stream's noise, so batched states hold it as an int64 tensor, one per row.


def _map_state(fn: Callable[..., Any], state: Any, *others: Any) -> Any:
    """Apply ``fn`` to the leaves of a (nested) state: tensors, counters and noise positions (``_CounterState``)."""
    if isinstance(state, list):
        return [_map_state(fn, s, *(o[i] for o in others)) for i, s in enumerate(state)]
    if dataclasses.is_dataclass(state) and not isinstance(state, _CounterState):
        return type(state)(**{f.name: _map_state(fn, getattr(state, f.name), *(getattr(o, f.name) for o in others))
                              for f in dataclasses.fields(state)})
    return fn(state, *others)


def batch_positions(state: Any, batch: int, device: torch.device) -> Any:
    """A batched state with per-row noise positions (int64 tensors) instead of one shared int."""
    def per_row(v: Any) -> Any:
        if isinstance(v, _CounterState):
            return _CounterState(torch.full((batch,), v.position, dtype=torch.int64, device=device))
        return v
    return _map_state(per_row, state)


def select_rows(state: Any, rows: torch.Tensor) -> Any:
    """The sub-state of the streams in ``rows`` (a copy); counters are shared, noise positions per row."""
    def pick(v: Any) -> Any:
        if isinstance(v, _CounterState):
            return _CounterState(pick(v.position))
        return v.index_select(0, rows) if isinstance(v, torch.Tensor) else v
    return _map_state(pick, state)


def assign_rows(state: Any, rows: torch.Tensor, sub: Any) -> Any:
    """Write ``sub`` (a state of ``len(rows)`` streams) into ``rows`` of ``state``, in place; returns the
    updated state (its tensors are ``state``'s own, so views and captured graphs of them stay valid).

    Tensors must agree in shape beyond the batch dim: the streams are in the same phase. Counters take the
    sub-state's values, which are the same for every stream in that phase.
    """
    def put(dst: Any, src: Any) -> Any:
        if isinstance(dst, _CounterState):
            position = src.position
            if not isinstance(position, torch.Tensor):  # a single stream's noise position
                position = torch.full((len(rows),), position, dtype=torch.int64, device=dst.position.device)
            return _CounterState(dst.position.index_copy_(0, rows, position))
        if isinstance(dst, torch.Tensor):
            if dst.shape[1:] != src.shape[1:]:
                raise ValueError(f"stream state {tuple(src.shape)} does not fit the batch's {tuple(dst.shape)}")
            return dst.index_copy_(0, rows, src.to(dst.dtype))
        return src
    return _map_state(put, state, sub)


def first_rows(state: Any, count: int) -> Any:
    """The first ``count`` rows of a batched state as views: writes to them write the batch."""
    def head(v: Any) -> Any:
        if isinstance(v, _CounterState):
            return _CounterState(v.position[:count])
        return v[:count] if isinstance(v, torch.Tensor) else v
    return _map_state(head, state)


def rebound_copy(state: Any) -> Any:
    """The same tensors in new containers: a push rebinds the copy's fields and leaves ``state`` as it was."""
    return _map_state(lambda v: _CounterState(v.position) if isinstance(v, _CounterState) else v, state)


def blend_rows_(state: Any, new: Any, mask: torch.Tensor) -> None:
    """In place: rows of ``state`` where ``mask`` (B,) is set take ``new``'s values, the others keep theirs.

    ``new`` is ``state`` advanced by a push of a ``rebound_copy``; counters are left alone (every row is in
    the same phase). No host synchronisation, so the blend can be captured in a CUDA graph.
    """
    def blend(dst: Any, src: Any) -> Any:
        if isinstance(dst, _CounterState):
            dst, src = dst.position, src.position
        if isinstance(dst, torch.Tensor) and src is not dst:
            if dst.shape != src.shape:
                raise ValueError(f"a push changed a state tensor's shape {tuple(dst.shape)} -> {tuple(src.shape)}: "
                                 "the rows are not in their steady phase")
            dst.copy_(torch.where(mask.view(-1, *([1] * (dst.dim() - 1))), src, dst))
        return dst
    _map_state(blend, state, new)


def row_state(state: Any, row: int) -> Any:
    """The state of one stream of a batch, as a single-stream state (batch 1, plain int noise position)."""
    def single(v: Any) -> Any:
        if not isinstance(v, _CounterState):
            return v
        return _CounterState(int(v.position[0]) if isinstance(v.position, torch.Tensor) else v.position)
    return _map_state(single, select_rows(state, torch.tensor([row], device=_first_tensor(state).device)))


def zero_rows(state: Any, batch: int) -> Any:
    """Same structure as ``state`` with ``batch`` rows of zeros in every tensor (noise positions 0; counters kept)."""
    def zero(v: Any) -> Any:
        if isinstance(v, _CounterState):
            return _CounterState(zero(v.position) if isinstance(v.position, torch.Tensor) else 0)
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
        v = v.position if isinstance(v, _CounterState) else v
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        return v

    _map_state(count, state)
    return total


def state_batch(state: Any) -> int:
    """The number of streams (batch rows) ``state`` holds."""
    return _first_tensor(state).shape[0]


def _first_tensor(state: Any) -> torch.Tensor:
    found: List[torch.Tensor] = []
    _map_state(lambda v: found.append(v) if isinstance(v, torch.Tensor) else None, state)
    return found[0]
