"""Counter-based Gaussian noise keyed by (seed, absolute position).

The decoder's noise blocks add ``randn * linear(x)``. The reference draws ``torch.randn`` per call, so a
chunked decode can never reproduce an offline one. Keying every noise value by its absolute sample position
makes the noise a pure function of where it lands, whatever the chunking.

The generator is Philox-4x32-10 followed by a Box-Muller transform, bit-compatible in its integers with
Triton's ``tl.randn(seed, offset)`` so a fused kernel can draw the same noise (up to the last ulp of
``log``/``cos``).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_ROUNDS = 10


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of ``a * b`` for a 32-bit constant ``a`` and uint32 values in int64 ``b``.

    Split ``b`` in 16-bit halves so that no partial product overflows int64.
    """
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48
    high = (p_hi + (p_lo >> 16)) >> 16
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return high & _MASK32, low


def philox_uint32(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First two uint32 outputs (as int64) of Philox-4x32-10 for counters ``(offset_lo, offset_hi, 0, 0)``."""
    seed &= (1 << 64) - 1
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    offsets = offsets.to(torch.int64)
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1


def _uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    # As Triton: reinterpret as int32, fold negatives with bitwise not, scale into [0, 1).
    signed = torch.where(x >= 2**31, x - 2**32, x)
    folded = torch.where(signed < 0, ~signed, signed)
    return folded.to(torch.float32) * 4.6566127342e-10


def positional_randn(seed: int, start: int | torch.Tensor, length: int,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise for absolute positions ``start .. start + length - 1``: a (length,) float32 tensor.

    ``start`` may be an int64 tensor (B,) of per-stream positions; the result is then (B, length).
    """
    if isinstance(start, torch.Tensor):
        offsets = start.to(device=device, dtype=torch.int64)[:, None] + torch.arange(length, device=device)
    else:
        offsets = torch.arange(start, start + length, dtype=torch.int64, device=device)
    i1, i2 = philox_uint32(seed, offsets)
    u1 = torch.clamp(_uint32_to_uniform(i1), min=1.0e-7)
    u2 = _uint32_to_uniform(i2)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)


def layer_seed(seed: int, layer: int) -> int:
    """Distinct 64-bit Philox key per noise layer, so layers do not share noise."""
    return (seed * 0x100000001B3 + (layer + 1) * 0x9E3779B97F4A7C15) & ((1 << 63) - 1)
