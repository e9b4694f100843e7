"""Pieces shared by the kernels: the snake activation, tanh and the "context + chunk" input addressing of the
convolutions, and the host-side argument checks, launch limits and precision of every kernel.

The context + chunk convention: a conv kernel reads its input as the concatenation along time of an optional
``context`` (B, C, L), the streaming cache of earlier inputs, and ``x`` (B, C, T), the new chunk, with
``padding`` virtual zeros at both ends. The concatenation is never materialised: element ``u`` of the
unpadded sequence comes from ``context[..., u]`` when ``u < L`` and from ``x[..., u - L]`` otherwise. Offline
calls pass ``context=None, padding=p``; streaming calls pass the cache and ``padding=0``. A context may also be
rows of an engine's batch (``rows.RowsOf``): the kernels then find each batch item's context through the row
list (:func:`batch_row`), where it lies.

All tensors are float32; time is in frames of the layer's own rate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from .precision import DEFAULT_PRECISION, check_precision
from .rows import RowsOf

PRECISE_SIN_ENV = "SNAC_STREAM_PRECISE_SIN"
# CUDA's limit on the 2nd and 3rd dimensions of a launch grid.
MAX_GRID_YZ = 65535

# 2*pi split in two for range reduction: _TWO_PI_HI has 8 significant bits, so n * _TWO_PI_HI is exact in fp32
# for |n| < 2**16 (|alpha * x| < 4e5 rad) and the reduction loses only the rounding of n * _TWO_PI_LO.
_INV_TWO_PI = tl.constexpr(0.15915494309189535)
_TWO_PI_HI = tl.constexpr(6.28125)
_TWO_PI_LO = tl.constexpr(0.0019353071795864769)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_fast_sin(device: torch.device | str) -> bool:
    """Whether kernels on ``device`` may use the hardware ``sin.approx.f32`` (CUDA only, not interpreting).

    Setting ``SNAC_STREAM_PRECISE_SIN=1`` forces the precise ``tl.sin`` everywhere.
    """
    if os.environ.get(PRECISE_SIN_ENV) == "1" or interpreting():
        return False
    return torch.device(device).type == "cuda"


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _sin_approx(x):
    """Hardware sine (one MUFU op); about 5e-7 absolute error on [-pi, pi], worse outside: reduce first."""
    return tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def snake(x, alpha, FAST_SIN: tl.constexpr):
    """Snake ``x + sin(alpha x)^2 * (1 / (alpha + 1e-9))``, as the reference computes it.

    ``alpha`` broadcasts against ``x`` (per channel, e.g. (BLOCK_C, 1)); the reciprocal is taken on its own
    small shape, before broadcasting. With FAST_SIN the argument is first reduced to [-pi, pi] (Cody-Waite,
    two constants) so that the hardware sine keeps its accuracy for large ``alpha * x``.
    """
    a = alpha * x
    if FAST_SIN:
        n = tl.floor(a * _INV_TWO_PI + 0.5)
        r = (a - n * _TWO_PI_HI) - n * _TWO_PI_LO
        s = _sin_approx(r)
    else:
        s = tl.sin(a)
    return x + s * s * (1.0 / (alpha + 1e-9))


@triton.jit
def tanh(x):
    """tanh from one exp: odd-symmetric, saturates to +-1 without overflow, ~1e-7 absolute error."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def load_ctx_chunk(ctx_ptr, x_ptr, ctx_row, x_row, ctx_stride_t, x_stride_t, u, L, T, mask,
                   HAS_CTX: tl.constexpr):
    """Elements at time ``u`` of ``cat([context, x], time)``, zero outside ``[0, L + T)`` or where ``~mask``.

    ``ctx_ptr`` / ``x_ptr`` point at the current batch item; ``ctx_row`` / ``x_row`` are per-row element
    offsets (channel * channel stride, int64 so large tensors cannot overflow); ``u`` is the virtual time
    index in frames, broadcastable against the rows. Each element is read through exactly one of the two
    (predicated) loads; without context the first load is compiled out.
    """
    in_x = mask & (u >= L) & (u < L + T)
    v = tl.load(x_ptr + x_row + (u - L) * x_stride_t, mask=in_x, other=0.0)
    if HAS_CTX:
        in_ctx = mask & (u >= 0) & (u < L)
        v_ctx = tl.load(ctx_ptr + ctx_row + u * ctx_stride_t, mask=in_ctx, other=0.0)
        v = tl.where(in_ctx, v_ctx, v)
    return v


