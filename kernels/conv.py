"""Fused snake + conv1d kernels for SNAC, offline and streaming alike.

- :func:`snake_dwconv`: depthwise conv (groups = C) with an optional snake before it and another after it:
  the first three layers of a depthwise SNAC residual unit in one pass over memory.
- :func:`snake_conv`: dense conv1d as an implicit GEMM on tensor cores, with an optional snake before it and
  an epilogue (bias, positional noise, residual add, tanh): the residual units' 1x1 conv with its skip
  connection, the noise blocks, the encoder's strided downsampling convs and the model's first/last convs.

Both read their input as ``cat([context, x], time)`` with ``padding`` virtual zeros at each end (see
``common.py``): offline calls pass ``context=None, padding=p``; a streaming conv passes its cache of earlier
inputs as ``context`` and ``padding=0``. Output frame ``j`` reads padded positions ``j*stride + k*dilation``,
``k = 0..K-1``. Shapes are (B, C, T) with T in frames of the layer's own rate; all tensors are float32 and
accumulation is always fp32.

In tf32x3 a dense conv with K > 1 first splits its operands into tf32 high parts and rests (one pass over
the input that also applies the snake and joins the context; the weight's split is kept): the product then
gathers each input frame K times straight from memory into the tensor cores, which an elementwise step on
every loaded tile prevents (``snake_conv``'s ``split``; figures in bench/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import ContextManager, Iterator, Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from .common import (ChunkInput, batch_row, cdiv, check_grid, check_shape, check_tensor, chunk_input,
                     load_ctx_chunk, output_buffer, output_length, per_channel, resolve_precision, snake, tanh,
                     use_fast_sin, window_tap)
from .derived import DerivedTensors
from .precision import tf32_split
from .rows import Context
from .tuning import CONV, DWCONV, launch_config

ACTIVATIONS = (None, "tanh")
# Dense convs whose input is split in registers (K = 1 at tf32x3): the rows-first product or not; None: the rule
# of :func:`product_form`. Set per thread by :func:`rows_first_products` (benchmarks and tests compare them).
_ROWS_FIRST: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("snac_stream_rows_first", default=None)
# Dense convs at tf32x3: operands split before the kernel or in registers; None: the rule of :func:`product_form`
# (before, for K > 1). Set per thread by :func:`split_operands`.
_SPLIT_OPERANDS: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("snac_stream_split_operands",
                                                                                  default=None)
_MAX_REDUCE_CHANNELS = 256  # one-output-channel convs up to this width run as a reducing depthwise pass


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _depthwise_taps(ctx_b, x_b, w_ptr, alpha_ptr, offs_c, C, L, T, u0, s_cc, s_ct, s_xc, s_xt, s_wc, s_wk,
                    K: tl.constexpr, DIL: tl.constexpr, HAS_CTX: tl.constexpr, HAS_ALPHA: tl.constexpr,
                    FAST_SIN: tl.constexpr, WINDOW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    """The depthwise conv of channels ``offs_c`` (BLOCK_C,) over the tile's frames, snake before it: (BLOCK_C,
    BLOCK_T) fp32 sums, zero for masked channels. ``u0`` (BLOCK_T,): unpadded input frame of tap 0, per lane."""
    c_mask = offs_c < C
    rows = offs_c.to(tl.int64)[:, None]
    if HAS_ALPHA:
        alpha = tl.load(alpha_ptr + offs_c, mask=c_mask, other=1.0)[:, None]
    if WINDOW:
        v = load_ctx_chunk(ctx_b, x_b, rows * s_cc, rows * s_xc, s_ct, s_xt, u0[None, :], L, T,
                           c_mask[:, None], HAS_CTX)
        if HAS_ALPHA:
            v = snake(v, alpha, FAST_SIN)
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
    for k in tl.static_range(K):
        if WINDOW:
            tap = window_tap(v, k, DIL, BLOCK_T)
        else:
            tap = load_ctx_chunk(ctx_b, x_b, rows * s_cc, rows * s_xc, s_ct, s_xt, (u0 + k * DIL)[None, :],
                                 L, T, c_mask[:, None], HAS_CTX)
            if HAS_ALPHA:
                tap = snake(tap, alpha, FAST_SIN)
        acc += tl.load(w_ptr + offs_c * s_wc + k * s_wk, mask=c_mask, other=0.0)[:, None] * tap
    return acc


@triton.jit
def _snake_dwconv_kernel(
    ctx_ptr, x_ptr, ctx_rows_ptr, w_ptr, bias_ptr, alpha_ptr, alpha_out_ptr, out_ptr,
    C, L, T, T_out, padding, step,
    s_cb, s_cc, s_ct, s_xb, s_xc, s_xt, s_wc, s_wk, s_ob, s_oc, s_ot,
    K: tl.constexpr, DIL: tl.constexpr, HAS_CTX: tl.constexpr, CTX_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    HAS_ALPHA_OUT: tl.constexpr, FAST_SIN: tl.constexpr, WINDOW: tl.constexpr, REDUCE: tl.constexpr,
    TANH: tl.constexpr, CHANNEL_LOOP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One (BLOCK_C channels) x (``step`` output frames) tile of one batch item.

    REDUCE: sum the per-channel results over all C channels into a single output channel, add the scalar bias
    and optionally tanh: a dense conv with one output channel (the decoder's last conv), done without padding
    C_out to a tensor-core tile. With CHANNEL_LOOP (BLOCK_C < C) the program steps through the channels BLOCK_C at
    a time (one program per frame tile), so a wide conv need not hold all of its channels' windows in registers
    at once.

    WINDOW: load the ``BLOCK_T`` input frames the tile needs once, apply the snake once per element, and
    form the K taps by rotating that window in registers (:func:`window_tap`). The last ``(K-1)*DIL`` lanes
    only feed taps, so a tile emits ``step = BLOCK_T - (K-1)*DIL`` outputs. Otherwise (halo too large for a
    window): one load and one snake per tap, ``step = BLOCK_T``; the K loads overlap and hit L1.

    CTX_ROWS: batch item ``b``'s context is row ``ctx_rows[b]`` of the context tensor (an engine's batch).
    """
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)

    ctx_b = ctx_ptr + batch_row(ctx_rows_ptr, pid_b, True, CTX_ROWS) * s_cb
    x_b = x_ptr + pid_b * s_xb
    i = tl.arange(0, BLOCK_T)
    t0 = pid_t * step
    u0 = t0 - padding + i  # unpadded input frame of tap 0, per lane
    j = t0 + i
    t_mask = (i < step) & (j < T_out)

    if REDUCE:
        if CHANNEL_LOOP:
            total = tl.zeros((BLOCK_T,), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                acc = _depthwise_taps(ctx_b, x_b, w_ptr, alpha_ptr, c0 + tl.arange(0, BLOCK_C), C, L, T, u0, s_cc,
                                      s_ct, s_xc, s_xt, s_wc, s_wk, K, DIL, HAS_CTX, HAS_ALPHA, FAST_SIN, WINDOW,
                                      BLOCK_C, BLOCK_T)
                total += tl.sum(acc, axis=0)  # masked channels hold zeros
        else:  # every channel in one tile: straight-line code (the loop spilled it to the stack on sm_90)
            total = tl.sum(_depthwise_taps(ctx_b, x_b, w_ptr, alpha_ptr, tl.arange(0, BLOCK_C), C, L, T, u0, s_cc,
                                           s_ct, s_xc, s_xt, s_wc, s_wk, K, DIL, HAS_CTX, HAS_ALPHA, FAST_SIN,
                                           WINDOW, BLOCK_C, BLOCK_T), axis=0)
        if HAS_BIAS:
            total += tl.load(bias_ptr)
        if TANH:
            total = tanh(total)
        tl.store(out_ptr + pid_b * s_ob + j * s_ot, total, mask=t_mask)
    else:
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        acc = _depthwise_taps(ctx_b, x_b, w_ptr, alpha_ptr, offs_c, C, L, T, u0, s_cc, s_ct, s_xc, s_xt, s_wc,
                              s_wk, K, DIL, HAS_CTX, HAS_ALPHA, FAST_SIN, WINDOW, BLOCK_C, BLOCK_T)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0)[:, None]
        if HAS_ALPHA_OUT:
            acc = snake(acc, tl.load(alpha_out_ptr + offs_c, mask=c_mask, other=1.0)[:, None], FAST_SIN)
        tl.store(out_ptr + pid_b * s_ob + offs_c.to(tl.int64)[:, None] * s_oc + j[None, :] * s_ot, acc,
                 mask=c_mask[:, None] & t_mask[None, :])


