"""Fused codebook kernels (snac_stream.kernels.codebook) against the torch quantizer in snac_stream.model.vq.

Without CUDA the kernels run under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1) at small sizes;
with CUDA the same tests run on the GPU, and the ``gpu`` tests add the real sizes (T = 65,536 frames).
References are computed on the same device in plain fp32 (TF32 off).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

import snac_stream.kernels.codebook as cbk
from snac_stream.kernels.codebook import (
    LookupConfig,
    NearestConfig,
    codebook_lookup,
    codebook_nearest,
    lookup_config,
)
from snac_stream.kernels.common import interpreting, output_buffer
from snac_stream.kernels.precision import DEFAULT_PRECISION, PRECISIONS
from snac_stream.model.functional import use_backend
from snac_stream.model.vq import ResidualVectorQuantize, VectorQuantize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU; the CPU tests in this file run the same kernels under Triton's interpreter",
)


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh kernel outputs start as NaN (float) or -1 (int), so an unwritten element shows up."""

    def alloc(out: Optional[torch.Tensor], shape: Tuple[int, ...], device: torch.device,
              dtype: torch.dtype = torch.float32, **inputs: Optional[torch.Tensor]) -> torch.Tensor:
        if out is not None:
            return output_buffer(out, shape, device, dtype, **inputs)
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(cbk, "output_buffer", alloc)


def _quantizer(D: int, N: int, d: int, seed: int, stride: int = 1) -> VectorQuantize:
    torch.manual_seed(seed)
    return VectorQuantize(D, N, d, stride).to(DEVICE).eval()


def _randn(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE)


def _nearest_args(vq: VectorQuantize) -> Tuple[torch.Tensor, ...]:
    return vq.in_proj.weight, vq.in_proj.bias, F.normalize(vq.codebook.weight)


# ------------------------------------------------------------------------------------------------------------
# codebook_nearest
# ------------------------------------------------------------------------------------------------------------

SMALL_BLOCKS = NearestConfig(block_t=16, block_k=16, block_n=32)  # many T tiles, K steps and N chunks


@pytest.mark.parametrize(
    "B, D, T, N, d, config",
    [
        (1, 16, 37, 50, 8, None),
        (2, 64, 300, 1000, 8, None),  # T and N not powers of two: masked tails
        (2, 768, 200, 4096, 8, None),  # the real D and N
        (1, 40, 50, 100, 8, SMALL_BLOCKS),  # T, D, N all off the block sizes, several chunks each
        (3, 24, 129, 77, 4, None),  # d < 8
        (1, 32, 70, 300, 16, SMALL_BLOCKS),  # d already 16, no padding
    ],
)
@pytest.mark.usefixtures("poisoned")
def test_nearest_matches_reference(B: int, D: int, T: int, N: int, d: int, config: NearestConfig) -> None:
    vq = _quantizer(D, N, d, seed=B * 1000 + T)
    z = _randn(B, D, T, seed=T)
    with torch.no_grad():
        z_e_ref = vq.in_proj(z)
        idx_ref = vq.nearest(z_e_ref)

    idx, z_e = codebook_nearest(z, *_nearest_args(vq), return_projection=True, config=config)
    assert idx.dtype == torch.int64 and idx.shape == (B, T)
    assert torch.equal(idx, idx_ref), f"{(idx != idx_ref).sum().item()} of {idx.numel()} codes differ"
    assert z_e.shape == (B, d, T)
    torch.testing.assert_close(z_e, z_e_ref, rtol=0, atol=1e-5)
    # Without the projection, given squared norms, with both distance paths (fp32 FMA and tl.dot).
    cb_unit = F.normalize(vq.codebook.weight)
    for precision in ("ieee", "tf32x3"):
        idx2 = codebook_nearest(z, vq.in_proj.weight[..., 0], vq.in_proj.bias, cb_unit, cb_unit.pow(2).sum(1),
                                precision=precision, config=config)
        assert torch.equal(idx2, idx_ref), precision


def test_nearest_strided_input() -> None:
    """Non-contiguous latents, here time-major storage viewed as (B, D, T), need no copy to be right."""
    B, D, T, N, d = 2, 48, 90, 200, 8
    vq = _quantizer(D, N, d, seed=5)
    z = _randn(B, T, D, seed=6).transpose(1, 2)
    with torch.no_grad():
        idx_ref = vq.nearest(vq.in_proj(z))
    assert torch.equal(codebook_nearest(z, *_nearest_args(vq)), idx_ref)


