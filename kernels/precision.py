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

__all__ = ["DEFAULT_PRECISION", "PRECISIONS", "check_precision"]

PRECISIONS: Tuple[str, ...] = ("tf32x3", "ieee", "tf32")
DEFAULT_PRECISION = "tf32x3"


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision
