"""The arithmetic of the kernels' matrix products (``tl.dot``), as ``SNAC(precision=...)`` names it.

- ``"tf32x3"`` (the model's default): three TF32 tensor-core products per product, about as accurate as fp32.
- ``"ieee"``: fp32 FMAs, the slowest.
- ``"tf32"``: one TF32 product (10-bit mantissa), the fastest: about 1e-3 relative error, the precision
  PyTorch's own cuDNN convs use by default.

The model's precision reaches the dense convs (``conv.snake_conv``) and the codebook search
(``codebook.codebook_nearest``); the depthwise convs and the codebook lookup have no matrix product and
compute in fp32 at every precision. Triton's CPU interpreter computes every product in fp32 whatever the
precision, but a precision still selects its code path there (the split operands of a tf32x3 conv, the FMA
loop of an ieee codebook search).

This module imports nothing from Triton: ``snac_stream.model`` uses it on machines without Triton.
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["DEFAULT_PRECISION", "PRECISIONS", "check_precision", "tf32_split"]

PRECISIONS: Tuple[str, ...] = ("tf32x3", "ieee", "tf32")
DEFAULT_PRECISION = "tf32x3"


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def tf32_split(t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) of an fp32 tensor: ``hi`` rounded to the nearest tf32 value (10 mantissa bits; ties away from
    zero), ``lo = t - hi`` (exact in fp32). ``hi @ w_hi + hi @ w_lo + lo @ w_hi`` with TF32 products is a
    tf32x3 product: about as accurate as fp32 (the dropped ``lo @ w_lo`` is ~2^-22 of the whole)."""
    bits = t.detach().contiguous().view(torch.int32)
    hi = ((bits + 0x1000) & -0x2000).view(torch.float32)
    return hi, t.detach() - hi