@pytest.mark.parametrize("layout", ["blocks", "interleaved"])
@pytest.mark.parametrize("config", [None, SMALL_BLOCKS])
def test_nearest_ties_take_lowest_index(layout: str, config: NearestConfig) -> None:
    """Duplicated codebook rows tie exactly; like torch's max, the lowest index wins, within a chunk of
    BLOCK_N entries (interleaved copies) and across chunks (copies 40 entries apart)."""
    D, d, base = 32, 8, 40
    vq = _quantizer(D, base * 3, d, seed=11)
    rows = _randn(base, d, seed=12)
    with torch.no_grad():
        vq.codebook.weight.copy_(rows.repeat(3, 1) if layout == "blocks" else rows.repeat_interleave(3, 0))
    z = _randn(2, D, 75, seed=13)
    with torch.no_grad():
        idx_ref = vq.nearest(vq.in_proj(z))
    idx = codebook_nearest(z, *_nearest_args(vq), config=config)
    assert torch.equal(idx, idx_ref)
    first_copy = idx_ref < base if layout == "blocks" else idx_ref % 3 == 0
    assert bool(first_copy.all())


def test_nearest_zero_frames() -> None:
    """An all-zero projection normalises to zero (F.normalize's eps), leaving dist = |c|^2: same code as torch."""
    D, N, d = 16, 64, 8
    vq = _quantizer(D, N, d, seed=21)
    with torch.no_grad():
        vq.in_proj.bias.zero_()
    z = _randn(1, D, 20, seed=22)
    z[..., ::3] = 0.0
    with torch.no_grad():
        idx_ref = vq.nearest(vq.in_proj(z))
    assert torch.equal(codebook_nearest(z, *_nearest_args(vq)), idx_ref)


def test_nearest_empty() -> None:
    vq = _quantizer(16, 32, 8, seed=0)
    idx, z_e = codebook_nearest(torch.zeros(2, 16, 0, device=DEVICE), *_nearest_args(vq), return_projection=True)
    assert idx.shape == (2, 0) and z_e.shape == (2, 8, 0)


# ------------------------------------------------------------------------------------------------------------
# codebook_lookup
# ------------------------------------------------------------------------------------------------------------


