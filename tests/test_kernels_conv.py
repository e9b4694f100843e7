"""Fused snake + conv kernels (``snac_stream.kernels.conv``) against PyTorch references.

The references run ``F.conv1d`` on ``torch.cat([context, x])`` with ``snac_stream.model.layers.snake``. On a
machine without CUDA the kernels run in Triton's CPU interpreter (``conftest.py``), on small shapes; the tests
marked ``gpu`` repeat the checks at the model's real sizes with the fast sine and tf32x3 tensor-core products.
"""

from __future__ import annotations

import math
import random
from typing import Iterator, List, Optional

import pytest
import torch
import torch.nn.functional as F

from snac_stream.kernels import common, tuning
from snac_stream.kernels.conv import rows_share_tiles, snake_conv, snake_dwconv
from snac_stream.kernels.rows import RowsOf
from snac_stream.model.functional import snake
from snac_stream.model.noise import positional_randn

Tensor = torch.Tensor
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the CPU tests cover the same paths in the "
                                                 "interpreter, on small shapes)")


@pytest.fixture(autouse=True)
def fp32_reference() -> Iterator[None]:
    """Seeded inputs, and references in true fp32: PyTorch's CUDA convs default to TF32, about 1e-3 off."""
    torch.manual_seed(0)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE) * scale


def alphas(channels: int) -> torch.Tensor:
    """Per-channel snake parameters (1, C, 1), spread as in trained checkpoints."""
    return torch.rand(1, channels, 1, device=DEVICE) * 1.5 + 0.2


def poisoned(*shape: int) -> torch.Tensor:
    """An output buffer full of NaN: any element the kernel does not write fails the comparison."""
    return torch.full(shape, float("nan"), device=DEVICE)


def assert_close(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """Max abs error within ``rel`` of the reference's magnitude (and no NaN anywhere)."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert not torch.isnan(got).any(), "unwritten or NaN outputs"
    err = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    bound = rel * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= bound, f"max abs error {err:.3e} > {bound:.3e}"


def cat_time(context: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The streaming convention's virtual input, materialised."""
    return x if context is None else torch.cat([context, x], dim=-1)


def ref_dwconv(x: Tensor, weight: Tensor, bias: Optional[Tensor], *, alpha: Optional[Tensor] = None,
               dilation: int = 1, padding: int = 0, context: Optional[Tensor] = None, length: Optional[int] = None,
               alpha_out: Optional[Tensor] = None) -> Tensor:
    """snake -> depthwise conv -> snake on the concatenated input, in PyTorch (in float64: see ref_conv)."""
    h = cat_time(context, x).double()
    if alpha is not None:
        h = snake(h, alpha.double().reshape(1, -1, 1))
    y = F.conv1d(h, weight.double(), None if bias is None else bias.double(), padding=padding, dilation=dilation,
                 groups=h.shape[1])
    if length is not None:
        y = y[..., :length]
    return (y if alpha_out is None else snake(y, alpha_out.double().reshape(1, -1, 1))).to(x.dtype)


def ref_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, alpha: Optional[Tensor] = None,
             stride: int = 1, dilation: int = 1, padding: int = 0, context: Optional[Tensor] = None,
             length: Optional[int] = None, residual: Optional[Tensor] = None,
             residual_context: Optional[Tensor] = None, residual_offset: int = 0, noise_seed: Optional[int] = None,
             noise_start: int = 0, activation: Optional[str] = None) -> Tensor:
    """snake -> conv1d -> (+ bias) * noise + residual -> tanh, in PyTorch, in float64 and returned in ``x``'s
    dtype: in some test processes PyTorch's fp32 CPU arithmetic here was off by ~1e-4 of the output's magnitude
    (the bound is 1e-5), and the kernels are compared to the exact result, not to another rounding."""
    h = cat_time(context, x).double()
    if alpha is not None:
        h = snake(h, alpha.double().reshape(1, -1, 1))
    y = F.conv1d(h, weight.double(), None if bias is None else bias.double(), stride=stride, padding=padding,
                 dilation=dilation)
    if length is not None:
        y = y[..., :length]
    t = y.shape[-1]
    if noise_seed is not None:
        y = y * positional_randn(noise_seed, noise_start, t, y.device).view(1, 1, t)
    if residual is not None:
        y = y + cat_time(residual_context, residual)[..., residual_offset:residual_offset + t].double()
    return (torch.tanh(y) if activation == "tanh" else y).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# snake_dwconv
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dilation", [1, 3, 9])
@pytest.mark.parametrize("channels,frames", [(24, 301), (5, 37)])
def test_dwconv_offline_matches_reference(dilation: int, channels: int, frames: int) -> None:
    """A SNAC residual unit's first three layers (snake, dilated k=7 conv, snake) with its offline padding;
    channel counts and lengths that are not multiples of the blocks."""
    x, w, b = rand(2, channels, frames, scale=2.0), rand(channels, 1, 7, scale=0.4), rand(channels)
    a, a_out = alphas(channels), alphas(channels)
    pad = 3 * dilation
    out = poisoned(2, channels, frames)
    got = snake_dwconv(x, w, b, alpha=a, dilation=dilation, padding=pad, alpha_out=a_out, out=out)
    assert got is out
    assert_close(got, ref_dwconv(x, w, b, alpha=a, dilation=dilation, padding=pad, alpha_out=a_out))


