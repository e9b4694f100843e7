"""The upsampling's data-movement kernels (``snac_stream.kernels.upsampling``) against the PyTorch copies they
replace, and the transposed conv they serve on both backends.

Without CUDA the kernels run in Triton's CPU interpreter (``conftest.py``) on small shapes; the ``gpu`` test
repeats the comparison at a 2048-stream step's sizes with the fast sine.
"""

from __future__ import annotations

import math
import random
from typing import Optional

import pytest
import torch

from snac_stream.kernels.upsampling import channels_first, phase_pairs
from snac_stream.model.functional import (UPSAMPLING_PRODUCTS, conv_transpose, snake, use_backend,
                                          use_upsampling_product)
from snac_stream.streaming.ops import ConvTranspose

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def pairs_reference(x: torch.Tensor, context: Optional[torch.Tensor], alpha: Optional[torch.Tensor],
                    padding: int) -> torch.Tensor:
    """The rows as PyTorch builds them: snake, concatenation, padding, then the gather of frame pairs."""
    v = x if context is None else torch.cat([context, x], dim=-1)
    if alpha is not None:
        v = snake(v, alpha.view(1, -1, 1))
    v = torch.nn.functional.pad(v, (padding, padding))
    b, c, n = v.shape
    return v.unfold(-1, 2, 1).permute(0, 2, 3, 1).reshape(b * (n - 1), 2 * c)


@pytest.mark.parametrize("seed", range(6))
def test_phase_pairs_equal_the_copies_they_replace(seed: int) -> None:
    """Random shapes around the tiles' edges (rows of a few frames, channels past one block), with and without
    context, snake and padding; ``x`` also as a strided view."""
    gen = random.Random(seed)
    batch, channels = gen.randint(1, 5), gen.choice([3, 16, 70, 130])
    frames, held = gen.randint(1, 40), gen.choice([0, 1, 3])
    padding = gen.choice([0, 1, 2])
    x = torch.randn(batch, channels, frames + 2, device=DEVICE)[..., 1:-1]  # not contiguous in batch
    context = torch.randn(batch, channels, held, device=DEVICE) if held else None
    alpha = torch.rand(channels, device=DEVICE) * 4 + 0.05 if seed % 2 else None
    got = phase_pairs(x, context, alpha, padding)
    want = pairs_reference(x, context, alpha, padding)
    assert got.shape == want.shape == (batch * (held + frames + 2 * padding - 1), 2 * channels)
    # The snake's sine differs between the kernel and PyTorch in the last bits; the copies themselves are exact.
    torch.testing.assert_close(got, want, rtol=1e-6, atol=2e-6)
    if alpha is None:
        assert torch.equal(got, want)
    # One frame a row: the padded frames once, each stream's F + 1 of them frames-major; pair f is frames f, f + 1.
    single = phase_pairs(x, context, alpha, padding, taps=1)
    rows = held + frames + 2 * padding
    assert single.shape == (batch * rows, channels)
    assert torch.equal(single.view(batch, rows, channels)[:, 1:].reshape(-1, channels),
                       got.view(batch, rows - 1, 2, channels)[:, :, 1].reshape(-1, channels))
    assert torch.equal(single.view(batch, rows, channels)[:, :-1].reshape(-1, channels),
                       got.view(batch, rows - 1, 2, channels)[:, :, 0].reshape(-1, channels))


@pytest.mark.parametrize("seed", range(10))
def test_channels_first_puts_every_sample_where_the_transposition_does(seed: int) -> None:
    """Random streams, samples and channels around the tiles' edges (128 samples by 64 channels), any crop and
    length: the flat tiles run across streams."""
    gen = random.Random(100 + seed)
    batch, channels, samples = gen.randint(1, 4), gen.choice([1, 5, 64, 100]), gen.randint(1, 300)
    z = torch.randn(batch, samples, channels, device=DEVICE)
    crop = gen.randint(0, min(8, samples))
    length = gen.randint(0, samples - crop)
    got = channels_first(z, crop, length)
    assert got.is_contiguous() and got.shape == (batch, channels, length)
    assert torch.equal(got, z[:, crop:crop + length].transpose(1, 2))
    assert torch.equal(channels_first(z, crop), z[:, crop:].transpose(1, 2))