@triton.jit(do_not_specialize=["n_cols"])  # B * T_out: one compilation whatever the batch size
def _snake_conv_kernel(
    ctx_ptr, x_ptr, w_ptr, bias_ptr, alpha_ptr, rctx_ptr, res_ptr, rctx_rows_ptr, out_ptr, xlo_ptr, wlo_ptr,
    C_out, L, T, T_out, L_res, T_res, res_offset, noise_seed, noise_start, noise_rows_ptr,
    conv_stride, dilation, padding, n_o_blocks, n_cols,
    s_cb, s_cc, s_ct, s_xb, s_xc, s_xt, s_wo,
    s_rcb, s_rcc, s_rct, s_rb, s_rc, s_rt, s_ob, s_oc, s_ot,
    R: tl.constexpr, K: tl.constexpr, HAS_CTX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALPHA: tl.constexpr,
    HAS_NOISE: tl.constexpr, NOISE_ROWS: tl.constexpr, HAS_RES: tl.constexpr, HAS_RES_CTX: tl.constexpr,
    RES_CTX_ROWS: tl.constexpr, TANH: tl.constexpr,
    FAST_SIN: tl.constexpr, PRECISION: tl.constexpr, FLAT: tl.constexpr, SPLIT: tl.constexpr,
    ROWS_FIRST: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One (BLOCK_O output channels) x (BLOCK_T output frames) tile of one batch item, or with FLAT of
    BLOCK_T (batch item, frame) pairs: columns ``n < n_cols = B * T_out`` run over ``b = n // T_out``,
    ``t = n % T_out``, so layers with a few frames per stream (a streaming step) still fill the tile.

    The reduction runs over r = c * K + k < R = C_in * K (input channel c, tap k), the weight's own memory
    order, in steps of BLOCK_R: each step gathers its input tile im2col-style from the virtual padded
    sequence, applies the snake, and multiplies on tensor cores. Folding the taps into the reduction keeps
    tiny reductions (C_in = 1, K = 7) to one padded step, and serves any stride. The snake is recomputed by
    each output-channel block (C_out / BLOCK_O times), cheap next to the products. R is a compile-time
    constant: a fixed trip count the pipeliner can schedule (and a loop the interpreter can run).
    Consecutive programs share a time tile (output channels vary fastest), so the input tile is reused
    from L2.

    SPLIT: fp32-accurate products from operands split before the kernel (``x_ptr`` / ``xlo_ptr`` and
    ``w_ptr`` / ``wlo_ptr``: tf32-exact high parts and the rests, see ``_snake_pass_kernel``), as three
    tf32 products of tiles that go from memory to the tensor cores untouched; the snake and the context
    are then already applied.

    ROWS_FIRST: fp32-accurate products with the input split in registers, computed transposed (frames x
    output channels): the split input tiles are the products' left operand, which the tensor cores read
    straight from registers, and the weight (``w_ptr`` / ``wlo_ptr``: split once, before) their right operand,
    loaded into shared memory ahead of use. Without it the split input tiles are the right operand, which must
    go through shared memory before every product (figures in bench/RESULTS.md).

    RES_CTX_ROWS: batch item ``b``'s residual context is row ``rctx_rows[b]`` of its tensor (an engine's batch).
    """
    pid = tl.program_id(0)
    pid_o = pid % n_o_blocks
    pid_t = pid // n_o_blocks

    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    cols = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    if FLAT:
        t_valid = cols < n_cols
        offs_t = cols % T_out
        pid_b = (cols // T_out).to(tl.int64)[None, :]  # per column, broadcast against the rows
    else:
        t_valid = cols < T_out
        offs_t = cols
        pid_b = tl.program_id(1).to(tl.int64)
    o_mask = offs_o < C_out
    o_rows = offs_o.to(tl.int64)[:, None]
    ctx_b = ctx_ptr + pid_b * s_cb
    x_b = x_ptr + pid_b * s_xb
    xlo_b = xlo_ptr + pid_b * s_xb

    if ROWS_FIRST:
        acc = tl.trans(_rows_first_product(
            ctx_ptr, x_ptr, w_ptr, wlo_ptr, alpha_ptr, offs_o, o_mask, offs_t, t_valid, cols, T_out, L, T,
            conv_stride, dilation, padding, s_cb, s_cc, s_ct, s_xb, s_xc, s_xt, s_wo,
            R, K, HAS_CTX, HAS_ALPHA, FAST_SIN, FLAT, BLOCK_O, BLOCK_T, BLOCK_R))
    else:
        acc = tl.zeros((BLOCK_O, BLOCK_T), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            c_rows = (offs_r // K).to(tl.int64)[:, None]
            u = offs_t[None, :] * conv_stride + ((offs_r % K) * dilation - padding)[:, None]
            v = _snaked_input(ctx_b, x_b, alpha_ptr, c_rows, r_mask[:, None], u, r_mask[:, None] & t_valid[None, :],
                              L, T, s_cc, s_ct, s_xc, s_xt, HAS_CTX, HAS_ALPHA, FAST_SIN)
            w = tl.load(w_ptr + o_rows * s_wo + offs_r[None, :], mask=o_mask[:, None] & r_mask[None, :], other=0.0)
            if SPLIT:
                v_lo = load_ctx_chunk(ctx_b, xlo_b, c_rows * s_cc, c_rows * s_xc, s_ct, s_xt, u, L, T,
                                      r_mask[:, None] & t_valid[None, :], HAS_CTX)
                w_lo = tl.load(wlo_ptr + o_rows * s_wo + offs_r[None, :], mask=o_mask[:, None] & r_mask[None, :],
                               other=0.0)
                acc = _tf32x3_step(acc, w, w_lo, v, v_lo)
            else:
                acc = tl.dot(w, v, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=o_mask, other=0.0)[:, None]
    if HAS_NOISE:
        # Same Philox stream as model.noise.positional_randn: keyed by the absolute frame, not the tile.
        if NOISE_ROWS and FLAT:  # one start per batch row: independent streams batched together
            start = tl.load(noise_rows_ptr + pid_b, mask=t_valid[None, :], other=0)
        elif NOISE_ROWS:
            start = tl.load(noise_rows_ptr + pid_b)
        else:
            start = noise_start
        acc *= tl.randn(noise_seed, start + offs_t.to(tl.int64)[None, :])
    if HAS_RES:
        if FLAT:
            res_row = batch_row(rctx_rows_ptr, pid_b, t_valid[None, :], RES_CTX_ROWS)
        else:
            res_row = batch_row(rctx_rows_ptr, pid_b, True, RES_CTX_ROWS)
        acc += load_ctx_chunk(rctx_ptr + res_row * s_rcb, res_ptr + pid_b * s_rb, o_rows * s_rcc, o_rows * s_rc,
                              s_rct, s_rt, (offs_t + res_offset)[None, :], L_res, T_res,
                              o_mask[:, None] & t_valid[None, :], HAS_RES_CTX)
    if TANH:
        acc = tanh(acc)

    out_mask = o_mask[:, None] & t_valid[None, :]
    tl.store(out_ptr + pid_b * s_ob + o_rows * s_oc + offs_t[None, :] * s_ot, acc, mask=out_mask)


@triton.jit
def _rows_first_product(ctx_ptr, x_ptr, w_ptr, wlo_ptr, alpha_ptr, offs_o, o_mask, offs_t, t_valid, cols, T_out, L,
                        T, conv_stride, dilation, padding, s_cb, s_cc, s_ct, s_xb, s_xc, s_xt, s_wo,
                        R: tl.constexpr, K: tl.constexpr, HAS_CTX: tl.constexpr, HAS_ALPHA: tl.constexpr,
                        FAST_SIN: tl.constexpr, FLAT: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_R: tl.constexpr):
    """The tile's product, (BLOCK_T frames, BLOCK_O output channels), for ``_snake_conv_kernel``'s ROWS_FIRST."""
    if FLAT:
        pid_b = (cols // T_out).to(tl.int64)[:, None]  # per frame row, broadcast against the channels
    else:
        pid_b = tl.program_id(1).to(tl.int64)
    ctx_b = ctx_ptr + pid_b * s_cb
    x_b = x_ptr + pid_b * s_xb
    o_cols = offs_o.to(tl.int64)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        c_cols = (offs_r // K).to(tl.int64)[None, :]
        u = offs_t[:, None] * conv_stride + ((offs_r % K) * dilation - padding)[None, :]
        v = _snaked_input(ctx_b, x_b, alpha_ptr, c_cols, r_mask[None, :], u, t_valid[:, None] & r_mask[None, :],
                          L, T, s_cc, s_ct, s_xc, s_xt, HAS_CTX, HAS_ALPHA, FAST_SIN)
        w_mask = r_mask[:, None] & o_mask[None, :]
        w = tl.load(w_ptr + o_cols * s_wo + offs_r[:, None], mask=w_mask, other=0.0)
        w_lo = tl.load(wlo_ptr + o_cols * s_wo + offs_r[:, None], mask=w_mask, other=0.0)
        v_hi = _tf32_high(v)
        acc = _tf32x3_step(acc, v_hi, v - v_hi, w, w_lo)
    return acc


@triton.jit
def _snaked_input(ctx_b, x_b, alpha_ptr, c, c_ok, u, mask, L, T, s_cc, s_ct, s_xc, s_xt, HAS_CTX: tl.constexpr,
                  HAS_ALPHA: tl.constexpr, FAST_SIN: tl.constexpr):
    """A dense product's input tile, ``snake(cat([context, x]))`` at channels ``c`` (int64, valid where
    ``c_ok``) and padded frames ``u``, zero where ``~mask``: either orientation, as ``c`` and ``u`` broadcast."""
    v = load_ctx_chunk(ctx_b, x_b, c * s_cc, c * s_xc, s_ct, s_xt, u, L, T, mask, HAS_CTX)
    if HAS_ALPHA:
        v = snake(v, tl.load(alpha_ptr + c, mask=c_ok, other=1.0), FAST_SIN)
    return v


@triton.jit
def _tf32x3_step(acc, a_hi, a_lo, b_hi, b_lo):
    """``acc + a @ b`` for one reduction step, fp32-accurate from tf32 parts (``a = a_hi + a_lo``, the highs
    exact in tf32): the three products that matter, summed from zero on the tensor cores, then added to the
    running sum in fp32. The tensor cores' own accumulation is not exact: chained over the whole reduction it
    grew the error 20-fold, well above tf32x3's and cuDNN fp32's (bench/RESULTS.md)."""
    step = tl.dot(a_lo, b_hi, tl.zeros_like(acc), input_precision="tf32")
    step = tl.dot(a_hi, b_lo, step, input_precision="tf32")
    return acc + tl.dot(a_hi, b_hi, step, input_precision="tf32")


@triton.jit
def _tf32_high(v):
    """``v`` rounded to the nearest tf32 value (10 mantissa bits; ties away from zero), kept in fp32."""
    bits = v.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _snake_pass_kernel(ctx_ptr, x_ptr, alpha_ptr, hi_ptr, lo_ptr, C, L, T, N,
                       s_cb, s_cc, s_ct, s_xb, s_xc, s_xt,
                       HAS_CTX: tl.constexpr, HAS_ALPHA: tl.constexpr, FAST_SIN: tl.constexpr, SPLIT: tl.constexpr,
                       BLOCK_T: tl.constexpr):
    """The first ``N`` frames of ``v = snake(cat([context, x], time))``, (B, C, N) contiguous: with SPLIT as
    ``hi + lo``, ``hi`` exactly representable in tf32 and ``lo = v - hi``; without, ``v`` itself in ``hi``.
    One program per (row, time block)."""
    row = tl.program_id(0)
    b = (row // C).to(tl.int64)
    c = (row % C).to(tl.int64)
    u = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = u < N
    v = load_ctx_chunk(ctx_ptr + b * s_cb, x_ptr + b * s_xb, c * s_cc, c * s_xc, s_ct, s_xt, u, L, T, mask,
                       HAS_CTX)
    if HAS_ALPHA:
        v = snake(v, tl.load(alpha_ptr + c), FAST_SIN)
    at = row.to(tl.int64) * N + u
    if SPLIT:
        hi = _tf32_high(v)
        tl.store(hi_ptr + at, hi, mask=mask)
        tl.store(lo_ptr + at, v - hi, mask=mask)
    else:
        tl.store(hi_ptr + at, v, mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------------------


def snake_dwconv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    alpha: Optional[torch.Tensor] = None,
    dilation: int = 1,
    padding: int = 0,
    context: Optional[Context] = None,
    length: Optional[int] = None,
    alpha_out: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``snake(conv1d(snake(cat([context, x])), weight, bias, groups=C), alpha_out)``, each snake optional.

    Args:
        x: (B, C, T) new input frames.
        weight: (C, 1, K) depthwise filters; bias: (C,) or None.
        alpha: per-channel snake parameter applied to the input, (C,) or (1, C, 1); None for no snake.
        dilation: tap spacing in frames. padding: virtual zeros on each end of ``cat([context, x])``.
        context: (B, C, L) frames preceding ``x`` (a streaming cache), or None; as ``RowsOf``, rows of an
            engine's batch, read where they lie.
        length: outputs to compute (at most the maximum, the default).
        alpha_out: per-channel snake parameter applied to the output, or None.
        out: optional (B, C, T_out) buffer to write (any strides, not overlapping the inputs).

    Returns:
        (B, C, T_out) with ``T_out = L + T + 2*padding - dilation*(K-1)`` unless ``length`` is given.
    """
    src = chunk_input("x", x, context, "context", rows=True)
    batch, channels, _ = x.shape
    device = x.device
    check_tensor("weight", weight, 3, device)
    if weight.shape[0] != channels or weight.shape[1] != 1 or weight.shape[2] < 1:
        raise ValueError(f"weight must have shape ({channels}, 1, K) for a depthwise conv over {channels} "
                         f"channels, got {tuple(weight.shape)}")
    kernel_size = weight.shape[2]
    bias = None if bias is None else check_shape("bias", bias, (channels,), device).contiguous()
    alpha = per_channel("alpha", alpha, channels, device)
    alpha_out = per_channel("alpha_out", alpha_out, channels, device)
    t_out = output_length(src.total, padding, kernel_size, 1, dilation, length)
    out = output_buffer(out, (batch, channels, t_out), device, x=x, context=src.ctx)
    if out.numel() == 0:
        return out

    _launch_dwconv(src, weight, bias, alpha, alpha_out, out, dilation=dilation, padding=padding)
    return out