@pytest.mark.parametrize("kernel_size,dilation", [(1, 1), (2, 1), (3, 2), (9, 4)])
def test_dwconv_other_kernels_no_snake_no_bias(kernel_size: int, dilation: int) -> None:
    x, w = rand(1, 7, 50), rand(7, 1, kernel_size)
    got = snake_dwconv(x, w, None, dilation=dilation, padding=kernel_size // 2)
    assert_close(got, ref_dwconv(x, w, None, dilation=dilation, padding=kernel_size // 2))


def test_dwconv_halo_too_large_for_a_window() -> None:
    """Taps spread wider than a window: the kernel falls back to one load per tap."""
    cfg = tuning.launch_config(tuning.DWCONV, device=DEVICE, c_in=3, c_out=3, kernel_size=3, stride=1,
                               dilation=400, length=900)
    assert cfg.blocks["WINDOW"] == 0
    x, w, b, a = rand(1, 3, 900), rand(3, 1, 3), rand(3), alphas(3)
    assert_close(snake_dwconv(x, w, b, alpha=a, dilation=400, padding=400),
                 ref_dwconv(x, w, b, alpha=a, dilation=400, padding=400))


@pytest.mark.parametrize("ctx_len,length", [(0, None), (1, None), (18, None), (54, 20), (80, 1)])
def test_dwconv_streaming_context(ctx_len: int, length: Optional[int]) -> None:
    """Input = cached context + new chunk, no padding, optionally fewer outputs than the maximum."""
    channels, dilation = 11, 9
    ctx, x = rand(2, channels, ctx_len), rand(2, channels, 70)
    w, b, a = rand(channels, 1, 7), rand(channels), alphas(channels)
    t_out = length if length is not None else ctx_len + 70 - 54
    out = poisoned(2, channels, t_out)
    got = snake_dwconv(x, w, b, alpha=a, dilation=dilation, context=ctx, length=length, out=out)
    assert_close(got, ref_dwconv(x, w, b, alpha=a, dilation=dilation, context=ctx, length=length))


def test_dwconv_strided_views_and_output_slice() -> None:
    """Non-contiguous input, context and output (a slice of a larger buffer) are addressed by their strides."""
    channels = 6
    base = rand(2, 40, channels).transpose(1, 2)  # (2, C, 40) with time stride C
    ctx = rand(2, channels, 30)[..., ::3]  # (2, C, 10) with time stride 3
    w, b, a = rand(channels, 1, 7), rand(channels), alphas(channels)
    big = poisoned(2, channels, 100)
    out = big[..., 10:54]
    snake_dwconv(base, w, b, alpha=a, context=ctx, out=out)
    assert_close(out, ref_dwconv(base, w, b, alpha=a, context=ctx))
    assert torch.isnan(big[..., :10]).all() and torch.isnan(big[..., 54:]).all()


def test_dwconv_streaming_chunks_reproduce_offline() -> None:
    """Feed a signal in random chunks, caching the last inputs as context: the outputs concatenate to the
    offline result (the streaming Conv op's left-context mechanism, done inside the kernel)."""
    gen = random.Random(0)
    channels, dilation, frames = 9, 3, 160
    pad, span = 3 * dilation, 6 * dilation + 1
    x, w, b = rand(1, channels, frames), rand(channels, 1, 7), rand(channels)
    a, a_out = alphas(channels), alphas(channels)
    offline = snake_dwconv(x, w, b, alpha=a, dilation=dilation, padding=pad, alpha_out=a_out)
    cache = torch.zeros(1, channels, pad, device=DEVICE)  # the left padding
    pieces: List[torch.Tensor] = []
    start = 0
    while start < frames:
        n = gen.randint(1, 40)
        chunk = x[..., start:start + n]
        start += chunk.shape[-1]
        if start == frames:  # end of stream: the right padding
            chunk = torch.cat([chunk, torch.zeros(1, channels, pad, device=DEVICE)], dim=-1)
        total = cache.shape[-1] + chunk.shape[-1]
        count = max(0, total - span + 1)
        pieces.append(snake_dwconv(chunk, w, b, alpha=a, dilation=dilation, context=cache, length=count,
                                   alpha_out=a_out))
        cache = torch.cat([cache, chunk], dim=-1)[..., count:]
    assert_close(torch.cat(pieces, dim=-1), offline)


# ----------------------------------------------------------------------------------------------------------
# snake_conv
# ----------------------------------------------------------------------------------------------------------


# "tf32x3" takes the split-operand path for K > 1 (``split``); the interpreter's products are exact fp32 either way.
PRECISION_PATHS = [None, "tf32x3"]


@pytest.mark.parametrize("precision", PRECISION_PATHS)
@pytest.mark.parametrize("stride", [2, 3, 4, 8])
def test_conv_strided_downsampling(stride: int, precision: Optional[str]) -> None:
    """SNAC's encoder downsampling: snake, then kernel 2s, stride s, padding ceil(s/2); odd lengths."""
    c_in, c_out, frames = 12, 20, 203
    k, pad = 2 * stride, math.ceil(stride / 2)
    x, w, b, a = rand(2, c_in, frames), rand(c_out, c_in, k, scale=0.2), rand(c_out), alphas(c_in)
    t_out = (frames + 2 * pad - k) // stride + 1
    out = poisoned(2, c_out, t_out)
    got = snake_conv(x, w, b, alpha=a, stride=stride, padding=pad, out=out, precision=precision)
    assert_close(got, ref_conv(x, w, b, alpha=a, stride=stride, padding=pad))


@pytest.mark.parametrize("precision", PRECISION_PATHS)
@pytest.mark.parametrize("ctx_len,length", [(0, None), (3, None), (7, 4), (13, 1)])
def test_conv_strided_streaming_context(ctx_len: int, length: Optional[int], precision: Optional[str]) -> None:
    c_in, c_out, stride = 8, 17, 3
    ctx, x = rand(1, c_in, ctx_len), rand(1, c_in, 29)
    w, a = rand(c_out, c_in, 2 * stride, scale=0.3), alphas(c_in)
    got = snake_conv(x, w, alpha=a, stride=stride, context=ctx, length=length, precision=precision)
    assert_close(got, ref_conv(x, w, alpha=a, stride=stride, context=ctx, length=length))


def test_conv_pointwise_residual_epilogue() -> None:
    """The residual unit's 1x1 conv plus its skip connection, channels not a multiple of any block."""
    channels, frames = 37, 150
    x, w, b = rand(2, channels, frames), rand(channels, channels, 1, scale=0.2), rand(channels)
    skip = rand(2, channels, frames)
    out = poisoned(2, channels, frames)
    assert_close(snake_conv(x, w, b, residual=skip, out=out), ref_conv(x, w, b, residual=skip))


def test_conv_residual_split_across_context_with_offset() -> None:
    """Streaming skip path: the residual terms start ``offset`` frames into cat([residual_context, residual])
    and straddle the boundary between the two."""
    channels, frames = 20, 33
    x, w, a = rand(2, channels, frames), rand(channels, channels, 1, scale=0.2), alphas(channels)
    r_ctx, res = rand(2, channels, 12), rand(2, channels, 30)
    kwargs = dict(alpha=a, residual=res, residual_context=r_ctx, residual_offset=9)
    got = snake_conv(x, w, out=poisoned(2, channels, frames), **kwargs)
    assert_close(got, ref_conv(x, w, **kwargs))


@pytest.mark.parametrize("frames", [5, 40])  # 5: (row, frame) pairs share tiles (FLAT); 40: a row's own tiles
def test_contexts_read_through_row_lists_equal_gathered_ones(frames: int) -> None:
    """A context given as rows of a batch (``RowsOf``: an engine's steady step) gives the same outputs, bit for
    bit, as the same rows gathered first: the depthwise conv's context and the dense conv's residual context
    (read in place through the row list, FLAT tiles included), and the dense conv's input context (gathered
    inside). Rows out of order, one repeated, others never read; the batch is left as it was."""
    channels, held = 24, 12
    batch = rand(7, channels, held + 3)[..., 3:]  # rows with a batch stride of their own, not contiguous
    before = batch.clone()
    rows = torch.tensor([5, 0, 3, 5], device=DEVICE)
    ctx = RowsOf(batch, rows)
    x = rand(4, channels, frames)
    w_dw, b_dw, w_pw = rand(channels, 1, 7, scale=0.3), rand(channels), rand(channels, channels, 1, scale=0.2)
    a, a_out = alphas(channels), alphas(channels)
    dw_rows = snake_dwconv(x, w_dw, b_dw, alpha=a, dilation=2, context=ctx, alpha_out=a_out)
    dw_gathered = snake_dwconv(x, w_dw, b_dw, alpha=a, dilation=2, context=ctx.gathered(), alpha_out=a_out)
    assert torch.equal(dw_rows, dw_gathered)
    h = dw_rows[..., :frames]
    kwargs = dict(alpha=a, residual=x, residual_offset=held - 6)  # the residual unit's skip path
    assert torch.equal(snake_conv(h, w_pw, b_dw, residual_context=ctx, **kwargs),
                       snake_conv(h, w_pw, b_dw, residual_context=ctx.gathered(), **kwargs))
    w_k3 = rand(channels, channels, 3, scale=0.2)
    assert torch.equal(snake_conv(x, w_k3, alpha=a, context=ctx), snake_conv(x, w_k3, alpha=a, context=ctx.gathered()))
    assert torch.equal(batch, before)
    with pytest.raises(ValueError, match="agree in batch"):
        snake_dwconv(x, w_dw, b_dw, context=RowsOf(batch, rows[:3]))
    with pytest.raises(TypeError, match="int64"):
        snake_dwconv(x, w_dw, b_dw, context=RowsOf(batch, rows.int()))


@pytest.mark.parametrize("seed,start", [(0, 0), (1234567, 5000), (2**62 + 12345, 2**32 - 7)])
def test_conv_noise_block_epilogue(seed: int, start: int) -> None:
    """SNAC's noise block ``x + n * linear(x)``, with ``n`` drawn by absolute position (also across the 2**32
    boundary of Philox's counter)."""
    channels, frames = 24, 70
    x, w = rand(2, channels, frames), rand(channels, channels, 1, scale=0.2)
    got = snake_conv(x, w, residual=x, noise_seed=seed, noise_start=start)
    n = positional_randn(seed, start, frames, DEVICE).view(1, 1, frames)
    assert_close(got, x + n * F.conv1d(x, w), rel=2e-5)


def test_conv_noise_is_positional_across_chunks() -> None:
    channels, frames = 16, 90
    x, w = rand(1, channels, frames), rand(channels, channels, 1, scale=0.2)
    offline = snake_conv(x, w, residual=x, noise_seed=99)
    chunked = torch.cat([snake_conv(x[..., s:e], w, residual=x[..., s:e], noise_seed=99, noise_start=s)
                         for s, e in ((0, 17), (17, 18), (18, 90))], dim=-1)
    assert_close(chunked, offline, rel=1e-6)


def test_conv_encoder_input_single_channel() -> None:
    """C_in = 1 -> 64, kernel 7: a reduction of 7 padded to one tensor-core step."""
    x, w, b = rand(2, 1, 333), rand(64, 1, 7, scale=0.3), rand(64)
    out = poisoned(2, 64, 333)
    assert_close(snake_conv(x, w, b, padding=3, out=out), ref_conv(x, w, b, padding=3))


def test_conv_decoder_output_single_channel_tanh() -> None:
    """C_in = 64 -> C_out = 1, kernel 7, snake before and tanh after: the decoder's last layers."""
    x, w, b, a = rand(2, 64, 261), rand(1, 64, 7, scale=0.1), rand(1), alphas(64)
    out = poisoned(2, 1, 261)
    got = snake_conv(x, w, b, alpha=a, padding=3, activation="tanh", out=out)
    assert_close(got, ref_conv(x, w, b, alpha=a, padding=3, activation="tanh"))


@pytest.mark.parametrize("precision", PRECISION_PATHS)
@pytest.mark.parametrize("c_in", [10, 24])
def test_conv_epilogue_order_all_at_once(c_in: int, precision: Optional[str]) -> None:
    """bias, then noise, then residual, then tanh, with context on both the input and the residual; a dilated
    k=7 conv whose reduction (C_in * 7) is one partial step or several."""
    c_out = 18
    ctx, x = rand(1, c_in, 6), rand(1, c_in, 40)
    w, b, a = rand(c_out, c_in, 7, scale=0.1), rand(c_out), alphas(c_in)
    r_ctx, res = rand(1, c_out, 3), rand(1, c_out, 40)
    kwargs = dict(alpha=a, dilation=2, context=ctx, length=30, residual=res, residual_context=r_ctx,
                  residual_offset=2, noise_seed=7, noise_start=100, activation="tanh")
    assert_close(snake_conv(x, w, b, precision=precision, **kwargs), ref_conv(x, w, b, **kwargs), rel=2e-5)


@pytest.mark.parametrize("precision", PRECISION_PATHS)
@pytest.mark.parametrize("c_in,c_out,k,stride,pad", [(6, 10, 8, 4, 2), (32, 3, 7, 1, 3)])
def test_conv_streaming_chunks_reproduce_offline(c_in: int, c_out: int, k: int, stride: int, pad: int,
                                                 precision: Optional[str]) -> None:
    """A strided conv and a k=7 conv fed in random chunks with their input cache as context reproduce the
    offline output."""
    gen = random.Random(1)
    frames = 230
    x, w, b, a = rand(1, c_in, frames), rand(c_out, c_in, k, scale=0.3), rand(c_out), alphas(c_in)
    offline = snake_conv(x, w, b, alpha=a, stride=stride, padding=pad, precision=precision)
    cache = torch.zeros(1, c_in, pad, device=DEVICE)
    pieces: List[torch.Tensor] = []
    start = 0
    while start < frames:
        chunk = x[..., start:start + gen.randint(1, 50)]
        start += chunk.shape[-1]
        if start == frames:
            chunk = torch.cat([chunk, torch.zeros(1, c_in, pad, device=DEVICE)], dim=-1)
        total = cache.shape[-1] + chunk.shape[-1]
        count = max(0, (total - k) // stride + 1)
        pieces.append(snake_conv(chunk, w, b, alpha=a, stride=stride, context=cache, length=count,
                                 precision=precision))
        cache = torch.cat([cache, chunk], dim=-1)[..., count * stride:]
    assert_close(torch.cat(pieces, dim=-1), offline)


@pytest.mark.parametrize("precision", PRECISION_PATHS)
@pytest.mark.parametrize("frames,stride", [(3, 1), (8, 1), (9, 2)])
def test_conv_rows_sharing_tiles(frames: int, stride: int, precision: Optional[str]) -> None:
    """A streaming step of several streams: a few frames per row, so tiles span (row, frame) pairs. Every
    row's own context, residual context and noise position stay its own: each row equals the same conv on
    that row alone and the PyTorch reference."""
    batch, c_in, c_out = 5, 12, 20
    t_out = (2 + frames - 3) // stride + 1
    block_t = tuning.launch_config(tuning.CONV, device=DEVICE, c_in=c_in, c_out=c_out, kernel_size=3, stride=stride,
                                   dilation=1, length=t_out, batch=batch).blocks["BLOCK_T"]
    assert rows_share_tiles(batch, t_out, block_t) and not rows_share_tiles(1, t_out, block_t)
    ctx, x = rand(batch, c_in, 2), rand(batch, c_in, frames)
    w, b, a = rand(c_out, c_in, 3, scale=0.3), rand(c_out), alphas(c_in)
    r_ctx, res = rand(batch, c_out, 2), rand(batch, c_out, t_out)
    starts = torch.tensor([0, 7, 2**33 + 1, 50, 3], device=DEVICE)
    kwargs = dict(alpha=a, stride=stride, residual_offset=1, noise_seed=11, precision=precision)
    got = snake_conv(x, w, b, context=ctx, residual=res, residual_context=r_ctx, noise_start=starts,
                     out=poisoned(batch, c_out, t_out), **kwargs)
    for row in range(batch):
        one = dict(context=ctx[row:row + 1], residual=res[row:row + 1], residual_context=r_ctx[row:row + 1],
                   noise_start=int(starts[row]))
        assert_close(got[row:row + 1], snake_conv(x[row:row + 1], w, b, **one, **kwargs), rel=1e-6)
        reference = {k: v for k, v in kwargs.items() if k != "precision"}
        assert_close(got[row:row + 1], ref_conv(x[row:row + 1], w, b, **one, **reference), rel=2e-5)


def test_split_operands_are_a_tf32_high_part_and_the_exact_rest() -> None:
    """The split path's operands: ``hi`` has no bits below tf32's 10-bit mantissa, ``hi + lo`` is the snaked
    input (context joined) exactly, and ``|lo|`` is at most half a tf32 unit of ``hi``; the weight's split is
    the same rule, kept until the weight changes in place."""
    from snac_stream.kernels.common import chunk_input
    from snac_stream.kernels.conv import _snake_pass, _split_weight

    ctx, x, a = rand(2, 5, 3, scale=3.0), rand(2, 5, 1500, scale=3.0), alphas(5)
    hi, lo = _snake_pass(chunk_input("x", x, ctx, "context"), a.view(-1).contiguous(), 1400, split=True)
    v = snake(torch.cat([ctx, x], dim=-1), a)[..., :1400]
    assert hi.shape == lo.shape == (2, 5, 1400) and hi.is_contiguous() and lo.is_contiguous()
    assert ((hi.view(torch.int32) & 0x1FFF) == 0).all()
    assert torch.equal(hi + lo, hi.double().add(lo.double()).float())  # hi + lo is exact in fp32
    assert_close(hi + lo, v, rel=1e-6)
    assert (lo.abs() <= hi.abs() * 2.0**-11).all()
    w = rand(7, 5, 4)
    w_hi, w_lo = _split_weight(w)
    assert ((w_hi.view(torch.int32) & 0x1FFF) == 0).all() and torch.equal(w_hi + w_lo, w)
    assert _split_weight(w)[0] is w_hi  # kept
    w.mul_(2.0)
    assert torch.equal(_split_weight(w)[0], w_hi * 2.0)  # an in-place change is seen


@pytest.mark.parametrize("shape", [(1, 3, 1), (2, 5, 1029), (3, 2, 2500)])
def test_snake_activation_matches_torch(shape: tuple) -> None:
    """The standalone snake pass (the one before a transposed conv): any strides in, contiguous out, odd
    lengths across its time blocks, alpha in any per-channel shape."""
    from snac_stream.kernels.conv import snake_activation

    b, c, t = shape
    x = rand(b, t, c, scale=4.0).transpose(1, 2)  # non-contiguous, time stride != 1
    a = alphas(c)
    got = snake_activation(x, a)
    assert got.shape == (b, c, t) and got.is_contiguous()
    assert_close(got, snake(x, a), rel=1e-6)
    assert torch.equal(snake_activation(x, a.view(c)), got)
    assert snake_activation(x[..., :0], a).shape == (b, c, 0)
    with pytest.raises(ValueError, match="one value per channel"):
        snake_activation(x, alphas(c + 1))


def test_conv_split_products_equal_the_plain_ones() -> None:
    """Split and unsplit tf32x3 give the same conv (in the interpreter both are fp32 products), for a strided
    conv with context, padding and a residual, and for a 1x1 conv split on request."""
    ctx, x, w, b, a = rand(2, 9, 4), rand(2, 9, 61), rand(14, 9, 6, scale=0.3), rand(14), alphas(9)
    kwargs = dict(alpha=a, stride=3, context=ctx, residual=rand(2, 14, 21), precision="tf32x3")
    assert_close(snake_conv(x, w, b, split=True, **kwargs), snake_conv(x, w, b, split=False, **kwargs), rel=1e-6)
    w1 = rand(14, 9, 1, scale=0.3)
    assert_close(snake_conv(x, w1, alpha=a, split=True, precision="tf32x3"), ref_conv(x, w1, alpha=a))


@pytest.mark.parametrize("batch,frames,k,stride,c_in", [(5, 3, 1, 1, 40), (1, 70, 1, 1, 12), (3, 9, 3, 2, 20)])
def test_conv_rows_first_product_matches_the_reference(batch: int, frames: int, k: int, stride: int,
                                                       c_in: int) -> None:
    """The rows-first product (frames as the products' rows, three accumulators over the reduction) computes
    the conv with every epilogue: on tiles spanning several streams' frames (per-row context, residual context
    and noise position) and on one stream's long row, for a reduction that ends inside a step (40 channels),
    and with taps and a stride. The weight's rests come split once, as the split path's."""
    c_out = 24
    ctx = rand(batch, c_in, 2)
    x = rand(batch, c_in, frames)
    t_out = (2 + frames - k) // stride + 1
    w, b, a = rand(c_out, c_in, k, scale=0.3), rand(c_out), alphas(c_in)
    r_ctx, res = rand(batch, c_out, 2), rand(batch, c_out, t_out)
    starts = torch.arange(batch, device=DEVICE) * 1000 + 3
    kwargs = dict(alpha=a, stride=stride, residual_offset=1, noise_seed=11, context=ctx, residual=res,
                  residual_context=r_ctx)
    got = snake_conv(x, w, b, noise_start=starts, precision="tf32x3", split=False, rows_first=True,
                     out=poisoned(batch, c_out, t_out), **kwargs)
    for row in range(batch):
        one = {key: (v[row:row + 1] if isinstance(v, torch.Tensor) and v.shape[0] == batch else v)
               for key, v in kwargs.items()}
        assert_close(got[row:row + 1], ref_conv(x[row:row + 1], w, b, noise_start=int(starts[row]), **one),
                     rel=2e-5)
    from snac_stream.kernels.conv import rows_first_products

    with rows_first_products(True):  # the thread's choice, when the call leaves it open
        again = snake_conv(x, w, b, noise_start=starts, precision="tf32x3", split=False, **kwargs)
    assert torch.equal(again, got)


def test_conv_precisions_accepted() -> None:
    x, w = rand(1, 16, 40), rand(16, 16, 1, scale=0.25)
    ref = ref_conv(x, w)
    for precision in ("ieee", "tf32x3"):
        assert_close(snake_conv(x, w, precision=precision), ref)
    assert_close(snake_conv(x, w, precision="tf32"), ref, rel=5e-3)


def test_empty_outputs() -> None:
    x = rand(1, 4, 5)
    assert snake_dwconv(x, rand(4, 1, 7), None).shape == (1, 4, 0)
    assert snake_conv(x, rand(3, 4, 7)).shape == (1, 3, 0)
    assert snake_conv(x, rand(3, 4, 1), length=0).shape == (1, 3, 0)


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors() -> None:
    x, w = rand(1, 4, 20), rand(4, 1, 3)
    with pytest.raises(TypeError, match="float32"):
        snake_dwconv(x.double(), w.double(), None)
    with pytest.raises(TypeError, match="torch.Tensor"):
        snake_dwconv(x.tolist(), w, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="3 dimensions"):
        snake_dwconv(x[0], w, None)
    with pytest.raises(ValueError, match="depthwise"):
        snake_dwconv(x, rand(5, 1, 3), None)
    with pytest.raises(ValueError, match="one value per channel"):
        snake_dwconv(x, w, None, alpha=rand(1, 5, 1))
    with pytest.raises(ValueError, match="bias must have shape"):
        snake_dwconv(x, w, rand(3))
    with pytest.raises(ValueError, match="agree in batch and channels"):
        snake_dwconv(x, w, None, context=rand(1, 3, 4))
    with pytest.raises(ValueError, match="length 19 exceeds"):
        snake_dwconv(x, w, None, length=19)
    with pytest.raises(ValueError, match="dilation"):
        snake_dwconv(x, w, None, dilation=0)
    with pytest.raises(ValueError, match="out has shape"):
        snake_dwconv(x, w, None, out=rand(1, 4, 17))
    with pytest.raises(ValueError, match="overlaps x"):
        snake_dwconv(x, w, None, padding=1, out=x)

    wd = rand(6, 4, 3)
    with pytest.raises(ValueError, match="input channels"):
        snake_conv(x, rand(6, 5, 3))
    with pytest.raises(ValueError, match="stride"):
        snake_conv(x, wd, stride=0)
    with pytest.raises(ValueError, match="precision"):
        snake_conv(x, wd, precision="fp16")
    with pytest.raises(ValueError, match="activation"):
        snake_conv(x, wd, activation="relu")
    with pytest.raises(ValueError, match="noise_seed"):
        snake_conv(x, wd, noise_seed=-1)
    with pytest.raises(ValueError, match="noise_seed"):
        snake_conv(x, wd, noise_seed=2**63)
    with pytest.raises(ValueError, match="residual must have shape"):
        snake_conv(x, wd, residual=rand(1, 4, 18))
    with pytest.raises(ValueError, match="out of range"):
        snake_conv(x, wd, residual=rand(1, 6, 18), residual_offset=1)
    with pytest.raises(ValueError, match="needs a residual"):
        snake_conv(x, wd, residual_context=rand(1, 6, 2))
    with pytest.raises(ValueError, match="residual_offset"):
        snake_conv(x, wd, residual=rand(1, 6, 18), residual_offset=-1)


def test_fast_sin_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(common.PRECISE_SIN_ENV, raising=False)
    assert not common.use_fast_sin("cpu")
    assert common.use_fast_sin("cuda") == (not common.interpreting())
    monkeypatch.setenv(common.PRECISE_SIN_ENV, "1")
    assert not common.use_fast_sin("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(common.PRECISE_SIN_ENV)
    assert common.interpreting() and not common.use_fast_sin("cuda")


BACKEND = "cuda" if CUDA and not common.interpreting() else "interpreter"


def test_conv_small_tiles_from_table() -> None:
    """A table entry overrides the default rule; small blocks make many tiles along channels and time."""
    key = tuning.ShapeKey(tuning.CONV, BACKEND, 16, 40, 3, 2, 1, tuning.t_bucket(45))
    custom = tuning.LaunchConfig({"BLOCK_O": 16, "BLOCK_T": 16, "BLOCK_R": 16}, num_warps=1)
    tuning.TABLE[key] = custom
    try:
        assert tuning.launch_config(tuning.CONV, device=DEVICE, c_in=16, c_out=40, kernel_size=3, stride=2,
                                    dilation=1, length=45) is custom
        x, w, b, a = rand(2, 16, 90), rand(40, 16, 3, scale=0.25), rand(40), alphas(16)
        out = poisoned(2, 40, 45)
        snake_conv(x, w, b, alpha=a, stride=2, padding=1, out=out)
        assert_close(out, ref_conv(x, w, b, alpha=a, stride=2, padding=1))
    finally:
        del tuning.TABLE[key]


# (rows first, blocks, warps, stages, C_in, K, stride): every tiling the measured table hands out, on its entry's
# own taps and stride (and C_in where under 24: a reduction of one step stays one step), and the fill rule's tiles
# on a 1x1 and a strided 3-tap conv. A tiling is only handed out for its entry's reduction: a 3-stage pipeline
# of the widest tiles over a reduction of several steps needs more shared memory than an SM has.
TABLE_TILINGS = sorted(
    {(key.kernel == tuning.CONV_ROWS_FIRST, tuple(sorted(cfg.blocks.items())), cfg.num_warps, cfg.num_stages,
      min(key.c_in, 24), key.kernel_size, key.stride)
     for key, cfg in tuning.TABLE.items() if key.kernel in (tuning.CONV, tuning.CONV_ROWS_FIRST)}
    | {(rows_first, (("BLOCK_O", o), ("BLOCK_R", 32), ("BLOCK_T", t)), 4, 3, 24, kernel_size, stride)
       for rows_first in (False, True) for o, t in tuning.FILL_TILES
       for kernel_size, stride in ((1, 1), (3, 2))})


@pytest.mark.parametrize("tiling", TABLE_TILINGS, ids=lambda t: ("rows_first-" if t[0] else "")
                         + "-".join(f"{k[6:]}{v}" for k, v in t[1]) + f"-w{t[2]}-c{t[4]}-k{t[5]}-s{t[6]}")
def test_every_tiling_in_the_table_computes_the_conv(tiling, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each tiling the measured table or the fill rule hands out (the rows-first product's with that product,
    the others' on split operands where the conv has taps), forced onto a small launch of several rows whose
    sizes no tile divides (masked edges along channels, frames and the reduction), computes the conv."""
    rows_first, blocks, warps, stages, c_in, kernel_size, stride = tiling
    length = 45
    kernel = tuning.CONV_ROWS_FIRST if rows_first and BACKEND == "cuda" else tuning.CONV
    key = tuning.ShapeKey(kernel, BACKEND, c_in, 40, kernel_size, stride, 1, tuning.t_bucket(length), True)
    cfg = tuning.LaunchConfig(dict(blocks), num_warps=warps, num_stages=stages)
    monkeypatch.setitem(tuning.TABLE, key, cfg)
    monkeypatch.setattr(tuning, "_fill_gpu", lambda cfg, *args, **kwargs: cfg)
    assert tuning.launch_config(tuning.CONV, device=DEVICE, c_in=c_in, c_out=40, kernel_size=kernel_size,
                                stride=stride, dilation=1, length=length, batch=3, rows_first=rows_first) is cfg
    x, w = rand(3, c_in, length * stride), rand(40, c_in, kernel_size, scale=0.25)
    b, a = rand(40), alphas(c_in)
    padding = (kernel_size - 1) // 2
    out = poisoned(3, 40, (length * stride + 2 * padding - kernel_size) // stride + 1)  # 44 or 45 frames
    snake_conv(x, w, b, alpha=a, stride=stride, padding=padding, out=out, rows_first=rows_first,
               split=False if rows_first else None, precision="tf32x3" if rows_first else None)
    assert_close(out, ref_conv(x, w, b, alpha=a, stride=stride, padding=padding))


def test_entries_tuned_on_many_rows_serve_batched_launches_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry tuned on an engine step (``many_rows``) serves launches of several rows, before a one-row entry
    of the same shape; one-row launches keep theirs. On CUDA a batched launch too small for the tuned tiles
    still takes the smallest ones (the fill rule); the interpreter has no fill. The conv stays exact."""
    shape = dict(c_in=16, c_out=40, kernel_size=1, stride=1, dilation=1, length=12)
    one = tuning.ShapeKey(tuning.CONV, BACKEND, 16, 40, 1, 1, 1, tuning.t_bucket(12))
    many_cfg = tuning.LaunchConfig({"BLOCK_O": 32, "BLOCK_T": 32, "BLOCK_R": 16}, num_warps=2)
    one_cfg = tuning.LaunchConfig({"BLOCK_O": 16, "BLOCK_T": 16, "BLOCK_R": 16}, num_warps=1)
    monkeypatch.setitem(tuning.TABLE, tuning.ShapeKey(**{**one.__dict__, "many_rows": True}), many_cfg)
    monkeypatch.setitem(tuning.TABLE, one, one_cfg)
    assert tuning.launch_config(tuning.CONV, device=DEVICE, batch=1, **shape) is one_cfg
    batched = tuning.launch_config(tuning.CONV, device=DEVICE, batch=3, **shape)
    if BACKEND == "cuda":  # 3 rows of 12 frames: one program with 32 x 32 tiles, so the fill applies
        assert batched.blocks == {"BLOCK_O": 16, "BLOCK_T": 16, "BLOCK_R": 16}
    else:
        assert batched is many_cfg
    x, w, b, a = rand(3, 16, 12), rand(40, 16, 1, scale=0.25), rand(40), alphas(16)
    assert_close(snake_conv(x, w, b, alpha=a), ref_conv(x, w, b, alpha=a))
    del tuning.TABLE[one]
    assert tuning.launch_config(tuning.CONV, device=DEVICE, batch=1, **shape) == tuning._default(
        one, 12, 1, tuning._programs_wanted(DEVICE) if BACKEND == "cuda" else 0)


def test_rows_first_launches_have_a_rule_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA a rows-first launch takes 64-frame tiles of up to 128 output channels, not the table's entries
    for the untransposed form but entries of its own (``snake_conv_rows_first``, which ``bench/tune.py``
    records apart), and a launch with too few programs for them (one stream's streaming step) still takes the
    smallest tiles."""
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "_programs_wanted", lambda device: 264)
    for key in [key for key in tuning.TABLE if key.kernel == tuning.CONV_ROWS_FIRST]:  # the rule alone
        monkeypatch.delitem(tuning.TABLE, key)
    cuda = torch.device("cuda")
    engine_step = dict(c_in=64, c_out=64, kernel_size=1, stride=1, dilation=1, length=2048, batch=2048)
    assert tuning.launch_config(tuning.CONV, device=cuda, **engine_step).blocks["BLOCK_T"] == 32  # the table's
    cfg = tuning.launch_config(tuning.CONV, device=cuda, rows_first=True, **engine_step)
    assert cfg.blocks == {"BLOCK_O": 64, "BLOCK_T": 64, "BLOCK_R": 32} and cfg.num_warps == 4
    wide = dict(engine_step, c_in=512, c_out=512, length=32)
    assert tuning.launch_config(tuning.CONV, device=cuda, rows_first=True, **wide).blocks["BLOCK_O"] == 128
    one_stream = tuning.launch_config(tuning.CONV, device=cuda, rows_first=True, **dict(wide, batch=1))
    assert one_stream.blocks == {"BLOCK_O": 16, "BLOCK_T": 16, "BLOCK_R": 32}
    tuned = tuning.LaunchConfig({"BLOCK_O": 64, "BLOCK_T": 128, "BLOCK_R": 16}, num_warps=8, num_stages=3)
    monkeypatch.setitem(tuning.TABLE, tuning.ShapeKey(tuning.CONV_ROWS_FIRST, "cuda", 64, 64, 1, 1, 1, 2048, True),
                        tuned)
    assert tuning.launch_config(tuning.CONV, device=cuda, rows_first=True, **engine_step) is tuned
    assert tuning.launch_config(tuning.CONV, device=cuda, **engine_step).blocks["BLOCK_T"] == 32


def test_launches_short_of_programs_take_the_largest_fill_tiles_that_fill_the_gpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA a dense launch whose plain tiles give fewer than two programs per SM steps down ``FILL_TILES`` to
    the largest tiles that give enough, with the plain tiles' reduction step (each output's sum in the same
    order); only a launch that no fill tile fills takes 16 x 16. Launches with enough programs keep theirs."""
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "_programs_wanted", lambda device: 264)
    monkeypatch.setattr(tuning, "TABLE", {})  # the rule alone
    cuda = torch.device("cuda")

    def tiles(**shape) -> tuple:
        plain = tuning._default(tuning.ShapeKey(tuning.CONV, "cuda", shape["c_in"], shape["c_out"],
                                                shape["kernel_size"], shape["stride"], 1,
                                                tuning.t_bucket(shape["length"])), shape["length"])
        cfg = tuning.launch_config(tuning.CONV, device=cuda, dilation=1, **shape)
        assert cfg.blocks["BLOCK_R"] == plain.blocks["BLOCK_R"]
        return cfg.blocks["BLOCK_O"], cfg.blocks["BLOCK_T"]

    # A 44 kHz encoder's last strided conv on 10 s: 144 programs with 128 x 64 tiles, 288 with 64 x 64.
    assert tiles(c_in=512, c_out=1024, kernel_size=16, stride=8, length=1120) == (64, 64)
    # A decoder's first conv on 10 s: 128 programs with 64 x 64 tiles, 480 with 32 x 32.
    assert tiles(c_in=768, c_out=1024, kernel_size=7, stride=1, length=470) == (32, 32)
    # One stream's streaming step: no fill tile reaches 264 programs.
    assert tiles(c_in=512, c_out=512, kernel_size=7, stride=1, length=32) == (16, 16)
    # Enough programs with the plain tiles: kept.
    assert tiles(c_in=64, c_out=128, kernel_size=4, stride=2, length=215040) == (128, 64)
    # Narrow outputs' plain tiles (16 x 128) step down along frames only.
    assert tiles(c_in=64, c_out=8, kernel_size=1, stride=1, length=9000) == (16, 32)


def test_product_form_names_the_path_a_dense_conv_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    """``product_form``, which ``snake_conv`` and ``bench/tune.py`` both follow: operands split before the
    kernel for tf32x3 with taps (or as the call or the thread asks), rows first for tf32x3 split in registers
    on CUDA (or as the call or the thread asks), a plain product at the other precisions."""
    from snac_stream.kernels.conv import product_form, rows_first_products, split_operands

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert product_form(7, "tf32x3", cuda) == "split"
    assert product_form(1, "tf32x3", cuda, split=True) == "split"
    assert product_form(1, "tf32x3", cuda) == "rows_first"
    assert product_form(1, "tf32x3", cpu) == "plain"  # the interpreter's products are fp32 either way
    assert product_form(1, "tf32x3", cpu, rows_first=True) == "rows_first"
    assert product_form(2, "tf32x3", cuda, split=False) == "rows_first"
    with rows_first_products(False):
        assert product_form(1, "tf32x3", cuda) == "plain"
        assert product_form(1, "tf32x3", cuda, rows_first=True) == "rows_first"
    with split_operands(False):
        assert product_form(7, "tf32x3", cuda) == "rows_first"
        assert product_form(7, "tf32x3", cuda, split=True) == "split"
        with rows_first_products(False):
            assert product_form(7, "tf32x3", cuda) == "plain"
    with split_operands(True):
        assert product_form(1, "tf32x3", cuda) == "split"
        assert product_form(1, "tf32x3", cuda, split=False) == "rows_first"
    assert product_form(7, "tf32x3", cuda) == "split"  # the thread's choice ends with its block
    for precision in ("tf32", "ieee"):
        assert product_form(7, precision, cuda) == product_form(1, precision, cuda) == "plain"


_WGMMA_OPERANDS = r"""
import inspect, json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from snac_stream.kernels import conv

kernel = conv._snake_conv_kernel
pointers = {"ctx_ptr", "x_ptr", "w_ptr", "bias_ptr", "alpha_ptr", "rctx_ptr", "res_ptr", "out_ptr", "xlo_ptr",
            "wlo_ptr"}
found = {}
for rows_first in (True, False):
    constants = dict(R=128, K=1, HAS_CTX=False, HAS_BIAS=True, HAS_ALPHA=False, HAS_NOISE=False, NOISE_ROWS=False,
                     HAS_RES=True, HAS_RES_CTX=False, RES_CTX_ROWS=False, TANH=False, FAST_SIN=True, PRECISION="tf32x3", FLAT=True,
                     SPLIT=False, ROWS_FIRST=rows_first, BLOCK_O=128, BLOCK_T=64, BLOCK_R=32)
    signature = {p: "constexpr" if p in constants else "*fp32" if p in pointers else "*i64"
                 if p in ("noise_rows_ptr", "rctx_rows_ptr") else "i64" if p.startswith("noise_") else "i32"
                 for p in inspect.signature(kernel.fn).parameters}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    products = re.findall(r"wgmma\.mma_async[^;]*;", compiled.asm["ptx"], re.S)
    # The shape (m64nNk8: N columns) and the left operand after {accumulators}: {registers} or a descriptor
    found[str(rows_first)] = [(re.search(r"m64n(\d+)k8", p).group(1), p.split("}", 1)[1].lstrip(", ").startswith("{"))
                              for p in products]
print(json.dumps(found))
"""


def test_rows_first_product_reads_its_split_input_from_registers_on_hopper() -> None:
    """What the rows-first form is for, checked in the code Triton makes for an H100 (sm_90, compiled here in a
    process of its own, outside the interpreter; no GPU needed): every tensor-core product (``wgmma``) of a
    rows-first 1x1 conv (64-frame by 128-channel tiles) has the tile's 128 output channels as its columns and
    its left operand, the split input, in registers; the untransposed form's products have the 64 frames as
    their columns, its split input the right operand, which a ``wgmma`` reads from shared memory only."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _WGMMA_OPERANDS], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["True"] and all(product == ["128", True] for product in found["True"]), found
    assert found["False"] and all(product[0] == "64" for product in found["False"]), found


def test_split_operands_step_the_reduction_by_16(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dense conv tells ``launch_config`` when its operands are split (tf32x3, K > 1), and the GPU rule
    then steps the reduction 16 wide (four tiles per step) where plain operands take 32."""
    from snac_stream.kernels import conv as conv_module
    seen = []
    original = conv_module.launch_config

    def spy(kernel, **kw):
        seen.append((kw["kernel_size"], kw["split"]))
        return original(kernel, **kw)

    monkeypatch.setattr(conv_module, "launch_config", spy)
    x, a = rand(1, 16, 40), alphas(16)
    for k in (3, 1):
        w, b = rand(20, 16, k, scale=0.25), rand(20)
        assert_close(snake_conv(x, w, b, alpha=a, precision="tf32x3"), ref_conv(x, w, b, alpha=a))
    assert seen == [(3, True), (1, False)]
    key = tuning.ShapeKey(tuning.CONV, "cuda", 384, 768, 16, 8, 1, 8192)
    assert tuning._default_conv(key, 8192, split=True).blocks["BLOCK_R"] == 16
    assert tuning._default_conv(key, 8192, split=False).blocks["BLOCK_R"] == 32


@pytest.mark.parametrize("window", [1, 0])
def test_dwconv_small_tiles_from_table(window: int) -> None:
    """Many tiles along channels and time, with a 54-frame halo: a 128-frame window tile emits 74 outputs."""
    channels, dilation, length = 5, 9, 176
    key = tuning.ShapeKey(tuning.DWCONV, BACKEND, channels, channels, 7, 1, dilation, tuning.t_bucket(length))
    tuning.TABLE[key] = tuning.LaunchConfig({"BLOCK_C": 2, "BLOCK_T": 128, "WINDOW": window}, num_warps=1)
    try:
        assert tuning.launch_config(tuning.DWCONV, device=DEVICE, c_in=channels, c_out=channels, kernel_size=7,
                                    stride=1, dilation=dilation, length=length).blocks["WINDOW"] == window
        ctx, x = rand(1, channels, 30), rand(1, channels, 200)
        w, b, a, a_out = rand(channels, 1, 7), rand(channels), alphas(channels), alphas(channels)
        kwargs = dict(alpha=a, dilation=dilation, context=ctx, alpha_out=a_out)
        out = poisoned(1, channels, length)
        snake_dwconv(x, w, b, out=out, **kwargs)
        assert_close(out, ref_dwconv(x, w, b, **kwargs))
    finally:
        del tuning.TABLE[key]


def test_dwconv_entries_tuned_on_many_rows_serve_batched_launches_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A depthwise entry tuned on an engine step (``many_rows``) serves launches of several rows; one-row
    launches keep the rule. A window whose halo does not fit is dropped, as for one-row entries. The launch
    stays exact, its contexts read through a row list."""
    channels, dilation, length = 6, 9, 150
    shape = dict(c_in=channels, c_out=channels, kernel_size=7, stride=1, dilation=dilation, length=length)
    key = tuning.ShapeKey(tuning.DWCONV, BACKEND, channels, channels, 7, 1, dilation, tuning.t_bucket(length), True)
    monkeypatch.setitem(tuning.TABLE, key, tuning.LaunchConfig({"BLOCK_C": 4, "BLOCK_T": 64, "WINDOW": 1}, 2))
    batched = tuning.launch_config(tuning.DWCONV, device=DEVICE, batch=3, **shape)
    assert batched.blocks == {"BLOCK_C": 4, "BLOCK_T": 64, "WINDOW": 0}  # 2 x 54 halo frames > 64
    assert batched.num_warps == 2
    assert tuning.launch_config(tuning.DWCONV, device=DEVICE, batch=1, **shape) == tuning._default(
        tuning.ShapeKey(*list(key.__dict__.values())[:-1]), length)
    from snac_stream.kernels import conv as conv_module

    calls = []
    original = tuning.launch_config
    monkeypatch.setattr(conv_module, "launch_config", lambda *a, **k: calls.append(k) or original(*a, **k))
    batch = rand(5, channels, 6 * dilation)  # the halo: as many outputs as new frames
    rows = torch.tensor([4, 0, 2], device=DEVICE)
    x, w, b = rand(3, channels, length), rand(channels, 1, 7), rand(channels)
    a, a_out = alphas(channels), alphas(channels)
    out = poisoned(3, channels, length)
    snake_dwconv(x, w, b, alpha=a, dilation=dilation, context=RowsOf(batch, rows), alpha_out=a_out, out=out)
    assert calls[-1]["batch"] == 3
    assert_close(out, ref_dwconv(x, w, b, alpha=a, dilation=dilation, context=batch[rows], alpha_out=a_out))


# (BLOCK_C, BLOCK_T, warps, reducing, dilation): every depthwise tiling the table hands out, on its entry's
# dilation, and one reducing and one plain tiling besides.
DWCONV_TILINGS = sorted(
    {(cfg.blocks["BLOCK_C"], cfg.blocks["BLOCK_T"], cfg.num_warps, key.c_out == 1, key.dilation)
     for key, cfg in tuning.TABLE.items() if key.kernel == tuning.DWCONV}
    | {(64, 64, 8, True, 1), (8, 256, 4, True, 1), (4, 512, 4, False, 9)})


@pytest.mark.parametrize("tiling", DWCONV_TILINGS, ids=lambda t: f"C{t[0]}-T{t[1]}-w{t[2]}"
                         + ("-reduce" if t[3] else "") + f"-d{t[4]}")
def test_every_depthwise_tiling_in_the_table_computes_the_conv(tiling, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each depthwise tiling of the table, forced onto a launch of several rows whose sizes no tile divides
    (masked channels and frames), computes the conv: the residual units' snake + depthwise conv + snake, their
    contexts read through a row list, and the decoder's last conv (its channels summed, a block of them at a
    time, then tanh)."""
    block_c, block_t, warps, reducing, dilation = tiling
    channels = 2 * block_c + 1  # a reducing launch's channel loop takes three steps, the last one masked
    halo = 6 * dilation
    length = 2 * block_t + 13
    cfg = tuning.LaunchConfig({"BLOCK_C": block_c, "BLOCK_T": block_t, "WINDOW": 1}, num_warps=warps)
    key = tuning.ShapeKey(tuning.DWCONV, BACKEND, channels, 1 if reducing else channels, 7, 1, dilation,
                          tuning.t_bucket(length), True)
    monkeypatch.setitem(tuning.TABLE, key, cfg)
    got = tuning.launch_config(tuning.DWCONV, device=DEVICE, c_in=channels, c_out=1 if reducing else channels,
                               kernel_size=7, stride=1, dilation=dilation, length=length, batch=3)
    assert (got.blocks["BLOCK_C"], got.blocks["BLOCK_T"], got.num_warps) == (block_c, block_t, warps)
    batch, rows = rand(4, channels, halo), torch.tensor([3, 1, 3], device=DEVICE)
    x, a = rand(3, channels, length), alphas(channels)
    if reducing:
        w, b = rand(1, channels, 7, scale=0.1), rand(1)
        out = poisoned(3, 1, length)
        # the last conv's context is gathered (its launch reads row lists only for the residual units')
        snake_conv(x, w, b, alpha=a, dilation=dilation, context=batch[rows], activation="tanh", out=out)
        want = ref_conv(x, w, b, alpha=a, dilation=dilation, context=batch[rows], activation="tanh")
    else:
        w, b, a_out = rand(channels, 1, 7), rand(channels), alphas(channels)
        out = poisoned(3, channels, length)
        snake_dwconv(x, w, b, alpha=a, dilation=dilation, context=RowsOf(batch, rows), alpha_out=a_out, out=out)
        want = ref_dwconv(x, w, b, alpha=a, dilation=dilation, context=batch[rows], alpha_out=a_out)
    assert_close(out, want)


def test_tuner_records_every_depthwise_launch_of_an_engine_step() -> None:
    """``bench/tune.py --kernels snake_dwconv`` sweeps the depthwise launches of one engine step: each residual
    unit's (every block's width and dilation), the decoder's depthwise first conv and its reducing last conv, keyed as ``launch_config``
    looks them up (``many_rows``). Each recorded launch runs again, writing all of its own output. Its
    candidates: 2K to 8K elements a tile for the plain launches, every channel in one tile for a reducing one."""
    from helpers import SMALL_CONFIGS, load_bench

    tune = load_bench("tune")
    config = SMALL_CONFIGS["24k_like"]
    calls = tune.record_calls([config], 1.0, engine_streams=2, device="cpu")
    depthwise = {key: rec for key, rec in calls.items() if key.kernel == tuning.DWCONV}
    widths = [config["decoder_dim"] // 2 ** (i + 1) for i in range(len(config["decoder_rates"]))]
    latent = config["encoder_dim"] * 2 ** len(config["encoder_rates"])  # the decoder's first conv: depthwise
    assert {(k.c_in, k.dilation) for k, rec in depthwise.items() if not rec.reduce} == {
        (w, d) for w in widths for d in (1, 3, 9)} | {(latent, 1)}
    reducing = [k for k, rec in depthwise.items() if rec.reduce]
    assert [(k.c_in, k.c_out, k.kernel_size) for k in reducing] == [(widths[-1], 1, 7)]
    assert all(k.many_rows and k.backend == "cuda" for k in depthwise)
    with torch.inference_mode():  # recorded there (the tuner's timing runs outside it)
        for rec in depthwise.values():  # the contexts in rows have moved on since: same launch, not same values
            rec.out.fill_(float("nan"))
            rec.run()
            assert torch.isfinite(rec.out).all()
    for channels, reduce in ((64, False), (128, False), (4, False), (61, True)):
        for cfg in tune.dwconv_candidates(channels, reduce):
            block_c, block_t = cfg.blocks["BLOCK_C"], cfg.blocks["BLOCK_T"]
            if reduce:  # every channel in one step at most
                assert 4 <= block_c <= 64 and 1024 <= block_c * block_t <= 8192
            else:
                assert block_c <= channels and 2048 <= block_c * block_t <= 8192
    assert {cfg.blocks["BLOCK_C"] for cfg in tune.dwconv_candidates(61, True)} == {4, 8, 16, 32, 64}
    plain = tune.dwconv_candidates(128, False)
    assert len(plain) == 28 and sum(cfg.blocks["WINDOW"] == 0 for cfg in plain) == 4


# ----------------------------------------------------------------------------------------------------------
# Real sizes on a GPU: fast sine and tf32x3 against torch fp32
# ----------------------------------------------------------------------------------------------------------

GPU_REL = 1e-4


@gpu
@needs_cuda
@pytest.mark.parametrize("dilation", [1, 3, 9])
def test_gpu_dwconv_real_size(dilation: int) -> None:
    channels, frames = 512, 65536
    x, w, b = rand(1, channels, frames), rand(channels, 1, 7, scale=0.4), rand(channels)
    a, a_out = alphas(channels), alphas(channels)
    out = poisoned(1, channels, frames)
    got = snake_dwconv(x, w, b, alpha=a, dilation=dilation, padding=3 * dilation, alpha_out=a_out, out=out)
    assert_close(got, ref_dwconv(x, w, b, alpha=a, dilation=dilation, padding=3 * dilation, alpha_out=a_out),
                 rel=GPU_REL)


@gpu
@needs_cuda
def test_gpu_fast_sin_error_large_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Range reduction keeps the hardware sine accurate where |alpha x| is far outside [-pi, pi]."""
    monkeypatch.delenv(common.PRECISE_SIN_ENV, raising=False)
    assert common.use_fast_sin(DEVICE)
    channels = 64
    x = torch.linspace(-300.0, 300.0, 8192, device=DEVICE).expand(1, channels, -1).contiguous()
    w = torch.ones(channels, 1, 1, device=DEVICE)
    a = alphas(channels)
    # Same fp32 rounding of alpha * x as the kernel, so what differs is the sine (about 1e-6 after reduction,
    # scaled by up to 2 / alpha in sin^2 / alpha) and the final rounding of x + sin^2 / alpha (an ulp of x).
    ref = snake(x, a)
    fast = snake_dwconv(x, w, None, alpha=a)
    torch.testing.assert_close(fast, ref, rtol=2.5e-7, atol=2e-5)
    monkeypatch.setenv(common.PRECISE_SIN_ENV, "1")
    precise = snake_dwconv(x, w, None, alpha=a)
    torch.testing.assert_close(precise, ref, rtol=2.5e-7, atol=2e-6)


@gpu
@needs_cuda
def test_gpu_pointwise_residual_real_size() -> None:
    channels, frames = 1024, 8192
    x, w, b = rand(1, channels, frames), rand(channels, channels, 1, scale=channels ** -0.5), rand(channels)
    skip, a = rand(1, channels, frames), alphas(channels)
    out = poisoned(1, channels, frames)
    got = snake_conv(x, w, b, alpha=a, residual=skip, out=out)
    assert_close(got, ref_conv(x, w, b, alpha=a, residual=skip), rel=GPU_REL)


@gpu
@needs_cuda
@pytest.mark.parametrize("c_in,stride", [(64, 2), (128, 3), (256, 8), (512, 8)])
def test_gpu_strided_real_size(c_in: int, stride: int) -> None:
    frames = 65536 // (c_in // 64)
    k, pad = 2 * stride, math.ceil(stride / 2)
    x, w, b, a = rand(1, c_in, frames), rand(2 * c_in, c_in, k, scale=(c_in * k) ** -0.5), rand(2 * c_in), alphas(c_in)
    got = snake_conv(x, w, b, alpha=a, stride=stride, padding=pad)
    assert_close(got, ref_conv(x, w, b, alpha=a, stride=stride, padding=pad), rel=GPU_REL)


@gpu
@needs_cuda
def test_gpu_first_and_last_convs_noise() -> None:
    frames = 1 << 18
    x1, w1, b1 = rand(1, 1, frames), rand(64, 1, 7, scale=0.3), rand(64)
    assert_close(snake_conv(x1, w1, b1, padding=3), ref_conv(x1, w1, b1, padding=3), rel=GPU_REL)
    x2, w2, b2, a2 = rand(1, 64, frames), rand(1, 64, 7, scale=0.05), rand(1), alphas(64)
    assert_close(snake_conv(x2, w2, b2, alpha=a2, padding=3, activation="tanh"),
                 ref_conv(x2, w2, b2, alpha=a2, padding=3, activation="tanh"), rel=GPU_REL)
    x3, w3 = rand(2, 768, 4096), rand(768, 768, 1, scale=768 ** -0.5)
    assert_close(snake_conv(x3, w3, residual=x3, noise_seed=2**40 + 3, noise_start=12345),
                 ref_conv(x3, w3, residual=x3, noise_seed=2**40 + 3, noise_start=12345), rel=GPU_REL)


@gpu
@needs_cuda
@pytest.mark.parametrize("channels,frames", [(512, 32), (256, 256), (128, 1024), (64, 2048)])
def test_gpu_rows_first_product_is_as_accurate_as_the_per_step_one(channels: int, frames: int) -> None:
    """The decoder's 1x1 convs at a 256-stream step's sizes (bias and skip add): the rows-first product keeps
    its three accumulators on the tensor cores over the whole reduction; its error against float64 stays
    within twice the per-step product's, and within the fp32 GEMM's (cuBLAS without tensor cores)."""
    from snac_stream.model.functional import _tf32_matmuls

    batch = 256
    x, skip = rand(batch, channels, frames), rand(batch, channels, frames)
    w, b = rand(channels, channels, 1, scale=channels ** -0.5), rand(channels)
    want = ref_conv(x.double(), w.double(), b.double(), residual=skip.double())
    errors = {}
    for rows_first in (False, True):
        got = snake_conv(x, w, b, residual=skip, rows_first=rows_first, out=poisoned(batch, channels, frames))
        errors[rows_first] = (got.double() - want).abs().max().item()
    with _tf32_matmuls(x.device, False):
        gemm = torch.baddbmm(skip + b.view(1, -1, 1), w[..., 0].expand(batch, channels, channels), x)
    errors["fp32 GEMM"] = (gemm.double() - want).abs().max().item()
    assert errors[True] <= 2 * errors[False] and errors[True] <= errors["fp32 GEMM"], errors


@gpu
@needs_cuda
def test_gpu_streaming_step_of_many_streams() -> None:
    """The launches of a batched streaming step (512 streams, a few to tens of frames each): the decoder's
    input 1x1 conv and a noise block (tiles spanning rows, per-row noise positions) and a dilated depthwise
    unit (short tiles)."""
    batch = 512
    x, w, b = rand(batch, 768, 4), rand(1024, 768, 1, scale=768 ** -0.5), rand(1024)
    assert_close(snake_conv(x, w, b), ref_conv(x, w, b), rel=GPU_REL)
    x, w = rand(batch, 512, 32), rand(512, 512, 1, scale=512 ** -0.5)
    starts = torch.arange(batch, device=DEVICE) * 1000 + 7
    got = snake_conv(x, w, residual=x, noise_seed=5, noise_start=starts)
    for row in (0, 1, 255, 511):
        one = x[row:row + 1]
        assert_close(got[row:row + 1], ref_conv(one, w, residual=one, noise_seed=5, noise_start=int(starts[row])),
                     rel=GPU_REL)
    ctx, x, w, b = rand(batch, 512, 54), rand(batch, 512, 32), rand(512, 1, 7, scale=0.4), rand(512)
    a, a_out = alphas(512), alphas(512)
    kwargs = dict(alpha=a, dilation=9, context=ctx, alpha_out=a_out)
    assert_close(snake_dwconv(x, w, b, **kwargs), ref_dwconv(x, w, b, **kwargs), rel=GPU_REL)


def test_short_depthwise_launches_get_short_tiles() -> None:
    """The CUDA rule gives a streaming step's depthwise launches (tens of frames) a time tile that covers the
    frames plus the halo, and more channels, instead of 512 mostly masked lanes; long launches keep 4 x 512."""
    def blocks(length: int, dilation: int) -> tuple:
        key = tuning.ShapeKey(tuning.DWCONV, "cuda", 512, 512, 7, 1, dilation, tuning.t_bucket(length))
        cfg = tuning._default(key, length)
        return cfg.blocks["BLOCK_C"], cfg.blocks["BLOCK_T"], cfg.blocks["WINDOW"]

    assert blocks(4, 1) == (64, 32, 1)
    assert blocks(32, 9) == (16, 128, 1)  # 32 outputs + 54 halo frames
    assert blocks(2048, 9) == (4, 512, 1)
    assert blocks(65536, 3) == (4, 1024, 1)


def test_small_launches_get_tiles_that_fill_the_gpu() -> None:
    """The CUDA rule for dense convs takes the smallest tiles on launches with too few programs for any other
    (one stream's streaming step), and at most one variant per fill tile exists, whatever the batch (each tile
    shape is a compilation)."""
    key = tuning.ShapeKey(tuning.CONV, "cuda", 512, 512, 1, 1, 1, tuning.t_bucket(32))
    big = tuning._default(key, 32, 1, 0)  # no fill wanted: the plain rule
    small = tuning._default(key, 32, 1, 264)
    assert (big.blocks["BLOCK_O"], big.blocks["BLOCK_T"]) == (128, 64)  # 4 programs
    assert (small.blocks["BLOCK_O"], small.blocks["BLOCK_T"]) == (16, 16)  # 64 programs
    assert small.blocks["BLOCK_R"] == big.blocks["BLOCK_R"]  # same summation order
    variants = {(cfg.blocks["BLOCK_O"], cfg.blocks["BLOCK_T"])
                for cfg in (tuning._default(key, 32, b, 264) for b in range(1, 300))}
    assert variants == {(128, 64), *tuning.FILL_TILES}
    assert tuning._default(key, 32, 512, 264) == big  # a launch that fills the GPU keeps the plain rule
