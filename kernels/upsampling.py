"""The data movement around the decoder's upsampling product, one pass each side of it.

SNAC's transposed convs (kernel ``2s``, stride ``s``) run as one matrix product for every (row, frame)
(``snac_stream.model.functional.conv_transpose``): row ``b * F + f`` of the product's input holds input frames
``f`` and ``f + 1`` side by side, its output row holds the ``s`` output samples of each output channel that
those two frames produce. These kernels build the input rows and place the output rows, so that neither side
costs more than one read and one write of its data:

- :func:`phase_pairs`: ``snake(cat([context, x], time))``, zero-padded, as (B * F, 2 C) rows: the snake, the
  streaming context, the padding, the transposition to frames-major rows and the pairing of neighbouring
  frames in one pass (in PyTorch: a snake pass, a concatenation, then a gather copy). With ``taps=1`` it
  writes each padded frame once, (B * (F + 1), C): then row ``f``'s pair is the run of 2 C values from frame
  ``f`` on, which a product reads as overlapping rows (half the bytes written, and read from memory once).
- :func:`place_phases`: the product's (B * F, C_out * s) rows as (B, C_out, samples), samples
  ``crop .. crop + length - 1`` of the whole output (in PyTorch: a permuting copy, then a slice).

Both launch over flat tiles of (row, frame) pairs, so a streaming step of many streams with a few frames each
fills its tiles as well as one long offline row does. Shapes are (B, C, T) with T in frames; float32 only.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import (cdiv, check_grid, check_tensor, chunk_input, load_ctx_chunk, next_pow2, per_channel, snake,
                     use_fast_sin)

_BLOCK_ROWS = 64  # (row, frame) pairs per program
_BLOCK_CHANNELS = 64
_TILE_ELEMENTS = 8192  # place_phases: frames x channels x phases (padded to a power of two) per program


@triton.jit
def _phase_pairs_kernel(ctx_ptr, x_ptr, alpha_ptr, out_ptr, C, L, T, F, n_rows, padding,
                        s_cb, s_cc, s_ct, s_xb, s_xc, s_xt,
                        HAS_CTX: tl.constexpr, HAS_ALPHA: tl.constexpr, FAST_SIN: tl.constexpr, TAPS: tl.constexpr,
                        BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b * F + f, k * C + c] = snake(v)[b, c, f + k - padding], k < TAPS, where ``v = cat([ctx, x])`` is
    zero outside [0, L + T). One program per (block of (row, frame) pairs, block of channels)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    chan_ok = chans < C
    mask = row_ok[:, None] & chan_ok[None, :]
    b = (rows // F).to(tl.int64)[:, None]
    f = (rows % F)[:, None]
    c = chans.to(tl.int64)[None, :]
    if HAS_ALPHA:
        alpha = tl.load(alpha_ptr + chans, mask=chan_ok, other=1.0)[None, :]
    out_row = out_ptr + rows.to(tl.int64)[:, None] * (TAPS * C) + c
    for k in tl.static_range(TAPS):
        v = load_ctx_chunk(ctx_ptr + b * s_cb, x_ptr + b * s_xb, c * s_cc, c * s_xc, s_ct, s_xt,
                           f + (k - padding), L, T, mask, HAS_CTX)
        if HAS_ALPHA:
            v = snake(v, alpha, FAST_SIN)  # snake(0) == 0: the padding stays zero
        tl.store(out_row + k * C, v, mask=mask)


@triton.jit
def _place_phases_kernel(z_ptr, out_ptr, C_out, F, crop, length, n_blocks_f,
                         s_ob, s_oc, s_ot,
                         S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, o, f * S + r - crop] = z[b * F + f, o * S + r] where 0 <= f * S + r - crop < length. One program
    per (row, block of frames) and block of channels. The tile is loaded as (frame, channel * phase), a run of
    each frame's row, and stored as (channel, frame * phase), a run of each channel's samples; in between it
    is transposed on chip. With S a power of two both runs are contiguous in memory (S_PAD == S)."""
    pid = tl.program_id(0)
    b = (pid // n_blocks_f).to(tl.int64)
    f0 = (pid % n_blocks_f) * BLOCK_F
    o0 = tl.program_id(1) * BLOCK_C
    f = f0 + tl.arange(0, BLOCK_F)
    j = tl.arange(0, BLOCK_C * S_PAD)  # column (channel, phase) of the loaded tile
    if S == S_PAD:
        col = o0 * S + j
        col_ok = col < C_out * S
    else:
        col = (o0 + j // S_PAD) * S + j % S_PAD
        col_ok = (o0 + j // S_PAD < C_out) & (j % S_PAD < S)
    v = tl.load(z_ptr + ((b * F + f) * (C_out * S))[:, None] + col[None, :],
                mask=(f < F)[:, None] & col_ok[None, :])
    v = tl.reshape(tl.permute(tl.reshape(v, (BLOCK_F, BLOCK_C, S_PAD)), (1, 0, 2)), (BLOCK_C, BLOCK_F * S_PAD))
    i = tl.arange(0, BLOCK_F * S_PAD)  # column (frame, phase) of the stored tile
    if S == S_PAD:
        t = f0 * S + i - crop
        t_ok = (t >= 0) & (t < length) & (f0 + i // S < F)
    else:
        t = (f0 + i // S_PAD) * S + i % S_PAD - crop
        t_ok = (t >= 0) & (t < length) & (f0 + i // S_PAD < F) & (i % S_PAD < S)
    o = o0 + tl.arange(0, BLOCK_C)
    tl.store(out_ptr + b * s_ob + o.to(tl.int64)[:, None] * s_oc + t.to(tl.int64)[None, :] * s_ot, v,
             mask=(o < C_out)[:, None] & t_ok[None, :])


def phase_pairs(x: torch.Tensor, context: Optional[torch.Tensor] = None, alpha: Optional[torch.Tensor] = None,
                padding: int = 0, taps: int = 2) -> torch.Tensor:
    """The upsampling product's input rows: (B * F, 2 C), F = L + T + 2 padding - 1; with ``taps=1`` each
    padded frame once: (B * (F + 1), C).

    Args:
        x: (B, C, T) new frames; context: (B, C, L) frames before them, or None.
        alpha: snake before the product (per channel: (C,), (1, C, 1) or (C, 1)), or None.
        padding: zero frames at both ends of ``cat([context, x])``.
        taps: frames per row, 2 (pairs) or 1.

    Returns:
        Row ``b * F + f``: ``[snake(v)[b, :, f], snake(v)[b, :, f + 1]]`` of the zero-padded ``v``; with
        ``taps=1``, row ``b * (F + 1) + f``: ``snake(v)[b, :, f]``.
    """
    src = chunk_input("x", x, context, "context")
    batch, channels = x.shape[:2]
    alpha = per_channel("alpha", alpha, channels, x.device)
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    if taps not in (1, 2):
        raise ValueError(f"taps must be 1 or 2, got {taps!r}")
    frames = max(0, src.total + 2 * padding + 1 - taps)
    out = torch.empty(batch * frames, taps * channels, device=x.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    grid = (cdiv(batch * frames, _BLOCK_ROWS), cdiv(channels, _BLOCK_CHANNELS))
    check_grid(grid, "channel blocks")
    _phase_pairs_kernel[grid](
        *src.pointer_args(), alpha if alpha is not None else out, out, channels, src.length_ctx, x.shape[-1],
        frames, batch * frames, padding, *src.stride_args(), HAS_CTX=src.has_ctx, HAS_ALPHA=alpha is not None,
        FAST_SIN=use_fast_sin(x.device), TAPS=taps, BLOCK_ROWS=_BLOCK_ROWS, BLOCK_C=_BLOCK_CHANNELS, num_warps=4)
    return out


def place_phases(z: torch.Tensor, batch: int, stride: int, crop: int = 0, length: Optional[int] = None
                 ) -> torch.Tensor:
    """The upsampling product's output rows in time order: (B * F, C_out * s) -> (B, C_out, length).

    Args:
        z: (B * F, C_out * s) product rows: row ``b * F + f``, column ``o * s + r`` is sample ``f * s + r``
            of channel ``o``.
        batch: B; stride: s.
        crop / length: keep samples ``crop .. crop + length - 1`` (default: every sample after ``crop``).

    Returns:
        (B, C_out, length) contiguous.
    """
    check_tensor("z", z, 2)
    if batch < 1 or z.shape[0] % batch or z.shape[1] % stride:
        raise ValueError(f"z of shape {tuple(z.shape)} does not hold {batch} rows of whole {stride}-sample phases")
    frames, c_out = z.shape[0] // batch, z.shape[1] // stride
    samples = frames * stride
    length = samples - crop if length is None else length
    if crop < 0 or length < 0 or crop + length > samples:
        raise ValueError(f"samples {crop}..{crop + length - 1} are out of range: {frames} frames give {samples}")
    z = z.contiguous()
    out = torch.empty(batch, c_out, length, device=z.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    phases = next_pow2(stride)
    block_f = max(1, _TILE_ELEMENTS // (_BLOCK_CHANNELS * phases))
    blocks_f = cdiv(frames, block_f)
    grid = (batch * blocks_f, cdiv(c_out, _BLOCK_CHANNELS))
    check_grid(grid, "channel blocks")
    _place_phases_kernel[grid](z, out, c_out, frames, crop, length, blocks_f, *out.stride(), S=stride,
                               S_PAD=phases, BLOCK_F=block_f, BLOCK_C=_BLOCK_CHANNELS, num_warps=4)
    return out
