"""Streaming counterparts of the offline layers: one mechanism, used by every layer.

A ``StreamOp`` turns a layer of the offline model into a stateful one that consumes a stream of
(B, C, n) chunks and returns, after each chunk, every output frame that has just become final, i.e. whose
whole receptive field has arrived. ``flush`` marks the end of the stream: the op applies the right-hand
zero padding the offline layer would, and returns the rest. Concatenating everything ``push`` and ``flush``
return equals the offline layer's output for any chunking.

Outputs are (B, C, m) tensors, except the last op of the encoder, ``Quantize``, whose outputs are codes: a
list of (B, t_i) int64 tensors, one per level. It emits everything at ``push`` and nothing at ``flush``, so a
``Chain`` ending with it passes its codes through and never concatenates them.

The state of each op lives in a small object of its own (created by ``init_state``): the ops hold weights
only, so one op serves any number of streams and a state can be reset or copied freely.

The non-causal convolutions of SNAC are handled without changing them: a conv keeps the inputs it still
needs (its left context, initialised to the zeros of the offline padding), and emits an output only once
its right context has arrived. The delays this creates are not declared anywhere; they follow from the
counts, and ``emitted(n)`` gives them in closed form so latencies are derived, not hard-coded.

A stream engine's steady step may hand a conv its context as rows of the engine's batch (``RowsOf``, see
``rows.rows_in_place``): the kernels read it where it lies, and the op writes the new context into those rows
right after its kernels, so the state is neither gathered nor copied twice.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..kernels.rows import RowsOf
from ..model import functional
from ..model.layers import NoiseBlock, ResidualUnit, conv_shape
from ..model.vq import ResidualVectorQuantize

Codes = List[torch.Tensor]  # one (B, t_i) int64 tensor per codebook level, coarse first


def no_codes(batch: int, levels: int, device: torch.device) -> Codes:
    """Codes of no frame: ``levels`` tensors (batch, 0) int64."""
    return [torch.zeros(batch, 0, dtype=torch.int64, device=device) for _ in range(levels)]


class Joined:
    """A new state tensor kept as the (B, C, n_i) pieces it joins along time, views of what a push read
    (``deferred_joins``). :meth:`tensor` joins them; ``rows.assign_rows`` writes each piece straight into its
    place in the batch instead."""

    __slots__ = ("parts",)

    def __init__(self, parts: Sequence[torch.Tensor]):
        self.parts: Tuple[torch.Tensor, ...] = tuple(parts)

    @property
    def shape(self) -> torch.Size:
        first = self.parts[0]
        return torch.Size((*first.shape[:-1], sum(p.shape[-1] for p in self.parts)))

    def tensor(self) -> torch.Tensor:
        """The joined tensor (a new one)."""
        return torch.cat(self.parts, dim=-1) if len(self.parts) > 1 else self.parts[0].clone()


_DEFERRED_JOINS: contextvars.ContextVar[bool] = contextvars.ContextVar("deferred_joins", default=False)


@contextlib.contextmanager
def deferred_joins() -> Iterator[None]:
    """Inside, a push keeps each new state tensor as a :class:`Joined` of views (of its input and of the old
    state) rather than copying them into a tensor of its own. For a caller that writes the new state into
    other memory right after the push (an engine's step, from rows gathered out of its batch back into it):
    one copy per state tensor instead of two. The views read buffers the caller may reuse, so nothing may read
    the state after they change; nor may the destination overlap the old state (a shift within one buffer).
    Per thread (a context variable): engines of several devices step in threads of their own."""
    token = _DEFERRED_JOINS.set(True)
    try:
        yield
    finally:
        _DEFERRED_JOINS.reset(token)


def _joined(kept: torch.Tensor, x: torch.Tensor) -> Union[torch.Tensor, Joined]:
    """A new state tensor: the old one's frames still needed (``kept``, (B, C, m)), then all of the input
    ``x`` (B, C, n). A copy, never views (the caller may reuse the buffer it pushed), except inside
    :func:`deferred_joins`, where it stays the two pieces: all of x is kept, so its view holds no memory the
    new state would not."""
    if not kept.shape[-1]:
        return _tail(x, x.shape[-1])
    if _DEFERRED_JOINS.get():
        return Joined((kept, x))
    return torch.cat([kept, x], dim=-1)


def _tail(x: torch.Tensor, frames: int) -> Union[torch.Tensor, Joined]:
    """A new state tensor: the last ``frames`` frames of the input ``x`` (B, C, n). A copy; inside
    :func:`deferred_joins`, ``x`` itself when that is all of it (a view of fewer frames would keep the whole
    input's memory alive until the state is written: every layer's input at once)."""
    if _DEFERRED_JOINS.get() and frames == x.shape[-1]:
        return Joined((x,))
    return x[..., x.shape[-1] - frames:].clone()


def _settled(v: Union[torch.Tensor, Joined, RowsOf]) -> torch.Tensor:
    """A state tensor as a tensor (a :class:`Joined` read again within the same deferred pass is joined, rows
    of a batch gathered)."""
    if isinstance(v, Joined):
        return v.tensor()
    return v.gathered() if isinstance(v, RowsOf) else v


def _advance_rows(context: RowsOf, x: torch.Tensor) -> None:
    """In place, once the kernels have read them: the rows' context becomes the last frames of ``cat(context,
    x)``, as many as before (a steady step consumes as many frames as it receives). The frames kept from the
    old context are gathered first: they move within the rows they are written to."""
    held, n = context.shape[-1], x.shape[-1]
    batch, rows = context.batch, context.rows
    if held == 0 or n == 0:  # nothing held, or nothing new: the rows stay as they are
        return
    if n >= held:
        batch.index_copy_(0, rows, x[..., n - held:])
        return
    kept = context.frames(n).gathered()
    batch[..., :held - n].index_copy_(0, rows, kept)
    batch[..., held - n:].index_copy_(0, rows, x)


class StreamOp:
    """Base class. Subclasses define ``init_state``, ``push``, ``flush`` and ``emitted``."""

    out_channels: int

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> Any:
        """A fresh state for ``batch`` independent streams."""
        return None

    def push(self, state: Any, x: torch.Tensor) -> torch.Tensor:
        """Consume (B, C_in, n) and return the (B, C_out, m) outputs that became final."""
        raise NotImplementedError

    def flush(self, state: Any) -> Optional[torch.Tensor]:
        """End of stream: apply the offline right padding and return the remaining outputs (None: none)."""
        raise NotImplementedError

    def emitted(self, n: int) -> int:
        """Outputs (frames) emitted in total after ``n`` input frames, before any flush."""
        raise NotImplementedError

    def empty(self, like: torch.Tensor) -> torch.Tensor:
        """No output: (B, C_out, 0) on ``like``'s device and dtype."""
        return like.new_zeros(like.shape[0], self.out_channels, 0)