@triton.jit
def batch_row(rows_ptr, b, mask, HAS_ROWS: tl.constexpr):
    """The batch row (int64) of batch item ``b`` (a scalar or a vector, valid where ``mask``): ``rows[b]`` with a
    row list, else ``b`` itself."""
    if HAS_ROWS:
        return tl.load(rows_ptr + b, mask=mask, other=0).to(tl.int64)
    return b


@triton.jit
def window_tap(v, k: tl.constexpr, DIL: tl.constexpr, BLOCK_T: tl.constexpr):
    """Tap ``k`` of a window ``v`` (rows, BLOCK_T) of consecutive frames: lane ``i`` gets frame
    ``(i + k*DIL) mod BLOCK_T``.

    A uniform compile-time rotation, which Triton lowers to about one warp shuffle per element (a clamp
    instead of the wrap, or a run-time shift, costs several). Lanes whose taps wrap around must not be
    stored by the caller.
    """
    if k == 0:
        return v
    src = (tl.arange(0, BLOCK_T) + k * DIL) & (BLOCK_T - 1)
    return tl.gather(v, tl.broadcast_to(src[None, :], v.shape), 1)


# ----------------------------------------------------------------------------------------------------------
# Host helpers
# ----------------------------------------------------------------------------------------------------------


# Plain-integer versions of triton.cdiv / triton.next_power_of_2, which cost microseconds per call on the host
# and sit on every launch's path.
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(0, n - 1).bit_length()


def pow2_in(n: int, low: int, high: int) -> int:
    """The power of two covering ``n``, clamped to [low, high]."""
    return min(high, max(low, next_pow2(max(1, n))))


def check_grid(grid: Tuple[int, ...], *names: str) -> None:
    """Refuse a launch whose 2nd or 3rd grid dimension (named by ``names``, in order) exceeds CUDA's limit."""
    for programs, name in zip(grid[1:], names):
        if programs > MAX_GRID_YZ:
            raise ValueError(f"{name} ({programs}) exceeds the kernel's grid limit of {MAX_GRID_YZ}")


def resolve_precision(precision: Optional[str], device: torch.device) -> str:
    """The ``tl.dot`` precision of a launch on ``device``: ``precision`` (one of ``PRECISIONS``), or for None
    ``"tf32x3"`` on CUDA and ``"ieee"`` under the interpreter (whose products are fp32 whatever the precision)."""
    if precision is None:
        return DEFAULT_PRECISION if device.type == "cuda" and not interpreting() else "ieee"
    return check_precision(precision)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(name: str, t: object, ndim: Union[int, Tuple[int, ...]], device: Optional[torch.device] = None,
                 dtypes: Tuple[torch.dtype, ...] = (torch.float32,)) -> torch.Tensor:
    """Check that ``t`` is a tensor of one of ``dtypes`` with ``ndim`` dimensions (or one of several), on
    ``device`` if given, and return it.

    Kernels index time with 32-bit offsets (batch and channel offsets are 64-bit), so the last dimension's
    extent in elements must stay below 2**31.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(map(_dtype_name, dtypes))}, got {_dtype_name(t.dtype)}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in ndims:
        count = " or ".join(map(str, ndims)) + (" dimension" if ndims == (1,) else " dimensions")
        raise ValueError(f"{name} must be {' or '.join(f'{n}-D' for n in ndims)} ({count}), got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}; all tensors must share a device")
    if t.dim() and t.shape[-1] * max(1, t.stride(-1)) >= 2**31:
        raise ValueError(f"{name} spans 2**31 elements or more along time; split it into chunks")
    return t


def check_shape(name: str, t: object, shape: Tuple[int, ...], device: Optional[torch.device] = None) -> torch.Tensor:
    """A float32 tensor checked as by :func:`check_tensor` and against its exact ``shape``."""
    check_tensor(name, t, len(shape), device)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t


def per_channel(name: str, t: Optional[torch.Tensor], channels: int, device: torch.device) -> Optional[torch.Tensor]:
    """A per-channel parameter given as (C,), (1, C, 1) or (C, 1), as a contiguous (C,) tensor."""
    if t is None:
        return None
    check_tensor(name, t, t.dim() if isinstance(t, torch.Tensor) else 1, device)
    if t.numel() != channels or (t.dim() > 1 and max(t.shape) != channels):
        raise ValueError(f"{name} must hold one value per channel ({channels}), got shape {tuple(t.shape)}")
    return t.reshape(channels).contiguous()


@dataclass(frozen=True)
class ChunkInput:
    """Kernel arguments for the virtual sequence ``cat([context, x], time)`` of shape (B, C, L + T).

    Without context, ``ctx`` aliases ``x`` (never read: ``has_ctx`` is False and ``length_ctx`` 0). With
    ``ctx_rows`` (B,) int64, batch item ``b``'s context is row ``ctx_rows[b]`` of ``ctx`` (an engine's batch).
    """

    x: torch.Tensor
    ctx: torch.Tensor
    length_ctx: int
    has_ctx: bool
    ctx_rows: Optional[torch.Tensor] = None

    @property
    def total(self) -> int:
        """Frames in the virtual sequence, padding excluded."""
        return self.length_ctx + self.x.shape[-1]

    def pointer_args(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.ctx, self.x

    def rows_arg(self) -> torch.Tensor:
        """The context's row list, or (never read: no ``ctx_rows``) ``x``."""
        return self.ctx_rows if self.ctx_rows is not None else self.x

    def stride_args(self) -> Tuple[int, ...]:
        """(ctx batch, ctx channel, ctx time, x batch, x channel, x time) strides, in elements."""
        return (*self.ctx.stride(), *self.x.stride())


