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

from snac_stream.kernels.precision import tf32_split
from snac_stream.kernels.upsampling import phase_pairs, place_phases
from snac_stream.model import functional
from snac_stream.model.functional import (conv_transpose, phase_weight, snake, split_phase_weight,
                                          split_upsampling, use_backend)
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


@pytest.mark.parametrize("seed", range(4))
def test_split_phase_pairs_are_the_rows_high_parts_and_rests(seed: int) -> None:
    """``split=True`` writes each row as ``[hi, lo, hi]``: ``hi`` exact in tf32 (13 low mantissa bits clear),
    ``hi + lo`` the unsplit row bit for bit, ``lo`` far below ``hi``."""
    gen = random.Random(50 + seed)
    batch, channels, frames = gen.randint(1, 4), gen.choice([3, 16, 70]), gen.randint(1, 30)
    held, padding = gen.choice([0, 1]), gen.choice([0, 1])
    x = torch.randn(batch, channels, frames, device=DEVICE) * 10
    context = torch.randn(batch, channels, held, device=DEVICE) if held else None
    alpha = torch.rand(channels, device=DEVICE) * 4 + 0.05 if seed % 2 else None
    rows = phase_pairs(x, context, alpha, padding)
    split = phase_pairs(x, context, alpha, padding, split=True)
    assert split.shape == (rows.shape[0], 3 * rows.shape[1])
    hi, lo, hi_again = split.split(rows.shape[1], dim=1)
    assert torch.equal(hi, hi_again)
    assert torch.equal(hi + lo, rows)
    assert (hi.view(torch.int32) & 0x1FFF).eq(0).all()
    want_hi, want_lo = tf32_split(rows)
    assert torch.equal(hi, want_hi) and torch.equal(lo, want_lo)
    assert (lo.abs() <= hi.abs() * 2.0**-11).all()


def test_split_weight_against_split_rows_is_a_tf32x3_product() -> None:
    """``split_phase_weight`` is ``[w_hi; w_hi; w_lo]`` of the phase weight, and split rows times it equal the
    fp32 product to about fp32's own rounding (the dropped ``lo @ w_lo`` is ~2^-22 of it)."""
    torch.manual_seed(3)
    weight = torch.randn(40, 24, 8, device=DEVICE)  # (C_in, C_out, 2s), s = 4
    w = phase_weight(weight).view(24 * 4, 80).t()
    split = split_phase_weight(weight)
    hi, lo = tf32_split(w)
    assert torch.equal(split, torch.cat([hi, hi, lo]))
    x = torch.randn(2, 40, 9, device=DEVICE)
    rows = phase_pairs(x, padding=1)
    want = rows.double() @ w.double()
    got = phase_pairs(x, padding=1, split=True) @ split
    fp32 = rows @ w
    assert (got.double() - want).abs().max() <= 4 * (fp32.double() - want).abs().max() + 1e-6


def test_only_wide_upsampling_products_take_split_operands() -> None:
    assert split_upsampling(functional.SPLIT_MIN_COLUMNS)
    assert not split_upsampling(functional.SPLIT_MIN_COLUMNS - 1)


@pytest.mark.parametrize("seed", range(10))
def test_place_phases_puts_every_sample_where_the_permutation_does(seed: int) -> None:
    gen = random.Random(100 + seed)
    batch, c_out, stride, frames = gen.randint(1, 4), gen.choice([1, 5, 64, 100]), gen.choice([2, 3, 4, 7, 8]), \
        gen.randint(1, 70)
    z = torch.randn(batch * frames, c_out * stride, device=DEVICE)
    samples = frames * stride
    crop = gen.randint(0, min(stride, samples))
    length = gen.randint(0, samples - crop)
    got = place_phases(z, batch, stride, crop, length)
    want = z.view(batch, frames, c_out, stride).permute(0, 2, 1, 3).reshape(batch, c_out, samples)
    assert got.is_contiguous()
    assert torch.equal(got, want[..., crop:crop + length])
    assert torch.equal(place_phases(z, batch, stride, crop), want[..., crop:])