def cat_time(parts: Sequence[Union[torch.Tensor, Codes]]) -> Union[torch.Tensor, Codes]:
    """Consecutive outputs of the same streams joined along time: (B, C, n_i) tensors, or codes level by level."""
    if isinstance(parts[0], list):
        return [torch.cat(levels, dim=-1) for levels in zip(*parts)]
    return torch.cat(list(parts), dim=-1)


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
    context: Union[torch.Tensor, Joined, RowsOf]  # inputs still needed, left padding first (B, C, L)
    received: int = 0  # inputs pushed so far
    produced: int = 0  # outputs returned so far


class SlidingWindow(StreamOp):
    """A layer whose output ``j`` reads inputs ``[j*s - p, j*s - p + span)`` of a zero-padded sequence.

    This covers every conv of SNAC and the fused residual unit. Output ``j`` is final once input
    ``j*s + span - p - 1`` has arrived. The state keeps the inputs not yet consumed (the cache), starting
    with ``p`` zeros (the left padding); ``window_fn(x, context, length)`` reads ``cat(context, x)`` without
    the caller building it, and returns ``length`` outputs: (B, C_in, n), (B, C_in, L) -> (B, C_out, length).
    """

    def __init__(self, window_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], *, span: int,
                 stride: int, pad: int, in_channels: int, out_channels: int):
        self.window_fn = window_fn
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

        def window_fn(x: torch.Tensor, context: torch.Tensor, length: int) -> torch.Tensor:
            return functional.conv(x, conv.weight, conv.bias, context=context, length=length, alpha=alpha,
                                   activation=activation, **shape)

        span = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
        return cls(window_fn, span=span, stride=conv.stride[0], pad=conv.padding[0],
                   in_channels=conv.in_channels, out_channels=conv.out_channels)

    @classmethod
    def residual_unit(cls, unit: ResidualUnit, channels: int) -> "SlidingWindow":
        """The whole residual unit; its cache is also the skip path's delay line."""
        def window_fn(x: torch.Tensor, context: torch.Tensor, length: int) -> torch.Tensor:
            return unit.fused_forward(x, context=context, length=length)

        return cls(window_fn, span=2 * unit.pad + 1, stride=1, pad=unit.pad, in_channels=channels,
                   out_channels=channels)

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> _WindowState:
        return _WindowState(torch.zeros(batch, self.in_channels, self.pad, device=device, dtype=dtype))

    def _run(self, state: _WindowState, x: torch.Tensor, count: int) -> torch.Tensor:
        """Compute ``count`` outputs from ``cat(context, x)``; keep the inputs later outputs still need."""
        in_rows = isinstance(state.context, RowsOf)  # an engine's steady step: the context stays in its rows
        consumed = count * self.stride
        if in_rows and consumed != x.shape[-1]:
            raise ValueError(f"a context kept in its batch rows must keep its length: {x.shape[-1]} frames in, "
                             f"{consumed} consumed")
        context = state.context if in_rows else _settled(state.context)
        y = self.window_fn(x, context, count) if count > 0 else self.empty(x)
        held = context.shape[-1]
        if in_rows:
            _advance_rows(context, x)
        elif consumed >= held:  # what is still needed lies in x: its frames from consumed - held on
            state.context = _tail(x, held + x.shape[-1] - consumed)
        else:
            state.context = _joined(context[..., consumed:], x)
        state.produced += count
        return y

    def push(self, state: _WindowState, x: torch.Tensor) -> torch.Tensor:
        state.received += x.shape[-1]
        return self._run(state, x, self.emitted(state.received) - state.produced)

    def flush(self, state: _WindowState) -> torch.Tensor:
        context = state.context = _settled(state.context)
        zeros = context.new_zeros(*context.shape[:2], self.pad)
        return self._run(state, zeros, self.total(state.received) - state.produced)

    def emitted(self, n: int) -> int:
        return max(0, (n + self.pad - self.span) // self.stride + 1) if n > 0 else 0

    def total(self, n: int) -> int:
        """Offline output length for ``n`` inputs."""
        return max(0, (n + 2 * self.pad - self.span) // self.stride + 1)


@dataclass
class _TransposedState:
    context: Union[torch.Tensor, Joined, RowsOf]  # the last input frame (B, C_in, 1): the next output's first tap
    to_skip: int  # leading outputs the offline padding crops away
    received: int = 0


class ConvTranspose(StreamOp):
    """``nn.ConvTranspose1d`` with kernel ``2s``, stride ``s`` (SNAC's upsampling), any padding ``p <= s`` and
    output padding up to ``p``.

    Written as a 2-tap conv over input frames (``functional.conv_transpose``): input frame ``i`` completes
    outputs ``[i*s, (i+1)*s)`` together with frame ``i - 1``, kept as the state. The offline layer crops
    ``p`` outputs on the left; the flush adds the last frame's tail up to the offline length. ``alpha``: the
    snake before the layer, applied in the same call (the state keeps the frame before it). ``channels_last``:
    the outputs may be strided views of the product's rows (``functional.conv_transpose``), for a next op
    that reads any strides.
    """

    def __init__(self, conv: nn.ConvTranspose1d, alpha: Optional[torch.Tensor] = None, channels_last: bool = False):
        self.conv = conv
        self.alpha = alpha
        self.channels_last = channels_last
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
                                      context=_settled(state.context), crop=skip, length=length, alpha=self.alpha,
                                      channels_last=self.channels_last)
        state.to_skip -= skip
        return y

    def push(self, state: _TransposedState, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 0:
            return self.empty(x)
        state.received += x.shape[-1]
        y = self._run(state, x)
        if isinstance(state.context, RowsOf):  # an engine's steady step: the context stays in its rows
            _advance_rows(state.context, x)
        else:
            state.context = _tail(x, 1)
        return y

    def flush(self, state: _TransposedState) -> Optional[torch.Tensor]:
        if state.received == 0:
            return None
        # The right padding's frame (snake(0) is 0): the last input frame's tail, up to the offline length
        # (T+1)s - 2p + extra.
        keep = self.stride - self.pad + self.extra - state.to_skip
        return self._run(state, torch.zeros_like(_settled(state.context)), max(0, keep))

    def emitted(self, n: int) -> int:
        return max(0, n * self.stride - self.pad)


# States whose ``context`` a stream engine may hand over as rows of its batch (``RowsOf``): their ops read it
# through the kernels and write the next one into those rows (``rows.rows_in_place``).
CONTEXT_STATES = (_WindowState, _TransposedState)


class Chain(StreamOp):
    """Ops in sequence. On flush, each op's tail is pushed into the next op before that op is flushed.

    Its state is the list of its ops' states; its outputs are its last op's (codes when that is ``Quantize``).
    """

    def __init__(self, ops: Sequence[StreamOp]):
        self.ops = list(ops)
        self.out_channels = self.ops[-1].out_channels

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> List[Any]:
        return [op.init_state(batch, device, dtype) for op in self.ops]

    def push(self, state: List[Any], x: torch.Tensor) -> Union[torch.Tensor, Codes]:
        for op, s in zip(self.ops, state):
            x = op.push(s, x)
        return x

    def flush(self, state: List[Any]) -> Union[torch.Tensor, Codes, None]:
        tail: Union[torch.Tensor, Codes, None] = None
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
class PositionState:
    """The noise op's state: the absolute index of the next frame, which keys its noise.

    An int for a single stream; batched states (``rows.batch_positions``) hold an int64 tensor (B,) instead,
    one position per stream.
    """
    position: int | torch.Tensor = 0


class Noise(StreamOp):
    """Noise block: stateless but for the absolute position that keys its deterministic noise."""

    def __init__(self, block: NoiseBlock, channels: int):
        self.block = block
        self.out_channels = channels

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> PositionState:
        return PositionState()

    def push(self, state: PositionState, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 0:
            return x
        y = self.block.apply_at(x, state.position)
        state.position = state.position + x.shape[-1]  # rebinds: a batch's position tensor is never written in place
        # ``x`` may be the upsampling's channels-last view (``ConvTranspose.channels_last``): the fused kernel
        # reads it as it lies and writes a new (B, C, T) tensor; the other modes may hand it (or its layout) on.
        return y.contiguous()

    def flush(self, state: PositionState) -> Optional[torch.Tensor]:
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


class Quantize(Blockwise):
    """The residual VQ: (B, D, n) latent frames in, the codes of every coarse frame now whole out.

    The quantizer's stride pooling is aligned to absolute frame 0, so latent frames are quantized in whole
    coarse frames (``group = vq_strides[0]`` latent frames); the state holds those of the coarse frame not yet
    whole. Outputs are ``Codes``: per level (B, t_i) int64, ``t_i = k * vq_strides[0] // vq_strides[i]`` for
    ``k`` coarse frames; ``emitted`` counts coarse frames. It sits last in the encoder's chain. The encoder's
    input is padded to whole coarse frames, so a flush with latent frames left over is a bug, not misuse.
    """

    def __init__(self, quantizer: ResidualVectorQuantize, group: int, latent_dim: int):
        # Its "channels" out are the code levels, one (B, t_i) tensor each.
        super().__init__(lambda z: quantizer(z)[1], group, latent_dim, quantizer.n_codebooks, "coarse frame")

    def empty(self, like: torch.Tensor) -> Codes:
        """No codes: one (B, 0) int64 tensor per level, on ``like``'s device."""
        return no_codes(like.shape[0], self.out_channels, like.device)

    def flush(self, state: _BlockState) -> None:
        if state.pending.shape[-1]:
            raise AssertionError("encoder ended between coarse frames; padding arithmetic is off")
        return None

    def emitted(self, n: int) -> int:
        return n // self.size


def clone_state(state: Any) -> Any:
    """Independent copy of a (nested) op state (the decoder's early emission runs its flush on one)."""
    return copy.deepcopy(state)