def chunk_input(name: str, x: torch.Tensor, context: Union[torch.Tensor, RowsOf, None], ctx_name: str,
                rows: bool = False) -> ChunkInput:
    """Validate ``x`` (B, C, T) and the optional ``context`` (B, C, L) that precedes it in time; ``rows``: the
    caller's kernel reads a :class:`RowsOf` context in place (otherwise it is gathered here)."""
    check_tensor(name, x, 3)
    if context is None:
        return ChunkInput(x, x, 0, False)
    ctx_rows = None
    if isinstance(context, RowsOf):
        check_tensor(f"{ctx_name}.rows", context.rows, 1, x.device, (torch.int64,))
        if rows:
            context, ctx_rows = context.batch, context.rows
        else:
            context = context.gathered()
    check_tensor(ctx_name, context, 3, x.device)
    shape = (context.shape[0] if ctx_rows is None else ctx_rows.shape[0], *context.shape[1:])
    if shape[:2] != x.shape[:2]:
        raise ValueError(f"{ctx_name} {shape} and {name} {tuple(x.shape)} must agree in batch and channels")
    if context.shape[-1] == 0:
        return ChunkInput(x, x, 0, False)
    return ChunkInput(x, context, context.shape[-1], True, ctx_rows)


def output_length(total: int, padding: int, kernel_size: int, stride: int, dilation: int,
                  length: Optional[int]) -> int:
    """Outputs of a conv over ``total`` frames plus ``padding`` zeros on each side: ``length`` if given
    (it must not exceed the maximum), else the maximum ``(total + 2p - d(K-1) - 1) // s + 1``."""
    for what, v, low in (("padding", padding, 0), ("stride", stride, 1), ("dilation", dilation, 1)):
        if not isinstance(v, int) or v < low:
            raise ValueError(f"{what} must be an int >= {low}, got {v!r}")
    most = max(0, (total + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1)
    if length is None:
        return most
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be a non-negative int, got {length!r}")
    if length > most:
        raise ValueError(f"length {length} exceeds the {most} outputs that {total} input frames allow "
                         f"(padding {padding}, kernel {kernel_size}, stride {stride}, dilation {dilation})")
    return length


def _byte_span(t: torch.Tensor) -> Tuple[int, int]:
    """[first, last + 1) byte addresses a (non-empty) tensor view can touch."""
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def output_buffer(out: Optional[torch.Tensor], shape: Sequence[int], device: torch.device,
                  dtype: torch.dtype = torch.float32, **inputs: Optional[torch.Tensor]) -> torch.Tensor:
    """A new uninitialised tensor of ``shape`` and ``dtype`` (the kernel writes every element), or the caller's
    ``out`` (any strides) checked against them and against sharing memory with any of ``inputs``: tiles
    would read elements other tiles already wrote."""
    if out is None:
        return torch.empty(tuple(shape), device=device, dtype=dtype)
    check_tensor("out", out, len(shape), device, (dtype,))
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, but out must have shape {tuple(shape)}")
    if out.numel():
        lo, hi = _byte_span(out)
        for name, t in inputs.items():
            if t is None or t.numel() == 0 or t.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
                continue
            start, end = _byte_span(t)
            if start < hi and lo < end:
                raise ValueError(f"out overlaps {name} in memory; pass a separate output buffer")
    return out