def _launch_dwconv(src: ChunkInput, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: Optional[torch.Tensor],
                   alpha_out: Optional[torch.Tensor], out: torch.Tensor, *, dilation: int, padding: int,
                   reduce: bool = False, activation: Optional[str] = None) -> None:
    """Launch the depthwise kernel on checked arguments; ``reduce`` sums its channels into out's only one."""
    batch, channels = src.x.shape[:2]
    kernel_size, t_out = weight.shape[2], out.shape[-1]
    cfg = launch_config(DWCONV, device=out.device, c_in=channels, c_out=1 if reduce else channels,
                        kernel_size=kernel_size, stride=1, dilation=dilation, length=t_out, batch=batch)
    # A window of BLOCK_T input frames yields BLOCK_T - (K-1)*dilation outputs.
    step = cfg.blocks["BLOCK_T"] - dilation * (kernel_size - 1) if cfg.blocks["WINDOW"] else cfg.blocks["BLOCK_T"]
    # A reducing launch steps through the channels in each program.
    grid = (cdiv(t_out, step), 1 if reduce else cdiv(channels, cfg.blocks["BLOCK_C"]), batch)
    check_grid(grid, "channel blocks", "batch size")
    _snake_dwconv_kernel[grid](
        *src.pointer_args(), src.rows_arg(), weight, bias if bias is not None else out,
        alpha if alpha is not None else out, alpha_out if alpha_out is not None else out, out,
        channels, src.length_ctx, src.x.shape[-1], t_out, padding, step,
        *src.stride_args(), weight.stride(0), weight.stride(2), *out.stride(),
        K=kernel_size, DIL=dilation, HAS_CTX=src.has_ctx, CTX_ROWS=src.ctx_rows is not None,
        HAS_BIAS=bias is not None, HAS_ALPHA=alpha is not None,
        HAS_ALPHA_OUT=alpha_out is not None, FAST_SIN=use_fast_sin(out.device), REDUCE=reduce,
        TANH=activation == "tanh", CHANNEL_LOOP=reduce and cfg.blocks["BLOCK_C"] < channels, **cfg.blocks,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _check_int(name: str, v: object, low: int, high: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v < high:
        raise ValueError(f"{name} must be an int in [{low}, {high}), got {v!r}")
    return v


def snake_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    alpha: Optional[torch.Tensor] = None,
    stride: int = 1,
    dilation: int = 1,
    padding: int = 0,
    context: Optional[Context] = None,
    length: Optional[int] = None,
    residual: Optional[torch.Tensor] = None,
    residual_context: Optional[Context] = None,
    residual_offset: int = 0,
    noise_seed: Optional[int] = None,
    noise_start: Union[int, torch.Tensor] = 0,
    activation: Optional[str] = None,
    precision: Optional[str] = None,
    split: Optional[bool] = None,
    rows_first: Optional[bool] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dense conv1d of ``snake(cat([context, x]))`` with a fused epilogue, computed on tensor cores.

    ``y[b, o, j] = sum_{c,k} weight[o, c, k] * snake(xp[b, c, j*stride + k*dilation])`` over the padded
    sequence ``xp``, then, in this order: ``+ bias[o]``; ``* n[j]`` with ``n = positional_randn(noise_seed,
    noise_start, T_out)`` (the same for every channel and batch item: SNAC's noise block ``x + n * linear(x)``
    when ``residual`` is that block's input); ``+ res[b, o, j + residual_offset]`` where ``res`` is
    ``cat([residual_context, residual], time)``; ``tanh``.

    Args:
        x: (B, C_in, T) new input frames; context: (B, C_in, L) frames preceding them, or None.
        weight: (C_out, C_in, K); bias: (C_out,) or None.
        alpha: per-input-channel snake parameter, (C_in,) or (1, C_in, 1), or None for no snake.
        stride, dilation, padding: as ``torch.nn.functional.conv1d``, in frames; padding applies to both ends
            of ``cat([context, x])``.
        length: outputs to compute (at most the maximum, the default).
        residual: (B, C_out, T_r) added to the output; residual_context: (B, C_out, L_r) preceding it, or None;
            residual_offset: index in ``cat([residual_context, residual])`` of the term added to output 0.
            Either context may be rows of an engine's batch (``RowsOf``): the residual's is read where it
            lies, the input's gathered first.
        noise_seed: Philox key (int in [0, 2**63)) of the noise multiplier, or None for no noise;
            noise_start: absolute frame index of output 0 in the noise stream; an int64 tensor (B,) gives
            each batch row (an independent stream) its own.
        activation: None or ``"tanh"``.
        precision: ``tl.dot`` input precision, ``"ieee"``, ``"tf32"`` or ``"tf32x3"``; None picks ``"tf32x3"``
            on CUDA (fp32-accurate) and ``"ieee"`` in the interpreter.
        split: with ``"tf32x3"``, split the operands into tf32 high parts and rests before the product (one
            pass over the input that also applies the snake and joins the context; the weight's split is
            kept while the weight is unchanged), so that the tiles reach the tensor cores as loaded: much
            faster for K > 1, where the product gathers each input frame K times. None: the thread's choice
            (:func:`split_operands`), else for K > 1.
        rows_first: with ``"tf32x3"`` and the input split in registers, the transposed product (frames as
            its rows; the kernel's ROWS_FIRST), as accurate and faster. None: the thread's choice
            (:func:`rows_first_products`), else the rule.
        out: optional (B, C_out, T_out) buffer to write (any strides, not overlapping the inputs).

    Returns:
        (B, C_out, T_out), ``T_out = (L + T + 2*padding - dilation*(K-1) - 1) // stride + 1`` unless ``length``
        is given.
    """
    src = chunk_input("x", x, context, "context")
    batch, c_in, _ = x.shape
    device = x.device
    check_tensor("weight", weight, 3, device)
    if weight.shape[1] != c_in or weight.shape[0] < 1 or weight.shape[2] < 1:
        raise ValueError(f"weight must have shape (C_out, {c_in}, K) for {c_in} input channels, "
                         f"got {tuple(weight.shape)}")
    c_out, _, kernel_size = weight.shape
    weight = weight.contiguous()  # rows of C_in * K in (channel, tap) order: the kernel's reduction order
    bias = None if bias is None else check_shape("bias", bias, (c_out,), device).contiguous()
    alpha = per_channel("alpha", alpha, c_in, device)
    t_out = output_length(src.total, padding, kernel_size, stride, dilation, length)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    precision = resolve_precision(precision, device)
    if noise_seed is not None:
        _check_int("noise_seed", noise_seed, 0, 2**63)
        if isinstance(noise_start, torch.Tensor):
            if noise_start.dtype != torch.int64 or tuple(noise_start.shape) != (batch,) or noise_start.device != device:
                raise ValueError(f"noise_start as a tensor must be int64 of shape ({batch},) on {device}, got "
                                 f"{noise_start.dtype} {tuple(noise_start.shape)} on {noise_start.device}")
            noise_start = noise_start.contiguous()
        else:
            _check_int("noise_start", noise_start, 0, 2**63 - max(t_out, 1))

    res: Optional[ChunkInput] = None
    if residual is None:
        if residual_context is not None:
            raise ValueError("residual_context needs a residual")
    else:
        res = chunk_input("residual", residual, residual_context, "residual_context", rows=True)
        if residual.device != device:
            raise ValueError(f"residual is on {residual.device} but the input is on {device}")
        if residual.shape[:2] != (batch, c_out):
            raise ValueError(f"residual must have shape ({batch}, {c_out}, T_r), got {tuple(residual.shape)}")
        _check_int("residual_offset", residual_offset, 0, 2**31)
        if residual_offset + t_out > res.total:
            raise ValueError(f"residual frames {residual_offset}..{residual_offset + t_out - 1} are out of range: "
                             f"residual_context and residual hold {res.total}")

    out = output_buffer(out, (batch, c_out, t_out), device, x=x, context=src.ctx, residual=residual,
                        residual_context=None if res is None else res.ctx)
    if out.numel() == 0:
        return out
    if c_out == 1 and stride == 1 and res is None and noise_seed is None and c_in <= _MAX_REDUCE_CHANNELS:
        # One output channel: per-channel taps summed over channels, no 16-row tensor-core padding.
        _launch_dwconv(src, weight.view(c_in, 1, kernel_size), bias, alpha, None, out, dilation=dilation,
                       padding=padding, reduce=True, activation=activation)
        return out

    rests = None
    form = product_form(kernel_size, precision, device, split=split, rows_first=rows_first)
    if form == "split":
        # Only the frames the outputs read (a streaming call's input may run past them).
        frames = min(src.total, max(1, (t_out - 1) * stride + dilation * (kernel_size - 1) + 1 - padding))
        x_hi, x_lo = _snake_pass(src, alpha, frames, split=True)
        src, alpha = ChunkInput(x_hi, x_hi, 0, False), None
        weight, w_lo = _split_weight(weight)
        rests = (x_lo, w_lo)
    elif form == "rows_first":
        weight, w_lo = _split_weight(weight)
        rests = (None, w_lo)
    _launch_conv(src, weight, bias, alpha, out, t_out=t_out, stride=stride, dilation=dilation, padding=padding,
                 res=res, residual_offset=residual_offset, noise_seed=noise_seed, noise_start=noise_start,
                 activation=activation, precision=precision, rests=rests)
    return out


@contextlib.contextmanager
def _thread_choice(choice: contextvars.ContextVar, value: bool) -> Iterator[None]:
    """``choice`` set to ``value`` in the calling thread for the enclosed calls."""
    token = choice.set(value)
    try:
        yield
    finally:
        choice.reset(token)


def rows_first_products(enabled: bool) -> ContextManager[None]:
    """In the calling thread, make dense convs split in registers (K = 1 at tf32x3) take the rows-first
    product (``True``) or the per-step one (``False``), whatever the rule says."""
    return _thread_choice(_ROWS_FIRST, bool(enabled))


def split_operands(enabled: bool) -> ContextManager[None]:
    """In the calling thread, make dense convs at tf32x3 split their operands before the kernel (``True``) or
    in registers (``False``, where :func:`rows_first_products` and its rule then apply), whatever their kernel
    size, unless a call passes ``split`` itself."""
    return _thread_choice(_SPLIT_OPERANDS, bool(enabled))


def product_form(kernel_size: int, precision: Optional[str], device: torch.device, *, split: Optional[bool] = None,
                 rows_first: Optional[bool] = None) -> str:
    """How :func:`snake_conv` multiplies for these arguments: ``"split"`` (tf32x3 on operands split before the
    kernel), ``"rows_first"`` (tf32x3 split in registers, rows first) or ``"plain"`` (``tl.dot`` at the
    precision, tf32x3 split in registers untransposed). Launches of each form have tiles of their own
    (``tuning.launch_config``; ``bench/tune.py`` sweeps them apart)."""
    if resolve_precision(precision, device) != "tf32x3":
        return "plain"
    if split is None:
        chosen = _SPLIT_OPERANDS.get()
        split = kernel_size > 1 if chosen is None else chosen
    if split:
        return "split"
    if rows_first is None:
        chosen = _ROWS_FIRST.get()
        # Rows first on CUDA; in the interpreter either form is fp32 products.
        rows_first = device.type == "cuda" if chosen is None else chosen
    return "rows_first" if rows_first else "plain"


_SPLIT_BLOCK_T = 1024
_WEIGHT_SPLITS = DerivedTensors()  # weight -> (hi, lo)


def _snake_pass(src: ChunkInput, alpha: Optional[torch.Tensor], frames: int,
                split: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The first ``frames`` frames of ``snake(cat([context, x]))``, (B, C, frames) contiguous: as (hi, lo)
    with ``split``, else as (values, None)."""
    batch, channels = src.x.shape[:2]
    hi = torch.empty(batch, channels, frames, device=src.x.device, dtype=torch.float32)
    lo = torch.empty_like(hi) if split else None
    grid = (batch * channels, cdiv(frames, _SPLIT_BLOCK_T))
    check_grid(grid, "time blocks")
    _snake_pass_kernel[grid](
        *src.pointer_args(), alpha if alpha is not None else hi, hi, lo if split else hi, channels, src.length_ctx,
        src.x.shape[-1], frames, *src.stride_args(), HAS_CTX=src.has_ctx, HAS_ALPHA=alpha is not None,
        FAST_SIN=use_fast_sin(src.x.device), SPLIT=split, BLOCK_T=_SPLIT_BLOCK_T, num_warps=4)
    return hi, lo


def snake_activation(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``x + sin(alpha x)^2 / (alpha + 1e-9)`` in one pass: a snake that no conv absorbs (the one before a
    decoder's transposed conv), where PyTorch takes five elementwise passes.

    Args:
        x: (B, C, T), any strides; alpha: (C,), (1, C, 1) or (C, 1).

    Returns:
        (B, C, T) contiguous.
    """
    src = chunk_input("x", x, None, "context")
    alpha = per_channel("alpha", alpha, x.shape[1], x.device)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return _snake_pass(src, alpha, x.shape[-1], split=False)[0]


def _split_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) of a contiguous fp32 weight, as ``_snake_pass_kernel`` splits the input: computed once and
    kept while the weight is unchanged (:class:`DerivedTensors`)."""
    return _WEIGHT_SPLITS.get(weight, tf32_split)


def rows_share_tiles(batch: int, t_out: int, block_t: int) -> bool:
    """Whether a dense launch tiles (batch row, frame) pairs rather than each row's frames: when a row has
    at most half a tile of frames (a streaming step of many streams), most of each tile would be masked."""
    return batch > 1 and 2 * t_out <= block_t


def _launch_conv(src: ChunkInput, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: Optional[torch.Tensor],
                 out: torch.Tensor, *, t_out: int, stride: int = 1, dilation: int = 1, padding: int = 0,
                 res: Optional[ChunkInput] = None, residual_offset: int = 0, noise_seed: Optional[int] = None,
                 noise_start: Union[int, torch.Tensor] = 0, activation: Optional[str] = None,
                 precision: str, rests: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> None:
    """Launch the dense kernel on checked arguments: ``t_out`` output frames of ``weight.shape[0]`` channels.
    ``rests``: (input rest, weight rest) of operands split for the SPLIT products (``src.x`` and ``weight``
    then hold the high parts), or (None, weight rest) for the ROWS_FIRST product (the input is split in
    registers)."""
    batch, c_in = src.x.shape[:2]
    c_out, _, kernel_size = weight.shape
    device = out.device
    split = rests is not None and rests[0] is not None
    rows_first = rests is not None and rests[0] is None
    cfg = launch_config(CONV, device=device, c_in=c_in, c_out=c_out, kernel_size=kernel_size, stride=stride,
                        dilation=dilation, length=t_out, batch=batch, split=split, rows_first=rows_first)
    n_o_blocks = cdiv(c_out, cfg.blocks["BLOCK_O"])
    flat = rows_share_tiles(batch, t_out, cfg.blocks["BLOCK_T"])
    n_cols = batch * t_out if flat else t_out
    grid = (n_o_blocks * cdiv(n_cols, cfg.blocks["BLOCK_T"]), 1 if flat else batch)
    check_grid(grid, "batch size")
    if n_cols >= 2**31:
        raise ValueError(f"batch x frames ({batch} x {t_out}) must stay below 2**31")
    # Absent optional tensors are passed as ``out`` (never read: their HAS_* flag is off).
    if res is not None:
        res_ptrs, res_strides = (*res.pointer_args(), res.rows_arg()), res.stride_args()
        res_sizes = (res.length_ctx, res.x.shape[-1], residual_offset)
    else:
        res_ptrs, res_strides, res_sizes = (out, out, out), (0,) * 6, (0, 0, 0)
    noise_rows = isinstance(noise_start, torch.Tensor)
    if noise_seed is None:
        noise = (0, 0, out)
    else:
        noise = (noise_seed, 0, noise_start) if noise_rows else (noise_seed, noise_start, out)
    _snake_conv_kernel[grid](
        *src.pointer_args(), weight, bias if bias is not None else out, alpha if alpha is not None else out,
        *res_ptrs, out, *(out if r is None else r for r in rests or (None, None)),
        c_out, src.length_ctx, src.x.shape[-1], t_out, *res_sizes, *noise,
        stride, dilation, padding, n_o_blocks, n_cols,
        *src.stride_args(), weight.stride(0), *res_strides, *out.stride(),
        R=c_in * kernel_size, K=kernel_size, HAS_CTX=src.has_ctx, HAS_BIAS=bias is not None,
        HAS_ALPHA=alpha is not None, HAS_NOISE=noise_seed is not None,
        NOISE_ROWS=noise_rows and noise_seed is not None, HAS_RES=res is not None,
        HAS_RES_CTX=res is not None and res.has_ctx, RES_CTX_ROWS=res is not None and res.ctx_rows is not None,
        TANH=activation == "tanh", FAST_SIN=use_fast_sin(device),
        PRECISION=precision, FLAT=flat, SPLIT=split, ROWS_FIRST=rows_first, **cfg.blocks, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