def test_bad_arguments_raise_clear_errors() -> None:
    z = torch.randn(6, 8, device=DEVICE)
    with pytest.raises(ValueError, match="out of range"):
        place_phases(z, 2, 2, crop=1, length=12)
    with pytest.raises(ValueError, match="whole 3-sample phases"):
        place_phases(z, 2, 3)
    with pytest.raises(ValueError, match="does not hold 4 rows"):
        place_phases(z, 4, 2)
    x = torch.randn(2, 4, 5, device=DEVICE)
    with pytest.raises(ValueError, match="padding"):
        phase_pairs(x, padding=-1)
    with pytest.raises(ValueError, match="one value per channel"):
        phase_pairs(x, alpha=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="must agree in batch"):
        phase_pairs(x, torch.randn(1, 4, 1, device=DEVICE))


@pytest.mark.parametrize("stride", [2, 3, 4, 8])
@pytest.mark.parametrize("backend, precision", [("torch", "ieee"), ("triton", "ieee"), ("triton", "tf32x3")])
def test_transposed_conv_with_its_snake_streams_like_the_offline_layers(stride: int, backend: str, precision: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``Snake1d`` then ``ConvTranspose1d`` offline against the streaming op that folds the snake in, for a
    random chunk schedule, on both backends (the Triton one builds and places the product's rows in kernels;
    at tf32x3, on split operands: the layer is narrow, so the threshold is lowered for it)."""
    monkeypatch.setattr(functional, "SPLIT_MIN_COLUMNS", 1)
    calls = []
    monkeypatch.setattr("snac_stream.kernels.upsampling.phase_pairs",
                        lambda *a, _f=phase_pairs, **k: calls.append(k.get("split")) or _f(*a, **k))
    gen = random.Random(stride)
    torch.manual_seed(stride)
    layer = torch.nn.ConvTranspose1d(20, 9, 2 * stride, stride, padding=math.ceil(stride / 2),
                                     output_padding=stride % 2).to(DEVICE)
    alpha = (torch.rand(1, 20, 1) * 3 + 0.1).to(DEVICE)
    x = torch.randn(3, 20, 50, device=DEVICE)
    op = ConvTranspose(layer, alpha)
    pieces, start = [], 0
    with torch.no_grad(), use_backend(backend, precision):
        want = layer(snake(x, alpha))
        state = op.init_state(3, x.device, x.dtype)
        while start < x.shape[-1]:
            n = gen.randint(1, 7)
            pieces.append(op.push(state, x[..., start:start + n]))
            start += n
        pieces.append(op.flush(state))
        assert torch.equal(state.context, x[..., -1:])  # the state keeps the frame before the snake
    torch.testing.assert_close(torch.cat(pieces, dim=-1), want, rtol=1e-5, atol=1e-5)
    assert set(calls) == (set() if backend == "torch" else {precision == "tf32x3"})


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


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA (the interpreter tests above cover the split rows and weights)")
@pytest.mark.parametrize("c_in, c_out, stride, frames", [(256, 128, 4, 256), (1024, 512, 8, 4)])
def test_gpu_split_upsampling_is_as_accurate_as_fp32(c_in: int, c_out: int, stride: int, frames: int) -> None:
    """A 2048-stream step's wide upsamplings at tf32x3 (split rows, one TF32 tensor-core product) against the
    same layer in float64: an error of the fp32 GEMM's order, far below one TF32 product's."""
    torch.manual_seed(1)
    assert split_upsampling(c_out * stride)
    layer = torch.nn.ConvTranspose1d(c_in, c_out, 2 * stride, stride, padding=stride // 2).cuda()
    alpha = torch.rand(1, c_in, 1, device="cuda") + 0.5
    x = torch.randn(2048, c_in, frames, device="cuda")
    context = torch.randn(2048, c_in, 1, device="cuda")
    with torch.no_grad():
        want = conv_transpose(x.double(), layer.weight.double(), layer.bias.double(), stride=stride,
                              context=context.double(), crop=stride // 2, alpha=alpha.double())
        errors = {}
        for precision in ("ieee", "tf32x3", "tf32"):
            with use_backend("triton", precision):
                got = conv_transpose(x, layer.weight, layer.bias, stride=stride, context=context,
                                     crop=stride // 2, alpha=alpha)
            errors[precision] = (got.double() - want).abs().max().item()
    assert errors["tf32x3"] <= 4 * errors["ieee"], errors
    assert errors["tf32x3"] * 20 < errors["tf32"], errors