def test_bad_arguments_raise_clear_errors() -> None:
    z = torch.randn(2, 6, 8, device=DEVICE)
    with pytest.raises(ValueError, match="out of range"):
        channels_first(z, crop=1, length=6)
    with pytest.raises(ValueError, match="out of range"):
        channels_first(z, crop=-1)
    with pytest.raises(ValueError, match="3 dimensions|dimensions"):
        channels_first(z[0])
    x = torch.randn(2, 4, 5, device=DEVICE)
    with pytest.raises(ValueError, match="padding"):
        phase_pairs(x, padding=-1)
    with pytest.raises(ValueError, match="one value per channel"):
        phase_pairs(x, alpha=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="must agree in batch"):
        phase_pairs(x, torch.randn(1, 4, 1, device=DEVICE))
    with pytest.raises(ValueError, match="taps must be 1 or 2"):
        phase_pairs(x, taps=3)


@pytest.mark.parametrize("stride", [2, 3, 4, 8])
@pytest.mark.parametrize("backend,product,precision", [("torch", "cublas", "ieee"), ("triton", "cublas", "ieee"),
                                                       ("triton", "conv", "tf32x3"), ("triton", "conv_split", "tf32x3"),
                                                       ("triton", "rows", "tf32x3"), ("triton", "frames", "tf32x3")])
