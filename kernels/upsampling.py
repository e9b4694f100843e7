"""The data movement around the decoder's upsampling product, one pass each side of it.

SNAC's transposed convs (kernel ``2s``, stride ``s``) run as one matrix product for every (row, frame)
(``snac_stream.model.functional.conv_transpose``): row ``b * F + f`` of the product's input holds input frames
``f`` and ``f + 1`` side by side, its output row the ``s`` samples those two frames produce, in time order,
each with every output channel (column ``r * C_out + o`` is sample ``r`` of channel ``o``): the product's
output rows are its samples channels-last. These kernels build the input rows and turn the output rows
channels-first, so that neither side costs more than one read and one write of its data:

- :func:`phase_pairs`: ``snake(cat([context, x], time))``, zero-padded, as (B * F, 2 C) rows: the snake, the
  streaming context, the padding, the transposition to frames-major rows and the pairing of neighbouring
  frames in one pass (in PyTorch: a snake pass, a concatenation, then a gather copy). With ``taps=1`` it
  writes each padded frame once, (B * (F + 1), C): then row ``f``'s pair is the run of 2 C values from frame
  ``f`` on, which a product reads as overlapping rows (half the bytes written, and read from memory once).
- :func:`channels_first`: the product's rows, which hold its samples in time order with the channels
  innermost, as (B, C_out, length), samples ``crop .. crop + length - 1`` (in PyTorch: a slice, then a
  transposing copy). A consumer that reads any strides (the noise block's kernel) takes the rows as they are,
  a strided view, and this pass is skipped.

Both launch over flat tiles of rows (of (stream, frame) pairs, of samples), so a streaming step of many streams
with a few frames each fills its tiles as well as one long offline row does. Shapes are (B, C, T) with T in
frames; float32 only.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import cdiv, check_grid, check_tensor, chunk_input, load_ctx_chunk, per_channel, snake, use_fast_sin

_BLOCK_ROWS = 64  # (row, frame) pairs per program
_BLOCK_CHANNELS = 64
_TILE_ELEMENTS = 8192  # channels_first: samples x channels per program


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
def _channels_first_kernel(z_ptr, out_ptr, C, N, crop, length, n_rows, s_ob, s_oc, s_ot,
                           BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, c, t] = z[b, crop + t, c] for t < length, z (B, N, C) contiguous. One program per block of
    (batch item, sample) rows and block of channels. The tile is loaded as (row, channel), runs of z's rows,
    and stored as (channel, row), runs of each channel's samples; in between it is transposed on chip."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = (rows // length).to(tl.int64)
    t = rows % length
    row_ok = rows < n_rows
    c_ok = c < C
    v = tl.load(z_ptr + ((b * N + crop + t) * C)[:, None] + c[None, :], mask=row_ok[:, None] & c_ok[None, :])
    tl.store(out_ptr + (b * s_ob + t * s_ot)[None, :] + c.to(tl.int64)[:, None] * s_oc, tl.trans(v),
             mask=c_ok[:, None] & row_ok[None, :])


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


def channels_first(z: torch.Tensor, crop: int = 0, length: Optional[int] = None) -> torch.Tensor:
    """Samples ``crop .. crop + length - 1`` of channels-last ``z`` (B, N, C), channels first: (B, C, length).

    The upsampling product's rows are its samples in time order, channels innermost (``conv_transpose``):
    this is the one pass that turns them into the (B, C, T) layout of the layers after it (in PyTorch: a
    slice, then a transposing copy). ``length`` defaults to every sample after ``crop``.

    Returns:
        (B, C, length) contiguous.
    """
    check_tensor("z", z, 3)
    batch, samples, channels = z.shape
    length = samples - crop if length is None else length
    if crop < 0 or length < 0 or crop + length > samples:
        raise ValueError(f"samples {crop}..{crop + length - 1} are out of range: z holds {samples}")
    z = z.contiguous()
    out = torch.empty(batch, channels, length, device=z.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    block_t = _TILE_ELEMENTS // _BLOCK_CHANNELS
    grid = (cdiv(batch * length, block_t), cdiv(channels, _BLOCK_CHANNELS))
    check_grid(grid, "channel blocks")
    _channels_first_kernel[grid](z, out, channels, samples, crop, length, batch * length, *out.stride(),
                                 BLOCK_T=block_t, BLOCK_C=_BLOCK_CHANNELS, num_warps=4)
    return out