def _lookup_reference(vq: VectorQuantize, idx: torch.Tensor, repeat: int,
                      z_e: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out_proj(z_e + (cb[idx] - z_e)) or out_proj(cb[idx]), repeated over time: (B, D, T * repeat)."""
    with torch.no_grad():
        z_q = vq.decode_code(idx)
        if z_e is not None:
            z_q = z_e + (z_q - z_e)
        return vq.out_proj(z_q).repeat_interleave(repeat, dim=-1)


@pytest.mark.parametrize("repeat", [1, 2, 3, 8])
@pytest.mark.parametrize("straight_through", [False, True])
@pytest.mark.usefixtures("poisoned")
def test_lookup_matches_reference(repeat: int, straight_through: bool) -> None:
    B, D, T, N, d = 2, 96, 45, 300, 8
    vq = _quantizer(D, N, d, seed=31 + repeat)
    idx = torch.randint(0, N, (B, T), generator=torch.Generator().manual_seed(repeat)).to(DEVICE)
    z_e = _randn(B, d, T, seed=32) if straight_through else None
    ref = _lookup_reference(vq, idx, repeat, z_e)

    out = codebook_lookup(idx, vq.codebook.weight, vq.out_proj.weight, vq.out_proj.bias, repeat=repeat, z_e=z_e)
    assert out.shape == (B, D, T * repeat) and out.dtype == torch.float32
    assert not out.isnan().any(), "unwritten output elements"
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)

    # Small tiles: many programs along both time and channels, masked tails on both.
    out_small = codebook_lookup(idx.int(), vq.codebook.weight, vq.out_proj.weight[..., 0], vq.out_proj.bias,
                                repeat=repeat, z_e=z_e, config=LookupConfig(block_o=64, block_c=64))
    torch.testing.assert_close(out_small, ref, rtol=0, atol=1e-5)


def test_lookup_tiles_of_an_engine_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine step looks up a few latent frames per stream (4 at 24 kHz): the CUDA rule gives such rows
    tiles of their own length and many channels, not 256-frame tiles of which 4 lanes are used; long rows keep
    256 x 16. The short tiles compute the lookup, with a repeat and accumulating."""
    from snac_stream.kernels import codebook

    monkeypatch.setattr(codebook, "interpreting", lambda: False)
    assert lookup_config(4, 768) == LookupConfig(block_o=4, block_c=1024)
    assert lookup_config(32, 1536) == LookupConfig(block_o=32, block_c=128)
    assert lookup_config(65536, 768) == LookupConfig(block_o=256, block_c=16)
    monkeypatch.undo()
    B, D, N, d = 5, 96, 300, 8
    vq = _quantizer(D, N, d, seed=51)
    for t, repeat in ((1, 4), (2, 2), (4, 1)):
        idx = torch.randint(0, N, (B, t), generator=torch.Generator().manual_seed(t)).to(DEVICE)
        base = _randn(B, D, 4, seed=52)
        out = base.clone()
        codebook_lookup(idx, vq.codebook.weight, vq.out_proj.weight, vq.out_proj.bias, repeat=repeat, out=out,
                        config=LookupConfig(block_o=4, block_c=128))
        torch.testing.assert_close(out, base + _lookup_reference(vq, idx, repeat, None), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_lookup_accumulates_in_place(sign: float) -> None:
    """out += sign * result into a strided view of a larger buffer; elements outside the view untouched."""
    B, D, T, N, d, repeat = 2, 40, 33, 128, 8, 4
    vq = _quantizer(D, N, d, seed=41)
    idx = torch.randint(0, N, (B, T), generator=torch.Generator().manual_seed(42)).to(DEVICE)
    z_e = _randn(B, d, T, seed=43)
    big = _randn(B, D + 3, T * repeat + 10, seed=44)
    before = big.clone()
    view = big[:, 1:D + 1, 5:5 + T * repeat]

    got = codebook_lookup(idx, vq.codebook.weight, vq.out_proj.weight, vq.out_proj.bias, repeat=repeat,
                          z_e=z_e, out=view, sign=sign)
    assert got is view
    expected = before[:, 1:D + 1, 5:5 + T * repeat] + sign * _lookup_reference(vq, idx, repeat, z_e)
    torch.testing.assert_close(view, expected, rtol=0, atol=1e-5)
    mask = torch.ones_like(big, dtype=torch.bool)
    mask[:, 1:D + 1, 5:5 + T * repeat] = False
    assert torch.equal(big[mask], before[mask])


# ------------------------------------------------------------------------------------------------------------
# Whole residual quantizer
# ------------------------------------------------------------------------------------------------------------


def _kernel_rvq_encode(rvq: ResidualVectorQuantize, z: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """The module's forward loop on the kernels: returns (codes per level, final residual)."""
    residual = z.clone()
    codes = []
    for q in rvq.quantizers:
        pooled = F.avg_pool1d(residual, q.stride, q.stride) if q.stride > 1 else residual
        idx, z_e = codebook_nearest(pooled, q.in_proj.weight, q.in_proj.bias, F.normalize(q.codebook.weight),
                                    return_projection=True)
        # residual -= out_proj(z_e + (z_q - z_e)) repeated over the stride, in place.
        codebook_lookup(idx, q.codebook.weight, q.out_proj.weight, q.out_proj.bias, repeat=q.stride, z_e=z_e,
                        out=residual, sign=-1.0, check_range=False)
        codes.append(idx)
    return codes, residual


@pytest.mark.parametrize("strides", [[4, 2, 1], [8, 4, 2, 1]])
def test_residual_quantizer_encode_decode(strides: List[int]) -> None:
    B, D, N, d, T = 2, 128, 512, 8, 96
    torch.manual_seed(51)
    rvq = ResidualVectorQuantize(D, N, d, strides).to(DEVICE).eval()
    z = _randn(B, D, T, seed=52)
    with torch.no_grad():
        z_q_ref, codes_ref = rvq(z)
        decoded_ref = rvq.from_codes(codes_ref)

    codes, residual = _kernel_rvq_encode(rvq, z)
    for level, (got, ref) in enumerate(zip(codes, codes_ref)):
        assert torch.equal(got, ref), f"level {level}: {(got != ref).sum().item()} of {ref.numel()} codes differ"
    torch.testing.assert_close(residual, z - z_q_ref, rtol=0, atol=1e-5)

    decoded = torch.zeros(B, D, T, device=DEVICE)
    for q, idx in zip(rvq.quantizers, codes):
        codebook_lookup(idx, q.codebook.weight, q.out_proj.weight, q.out_proj.bias, repeat=q.stride, out=decoded)
    torch.testing.assert_close(decoded, decoded_ref, rtol=0, atol=1e-5)


class _LaunchSpy:
    """Stands in for a kernel: records each launch's compile-time arguments, then launches the kernel."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_backend_precision_reaches_the_nearest_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The quantizer's search launches with the precision of ``use_backend`` (the model's ``precision``);
    the default is DEFAULT_PRECISION. The codes match the reference except with plain tf32 on a GPU (under the
    interpreter every product is fp32)."""
    spy = _LaunchSpy(cbk._nearest_kernel)
    monkeypatch.setattr(cbk, "_nearest_kernel", spy)
    torch.manual_seed(71)
    rvq = ResidualVectorQuantize(32, 64, 8, [2, 1]).to(DEVICE).eval()
    z = _randn(2, 32, 24, seed=72)
    with torch.no_grad():
        _, codes_ref = rvq(z)
        for precision in (None, *PRECISIONS):
            spy.launches.clear()
            with use_backend("triton", *(() if precision is None else (precision,))):
                _, codes = rvq(z)
            assert [k["PRECISION"] for k in spy.launches] == [precision or DEFAULT_PRECISION] * 2
            if precision != "tf32" or interpreting():
                assert all(torch.equal(a, b) for a, b in zip(codes, codes_ref)), precision


# ------------------------------------------------------------------------------------------------------------
# Input validation
# ------------------------------------------------------------------------------------------------------------


def _bad_nearest_cases() -> list:
    D, N, d = 16, 32, 8
    z = torch.randn(1, D, 10)
    w, b, cb = torch.randn(d, D), torch.randn(d), F.normalize(torch.randn(N, d))
    return [
        ((z[0], w, b, cb), {}, ValueError, "z must be 3-D"),
        ((z.double(), w, b, cb), {}, TypeError, "z must be float32"),
        (([1.0], w, b, cb), {}, TypeError, "z must be a torch.Tensor"),
        ((z, torch.randn(d, D + 1), b, cb), {}, ValueError, r"in_weight must have shape \(8, 16\)"),
        ((z, torch.randn(d, D, 3), b, cb), {}, ValueError, "kernel size 1"),
        ((z, w, torch.randn(d + 1), cb), {}, ValueError, "in_bias must have shape"),
        ((z, w, b, cb.long()), {}, TypeError, "codebook_unit must be float32"),
        ((z, w, b, torch.empty(0, d)), {}, ValueError, "codebook_unit must be non-empty"),
        ((z, w, b, cb, torch.ones(N + 1)), {}, ValueError, "codebook_sqnorm must have shape"),
        ((z, w, b, cb), {"precision": "fp16"}, ValueError, "precision must be one of"),
        ((z, w, b, cb.to("meta")), {}, ValueError, "must share a device"),
        ((z, w, b, cb), {"config": NearestConfig(8, 16, 16)}, ValueError, "block_t must be a power of two >= 16"),
    ]


@pytest.mark.parametrize("args, kwargs, exc, match", _bad_nearest_cases())
def test_nearest_rejects_bad_inputs(args: tuple, kwargs: dict, exc: type, match: str) -> None:
    args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) and a.device.type != "meta" else a for a in args)
    with pytest.raises(exc, match=match):
        codebook_nearest(*args, **kwargs)


def _bad_lookup_cases() -> list:
    B, D, T, N, d = 1, 16, 10, 32, 8
    idx = torch.randint(0, N, (B, T))
    cb, w, b = torch.randn(N, d), torch.randn(D, d), torch.randn(D)
    return [
        ((idx.float(), cb, w, b), {}, TypeError, "indices must be int64 or int32"),
        ((idx[0], cb, w, b), {}, ValueError, "indices must be 2-D"),
        ((torch.full((B, T), N), cb, w, b), {}, ValueError, r"indices must lie in \[0, 32\)"),
        ((torch.full((B, T), -1), cb, w, b), {}, ValueError, r"indices must lie in \[0, 32\)"),
        ((idx, cb, torch.randn(D, d + 1), b), {}, ValueError, r"out_weight must have shape \(16, 8\)"),
        ((idx, cb, w, torch.randn(D + 1)), {}, ValueError, "out_bias must have shape"),
        ((idx, cb.half(), w, b), {}, TypeError, "codebook must be float32"),
        ((idx, cb, w, b), {"repeat": 0}, ValueError, "repeat must be a positive int"),
        ((idx, cb, w, b), {"repeat": 2.0}, ValueError, "repeat must be a positive int"),
        ((idx, cb, w, b), {"z_e": torch.randn(B, d, T + 1)}, ValueError, "z_e must have shape"),
        ((idx, cb, w, b), {"out": torch.zeros(B, D, T * 2)}, ValueError, "out must have shape"),
        ((idx, cb, w, b), {"out": torch.zeros(B, D, T, dtype=torch.float64)}, TypeError, "out must be float32"),
        ((idx, cb.to("meta"), w, b), {}, ValueError, "must share a device"),
        ((idx, cb, w, b), {"sign": "minus"}, TypeError, "sign must be a float"),
        ((idx, cb, w, b), {"config": LookupConfig(100, 16)}, ValueError, "block_o must be a power of two"),
    ]


@pytest.mark.parametrize("args, kwargs, exc, match", _bad_lookup_cases())
def test_lookup_rejects_bad_inputs(args: tuple, kwargs: dict, exc: type, match: str) -> None:
    args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) and a.device.type != "meta" else a for a in args)
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises(exc, match=match):
        codebook_lookup(*args, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors are only rejected when CUDA kernels compile")
def test_cpu_tensors_need_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cbk, "interpreting", lambda: False)
    vq = VectorQuantize(16, 32, 8)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        codebook_nearest(torch.randn(1, 16, 4), *_nearest_args(vq))