def test_transposed_conv_with_its_snake_streams_like_the_offline_layers(stride: int, backend: str, product: str,
                                                                       precision: str) -> None:
    """``Snake1d`` then ``ConvTranspose1d`` offline against the streaming op that folds the snake in, for a
    random chunk schedule, on both backends (the Triton one builds and places the product's rows in kernels),
    with each form of the Triton backend's product."""
    gen = random.Random(stride)
    torch.manual_seed(stride)
    layer = torch.nn.ConvTranspose1d(20, 9, 2 * stride, stride, padding=math.ceil(stride / 2),
                                     output_padding=stride % 2).to(DEVICE)
    alpha = (torch.rand(1, 20, 1) * 3 + 0.1).to(DEVICE)
    x = torch.randn(3, 20, 50, device=DEVICE)
    op = ConvTranspose(layer, alpha)
    pieces, start = [], 0
    with torch.no_grad(), use_backend(backend, precision), use_upsampling_product(product):
        want = layer(snake(x, alpha))
        state = op.init_state(3, x.device, x.dtype)
        while start < x.shape[-1]:
            n = gen.randint(1, 7)
            pieces.append(op.push(state, x[..., start:start + n]))
            start += n
        pieces.append(op.flush(state))
        assert torch.equal(state.context, x[..., -1:])  # the state keeps the frame before the snake
    torch.testing.assert_close(torch.cat(pieces, dim=-1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA (the interpreter tests above cover the same kernels)")
def test_gpu_upsampling_of_a_full_step_matches_torch() -> None:
    """The 24 kHz decoder's last upsampling at a 2048-stream step's size (128 -> 64 channels, stride 2, 1024
    frames a stream): the Triton rows and placement against the PyTorch copies, same product."""
    torch.manual_seed(0)
    layer = torch.nn.ConvTranspose1d(128, 64, 4, 2, padding=1).cuda()
    alpha = torch.rand(1, 128, 1, device="cuda") + 0.5
    x = torch.randn(2048, 128, 1024, device="cuda")
    context = torch.randn(2048, 128, 1, device="cuda")
    with torch.no_grad():
        results = {}
        for backend in ("torch", "triton"):
            with use_backend(backend, "ieee"):
                results[backend] = conv_transpose(x, layer.weight, layer.bias, stride=2, context=context, crop=1,
                                                  alpha=alpha)
    torch.testing.assert_close(results["triton"], results["torch"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("product,rows", [("rows", 4 * 7), ("frames", 4 * 8 - 1)])
def test_rows_product_of_more_rows_than_one_launch_spans(product: str, rows: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``rows`` product launches the dense kernel on at most ``_KERNEL_SPAN`` elements along its rows (int32
    offsets): more rows (a 44 kHz step of 1024 streams) go in several launches, with the same result. So does
    ``frames``, whose rows are one more a stream (the last row of all is not computed)."""
    from snac_stream.model import functional

    torch.manual_seed(5)
    layer = torch.nn.ConvTranspose1d(12, 5, 6, 3, padding=2).to(DEVICE)
    alpha = torch.rand(1, 12, 1, device=DEVICE) + 0.5
    x, context = torch.randn(4, 12, 7, device=DEVICE), torch.randn(4, 12, 1, device=DEVICE)
    launches = []
    from snac_stream.kernels import conv

    original = conv.snake_conv
    monkeypatch.setattr(conv, "snake_conv", lambda *a, **k: launches.append(a[0].shape[-1]) or original(*a, **k))
    with torch.no_grad(), use_backend("triton", "tf32x3"), use_upsampling_product(product):
        whole = conv_transpose(x, layer.weight, layer.bias, stride=3, context=context, alpha=alpha)
        monkeypatch.setattr(functional, "_KERNEL_SPAN", 24 * 5 + 1)  # 5 rows of 2 x 12 channels a launch
        chunked = conv_transpose(x, layer.weight, layer.bias, stride=3, context=context, alpha=alpha)
    assert launches == [rows] + [5] * (rows // 5) + [rows % 5]  # once whole, then 5 rows a launch
    assert torch.equal(chunked, whole)
    with use_backend("torch"):
        want = conv_transpose(x, layer.weight, layer.bias, stride=3, context=context, alpha=alpha)
    torch.testing.assert_close(whole, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_frames_product_equals_the_rows_product(seed: int) -> None:
    """``frames`` multiplies the same values in the same order as ``rows``, read from overlapping rows of single
    frames: the same output bit for bit, whatever the streams, frames, context, padding, crop and stride."""
    gen = random.Random(300 + seed)
    torch.manual_seed(seed)
    batch, c_in, c_out, stride = gen.randint(1, 5), gen.choice([4, 20, 40]), gen.choice([1, 3, 7]), gen.choice([2, 3, 8])
    frames, held, padding = gen.randint(1, 9), gen.choice([0, 1, 2]), gen.choice([0, 1])
    weight = torch.randn(c_in, c_out, 2 * stride, device=DEVICE)
    bias = torch.randn(c_out, device=DEVICE) if seed % 2 else None
    alpha = torch.rand(1, c_in, 1, device=DEVICE) + 0.5 if seed != 2 else None
    x = torch.randn(batch, c_in, frames, device=DEVICE)
    context = torch.randn(batch, c_in, held, device=DEVICE) if held else None
    samples = (held + frames + 2 * padding - 1) * stride
    crop = gen.randint(0, min(stride, samples))
    length = max(0, samples - crop - gen.randint(0, 1) * stride)
    got = {}
    with torch.no_grad(), use_backend("triton", "tf32x3"):
        for product in ("rows", "frames"):
            with use_upsampling_product(product):
                got[product] = conv_transpose(x, weight, bias, stride=stride, padding=padding, context=context,
                                              crop=crop, length=length, alpha=alpha)
    assert got["rows"].shape == (batch, c_out, length)
    assert torch.equal(got["frames"], got["rows"])


@pytest.mark.parametrize("backend,product", [("torch", "cublas"), ("triton", "cublas"), ("triton", "conv"),
                                             ("triton", "conv_split"), ("triton", "rows"), ("triton", "frames")])
def test_channels_last_samples_are_the_product_rows_as_they_lie(backend: str, product: str) -> None:
    """``channels_last=True`` returns the same samples, bit for bit, without the pass that writes them
    channels-first: on the Triton backend a view of the product's rows (channel stride 1, time stride C_out),
    cropped at both ends, the ``frames`` form's extra row a stream left out."""
    torch.manual_seed(7)
    batch, c_in, c_out, stride = 3, 12, 5, 4
    weight = torch.randn(c_in, c_out, 2 * stride, device=DEVICE)
    bias, alpha = torch.randn(c_out, device=DEVICE), torch.rand(1, c_in, 1, device=DEVICE) + 0.5
    x, context = torch.randn(batch, c_in, 6, device=DEVICE), torch.randn(batch, c_in, 1, device=DEVICE)
    with torch.no_grad(), use_backend(backend, "tf32x3"), use_upsampling_product(product):
        placed = conv_transpose(x, weight, bias, stride=stride, context=context, crop=2, length=21, alpha=alpha)
        lying = conv_transpose(x, weight, bias, stride=stride, context=context, crop=2, length=21, alpha=alpha,
                               channels_last=True)
    assert placed.is_contiguous() and placed.shape == lying.shape == (batch, c_out, 21)
    assert torch.equal(lying, placed)
    if backend == "triton":
        row_samples = (6 + int(product == "frames")) * stride  # 6 frame pairs, and the frames form's extra row
        assert lying.stride() == (row_samples * c_out, 1, c_out)


@pytest.mark.parametrize("batch,c_in,frames,precision,dense,taps",
                         [(2, 256, 3, "tf32x3", True, 2), (3, 512, 3, "tf32x3", True, 2),
                          (2, 128, 3, "tf32x3", True, 2), (2, 1024, 3, "tf32x3", True, 2),
                          (2, 16, 63, "tf32x3", True, 2), (2, 16, 64, "tf32x3", True, 1),
                          (1, 256, 3, "tf32x3", False, 2), (1, 16, 64, "tf32x3", False, 2),
                          (2, 256, 3, "ieee", False, 2), (2, 16, 64, "ieee", False, 2)])
def test_auto_product_takes_the_dense_kernel_where_it_was_measured_faster(batch: int, c_in: int, frames: int,
                                                                         precision: str, dense: bool, taps: int,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The default product form, ``auto``: for tf32x3 launches of several rows, the dense-conv kernel on the
    built rows (a 1x1 conv of 2 C_in channels over them, split in registers), read from rows of single frames
    where a stream has 64 frame pairs or more; the cuBLAS product of built rows otherwise; the same output
    either way."""
    from snac_stream.kernels import conv, upsampling

    taken = []

    def recording(name: str, original):
        def call(*args, **kwargs):
            taken.append((name, kwargs.get("split"), kwargs.get("taps", 2)))
            return original(*args, **kwargs)
        return call

    for module, name in ((conv, "snake_conv"), (upsampling, "phase_pairs")):
        monkeypatch.setattr(module, name, recording(name, getattr(module, name)))
    torch.manual_seed(c_in)
    layer = torch.nn.ConvTranspose1d(c_in, 3, 4, 2, padding=1).to(DEVICE)
    alpha = torch.rand(1, c_in, 1, device=DEVICE) + 0.5
    x = torch.randn(batch, c_in, frames, device=DEVICE)  # frames pairs a stream, with the context frame
    context = torch.randn(batch, c_in, 1, device=DEVICE)
    with torch.no_grad():
        with use_backend("triton", precision):
            got = conv_transpose(x, layer.weight, layer.bias, stride=2, context=context, alpha=alpha)
        with use_backend("torch"):
            want = conv_transpose(x, layer.weight, layer.bias, stride=2, context=context, alpha=alpha)
    assert taken == ([("phase_pairs", None, taps), ("snake_conv", False, 2)] if dense
                     else [("phase_pairs", None, 2)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA (the interpreter tests above run every product form)")
@pytest.mark.parametrize("c_in,c_out,stride,frames", [(1024, 512, 8, 4), (512, 256, 8, 32), (256, 128, 4, 256),
                                                      (128, 64, 2, 1024)])
def test_gpu_upsampling_products_are_as_accurate_as_fp32(c_in: int, c_out: int, stride: int, frames: int) -> None:
    """The 24 kHz decoder's four upsamplings at a 256-stream step's sizes, in tf32x3: each product form's
    error against float64 is at most twice the cuBLAS fp32 product's (tensor-core accumulation that loses
    accuracy fails this), and every form agrees with PyTorch within 1e-4."""
    torch.manual_seed(0)
    weight = torch.randn(c_in, c_out, 2 * stride, device="cuda") / (2 * c_in) ** 0.5
    bias = torch.randn(c_out, device="cuda")
    alpha = torch.rand(1, c_in, 1, device="cuda") + 0.5
    x = torch.randn(256, c_in, frames, device="cuda")
    context = torch.randn(256, c_in, 1, device="cuda")
    with torch.no_grad():
        with use_backend("torch"):
            want = conv_transpose(x.double(), weight.double(), bias.double(), stride=stride,
                                  context=context.double(), alpha=alpha.double())
        errors = {}
        for product in UPSAMPLING_PRODUCTS:
            with use_backend("triton", "tf32x3"), use_upsampling_product(product):
                got = conv_transpose(x, weight, bias, stride=stride, context=context, alpha=alpha)
            errors[product] = (got.double() - want).abs().max().item()
            assert errors[product] <= 1e-4 * want.abs().max().item(), (product, errors)
    for product in UPSAMPLING_PRODUCTS:
        assert errors[product] <= 2 * errors["cublas"], errors
