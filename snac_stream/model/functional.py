"""The model's convolutions as one function with two backends: PyTorch and the Triton kernels.

``conv`` is the single entry point the offline layers (on the Triton backend) and every streaming op call.
Its input is the virtual concatenation of an optional ``context`` (the streaming cache of earlier inputs)
and the new chunk ``x``: offline calls pass ``padding``, streaming calls pass the cache. Snake activations
before and after the conv, the residual add, SNAC's noise multiply and the final tanh are folded into the
same call, so the Triton backend runs each as one fused kernel.

The backend of a call comes from ``use_backend`` (a context variable set by ``SNAC`` and the streaming
objects for the duration of a call); PyTorch is the default, so modules called directly keep the reference
arithmetic bit for bit.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .noise import positional_randn

BACKENDS = ("auto", "triton", "torch")
# Products inside the Triton dense convs: "tf32x3" (three TF32 products, about fp32 accuracy; the default),
# "ieee" (fp32 FMAs, slowest) or "tf32" (one TF32 product: fastest, about 1e-3 relative error, the precision
# PyTorch's own cuDNN convs use by default).
PRECISIONS = ("tf32x3", "ieee", "tf32")

_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("snac_stream_backend", default="torch")
_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar("snac_stream_precision", default="tf32x3")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the triton package is installed (looked up once: every streaming push asks)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """``"auto"`` -> Triton on CUDA when it is installed, else PyTorch; ``"triton"`` checked to be usable.

    Triton also runs on the CPU under its interpreter (``TRITON_INTERPRET=1``, slow: tests only).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package: pip install 'snac-stream[triton]'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' runs on CUDA devices; the model is on {device} "
            "(set TRITON_INTERPRET=1 before importing snac_stream to use Triton's CPU interpreter)"
        )
    return "triton"


@contextlib.contextmanager
def use_backend(backend: str, precision: str = "tf32x3") -> Iterator[None]:
    """Run the enclosed model calls on a resolved backend (``"torch"`` or ``"triton"``), the Triton dense
    convs with ``precision`` (one of ``PRECISIONS``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    tokens = _BACKEND.set(backend), _PRECISION.set(precision)
    try:
        yield
    finally:
        _BACKEND.reset(tokens[0])
        _PRECISION.reset(tokens[1])


def current_backend() -> str:
    return _BACKEND.get()


def snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Snake activation ``x + sin(alpha x)^2 / (alpha + 1e-9)``, written as the reference computes it."""
    shape = x.shape
    x = x.reshape(shape[0], shape[1], -1)
    x = x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)
    return x.reshape(shape)


def conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    groups: int = 1,
    stride: int = 1,
    dilation: int = 1,
    padding: int = 0,
    context: Optional[torch.Tensor] = None,
    length: Optional[int] = None,
    alpha: Optional[torch.Tensor] = None,
    alpha_out: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    residual_context: Optional[torch.Tensor] = None,
    residual_offset: int = 0,
    noise_seed: Optional[int] = None,
    noise_start: int | torch.Tensor = 0,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """``act(residual + noise * conv1d(snake(cat(context, x)), weight, bias))``, each part optional.

    Args:
        x: (B, C_in, T) new frames; ``context``: (B, C_in, L) frames before them (streaming), or None.
        weight: (C_out, C_in / groups, K); ``groups`` is 1 (dense) or C_in (depthwise).
        padding: zeros on both ends of ``cat(context, x)`` (offline layers; streaming passes 0).
        length: outputs to compute (default: all the input allows).
        alpha / alpha_out: snake before / after the conv (per channel, (1, C, 1)).
        residual: (B, C_out, *) added to output ``j`` from ``cat(residual_context, residual)[j + residual_offset]``.
        noise_seed / noise_start: multiply output ``j`` by the deterministic noise at position ``noise_start + j``
            (``noise_start`` an int, or an int64 tensor (B,) with one start per stream).
        activation: ``"tanh"`` or None.

    Returns:
        (B, C_out, length) outputs.
    """
    if current_backend() == "triton":
        return _conv_triton(**locals())
    xin = x if context is None or context.shape[-1] == 0 else torch.cat([context, x], dim=-1)
    if length is not None and padding == 0:
        # Streaming: read only the inputs the requested outputs need.
        xin = xin[..., : (length - 1) * stride + dilation * (weight.shape[-1] - 1) + 1]
    if alpha is not None:
        xin = snake(xin, alpha)
    y = F.conv1d(xin, weight, bias, stride, padding, dilation, groups)
    if length is not None:
        y = y[..., :length]
    if alpha_out is not None:
        y = snake(y, alpha_out)
    if noise_seed is not None:
        n = positional_randn(noise_seed, noise_start, y.shape[-1], y.device).to(y.dtype)
        y = n.view(-1, 1, y.shape[-1]) * y
    if residual is not None:
        r = residual if residual_context is None else torch.cat([residual_context, residual], dim=-1)
        y = r[..., residual_offset : residual_offset + y.shape[-1]] + y
    if activation == "tanh":
        y = torch.tanh(y)
    elif activation is not None:
        raise ValueError(f"unknown activation {activation!r}")
    return y


def _conv_triton(*, x, weight, bias, groups, stride, dilation, padding, context, length, alpha, alpha_out,
                 residual, residual_context, residual_offset, noise_seed, noise_start, activation) -> torch.Tensor:
    from ..kernels import conv as kernels

    depthwise = groups > 1
    if alpha_out is not None and (residual is not None or noise_seed is not None or activation is not None):
        raise ValueError("alpha_out (a snake right after the conv) excludes the other epilogues")
    if depthwise and not (groups == x.shape[1] == weight.shape[0] and weight.shape[1] == 1):
        raise ValueError("the Triton backend runs dense (groups=1) and depthwise (groups=C) convs only")
    if depthwise:
        # Depthwise convs in SNAC are never followed by a residual add, noise or tanh.
        if residual is not None or noise_seed is not None or activation is not None or stride != 1:
            raise ValueError("depthwise conv epilogues are limited to a snake")
        return kernels.snake_dwconv(x, weight, bias, alpha=alpha, dilation=dilation, padding=padding,
                                    context=context, length=length, alpha_out=alpha_out)
    y = kernels.snake_conv(x, weight, bias, alpha=alpha, stride=stride, dilation=dilation, padding=padding,
                           context=context, length=length, residual=residual, residual_context=residual_context,
                           residual_offset=residual_offset, noise_seed=noise_seed, noise_start=noise_start,
                           activation=activation, precision=_PRECISION.get())
    return snake(y, alpha_out) if alpha_out is not None else y  # dense + snake epilogue: non-depthwise models only