# ------------------------------------------------------------------------------------------------------------
# Real sizes on GPU
# ------------------------------------------------------------------------------------------------------------

REAL = dict(B=1, D=768, T=65_536, N=4096, d=8)


@pytest.fixture(scope="module")
def real_case() -> Tuple[VectorQuantize, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A full-size level and its fp32 reference: (quantizer, z, z_e_ref, codes_ref)."""
    vq = _quantizer(REAL["D"], REAL["N"], REAL["d"], seed=61)
    z = _randn(REAL["B"], REAL["D"], REAL["T"], seed=62)
    with torch.no_grad():  # full fp32: see conftest's full_fp32_torch
        z_e_ref = vq.in_proj(z)
        idx_ref = vq.nearest(z_e_ref)
    return vq, z, z_e_ref, idx_ref


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "precision, max_flips, z_e_atol",
    [("tf32x3", 0, 1e-4), ("ieee", 0, 1e-4), ("tf32", REAL["T"] // 100, 1e-2)],  # plain TF32 flips ~0.2%
)
def test_gpu_nearest_real_size(real_case, precision: str, max_flips: int, z_e_atol: float) -> None:
    vq, z, z_e_ref, idx_ref = real_case
    idx, z_e = codebook_nearest(z, *_nearest_args(vq), precision=precision, return_projection=True)
    flipped = (idx != idx_ref).nonzero().tolist()
    print(f"\n{precision}: {len(flipped)} of {idx.numel()} codes differ from torch fp32")
    if len(flipped) > max_flips:
        # How close each flip was: fp64 distances of the two picks (a tie below fp32 resolution shows ~1e-7).
        cb = F.normalize(vq.codebook.weight.double())
        gaps = []
        for b, t in flipped[:5]:
            e = F.normalize(z_e_ref[b, :, t].double(), dim=0)
            dist = (e - cb).pow(2).sum(1)
            gaps.append(f"t={t}: {dist[idx[b, t]].item() - dist[idx_ref[b, t]].item():+.2e}")
        pytest.fail(f"{precision}: {len(flipped)} of {idx.numel()} codes differ from torch fp32; "
                    f"fp64 distance of the kernel's pick minus torch's: {', '.join(gaps)}")
    torch.testing.assert_close(z_e, z_e_ref, rtol=0, atol=z_e_atol)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("repeat", [1, 4])
def test_gpu_lookup_real_size(real_case, repeat: int) -> None:
    vq, _, z_e_ref, idx_ref = real_case
    ref = _lookup_reference(vq, idx_ref, repeat, z_e_ref)
    out = codebook_lookup(idx_ref, vq.codebook.weight, vq.out_proj.weight, vq.out_proj.bias, repeat=repeat,
                          z_e=z_e_ref)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    acc = torch.ones_like(ref)
    codebook_lookup(idx_ref, vq.codebook.weight, vq.out_proj.weight, vq.out_proj.bias, repeat=repeat,
                    z_e=z_e_ref, out=acc, sign=-1.0, check_range=False)
    torch.testing.assert_close(acc, 1.0 - ref, rtol=0, atol=1e-4)
