"""Fused codebook kernels for the residual vector quantizer (see ``snac_stream.model.vq``).

Encode side, :func:`codebook_nearest`: ``in_proj`` (1x1 conv D -> d), L2 normalisation and the nearest
codebook entry in one pass over the latents. The (T x N) distance matrix lives only in registers, one
(BLOCK_T x BLOCK_N) tile at a time, reduced to a running minimum.

Decode side, :func:`codebook_lookup`: codebook gather, the optional straight-through term, ``out_proj``
(1x1 conv d -> D) and ``repeat_interleave`` along time, written straight into the output or accumulated into
an existing buffer (sum of levels when decoding, residual update when encoding).

The search's products (in_proj and the frame-codebook dot products) run at the caller's ``precision`` (see
``precision.py``); the lookup's are d fp32 FMAs per output element at every precision.

Shapes use B = batch, D = latent channels, d = codebook dimension, N = codebook size, T = frames at the
level's rate (latent frames / stride). All floating point tensors are float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from .common import (cdiv, check_grid, check_shape, check_tensor, interpreting, next_pow2, output_buffer, pow2_in,
                     resolve_precision)

__all__ = [
    "LookupConfig",
    "NearestConfig",
    "codebook_lookup",
    "codebook_nearest",
    "lookup_config",
    "nearest_config",
]

# F.normalize's default eps: x / max(||x||, eps).
_NORM_EPS = tl.constexpr(1e-12)
# Triton's cap on the elements of one block (TRITON_MAX_TENSOR_NUMEL).
_MAX_BLOCK_NUMEL = 1 << 20


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _nearest_kernel(
    z_ptr, w_ptr, bias_ptr, cb_ptr, c2_ptr, idx_ptr, ze_ptr,
    T,
    stride_zb, stride_zd, stride_zt,
    stride_ib, stride_it,
    stride_eb, stride_ed, stride_et,
    # D and N are model constants: compile-time loop bounds let the compiler size and pipeline both loops.
    D: tl.constexpr,
    N: tl.constexpr,
    CB_DIM: tl.constexpr,  # d, the codebook dimension
    CB_DIM_PAD: tl.constexpr,  # d padded to a power of two >= 16 (tl.dot needs K >= 16)
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    STORE_ZE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_j = tl.arange(0, CB_DIM_PAD)
    mask_j = offs_j < CB_DIM

    # in_proj: z_e[t, j] = sum_k z[k, t] * W[j, k] + bias[j]. Padded columns j >= d stay exactly zero, so they
    # add nothing to the norms or dot products below.
    offs_k = tl.arange(0, BLOCK_K)
    z_ptrs = (z_ptr + pid_b * stride_zb + offs_t[:, None].to(tl.int64) * stride_zt
              + offs_k[None, :].to(tl.int64) * stride_zd)
    w_ptrs = w_ptr + offs_j[None, :] * D + offs_k[:, None]
    acc = tl.zeros((BLOCK_T, CB_DIM_PAD), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        mask_k = (k0 + offs_k) < D
        z_tile = tl.load(z_ptrs, mask=mask_t[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_T, BLOCK_K)
        w_tile = tl.load(w_ptrs, mask=mask_k[:, None] & mask_j[None, :], other=0.0)  # (BLOCK_K, CB_DIM_PAD)
        acc = tl.dot(z_tile, w_tile, acc, input_precision=PRECISION)
        z_ptrs += BLOCK_K * stride_zd
        w_ptrs += BLOCK_K
    bias = tl.load(bias_ptr + offs_j, mask=mask_j, other=0.0)
    z_e = acc + bias[None, :]

    if STORE_ZE:
        ze_ptrs = (ze_ptr + pid_b * stride_eb + offs_j[None, :] * stride_ed
                   + offs_t[:, None].to(tl.int64) * stride_et)
        tl.store(ze_ptrs, z_e, mask=mask_t[:, None] & mask_j[None, :])

    # F.normalize. Triton's plain sqrt and division are approximate on GPU; torch's are correctly rounded.
    norm = tl.sqrt_rn(tl.sum(z_e * z_e, axis=1))
    e = tl.div_rn(z_e, tl.maximum(norm, _NORM_EPS)[:, None])
    e2 = tl.sum(e * e, axis=1)

    best_dist = tl.full((BLOCK_T,), float("inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_T,), dtype=tl.int32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, N, BLOCK_N):
        mask_n = (n0 + offs_n) < N
        # +inf squared norm keeps padded entries out of the minimum.
        c2 = tl.load(c2_ptr + n0 + offs_n, mask=mask_n, other=float("inf"))
        if PRECISION == "ieee":
            # fp32 outer products over the d real columns: an ieee tl.dot runs on the same FMA units but over
            # the zero-padded K = 16, twice the work.
            dots = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(CB_DIM):
                e_j = tl.sum(tl.where(offs_j[None, :] == j, e, 0.0), axis=1)  # column j of e (exact)
                c_j = tl.load(cb_ptr + (n0 + offs_n) * CB_DIM + j, mask=mask_n, other=0.0)
                dots += e_j[:, None] * c_j[None, :]
        else:
            c_tile = tl.load(cb_ptr + (n0 + offs_n)[None, :] * CB_DIM + offs_j[:, None],
                             mask=mask_j[:, None] & mask_n[None, :], other=0.0)  # (CB_DIM_PAD, BLOCK_N)
            dots = tl.dot(e, c_tile, input_precision=PRECISION)  # (BLOCK_T, BLOCK_N)
        # Same expression order as the reference: (e2 - 2 e.c) + c2.
        dist = e2[:, None] - 2.0 * dots + c2[None, :]
        # Ties: lowest index inside the chunk, and strict < keeps the earlier chunk, like torch's max on -dist.
        chunk_min, chunk_idx = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = chunk_min < best_dist
        best_dist = tl.where(better, chunk_min, best_dist)
        best_idx = tl.where(better, chunk_idx + n0, best_idx)

    tl.store(idx_ptr + pid_b * stride_ib + offs_t.to(tl.int64) * stride_it, best_idx.to(tl.int64), mask=mask_t)


@triton.jit
def _lookup_kernel(
    idx_ptr, cb_ptr, w_ptr, bias_ptr, ze_ptr, out_ptr,
    T, D, N, sign,
    stride_ib, stride_it,
    stride_eb, stride_ed, stride_et,
    stride_ob, stride_oc, stride_ot,
    CB_DIM: tl.constexpr,
    REPEAT: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    STRAIGHT_THROUGH: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)

    # Each program owns a tile of OUTPUT frames (contiguous in memory, so stores coalesce) and recomputes its
    # source frame; repeat_interleave is then just t = o // REPEAT. The recompute is d FMAs per element,
    # cheaper than the memory traffic it saves.
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < T * REPEAT
    offs_t = (offs_o // REPEAT).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < D

    code = tl.load(idx_ptr + pid_b * stride_ib + offs_t * stride_it, mask=mask_o, other=0).to(tl.int64)
    # Codes are range-checked on the host; clamping keeps unchecked calls inside the codebook's memory.
    code = tl.minimum(tl.maximum(code, 0), N - 1)

    acc = tl.zeros((BLOCK_C, BLOCK_O), dtype=tl.float32)
    for j in tl.static_range(CB_DIM):
        v = tl.load(cb_ptr + code * CB_DIM + j, mask=mask_o, other=0.0)  # (BLOCK_O,)
        if STRAIGHT_THROUGH:
            z_e = tl.load(ze_ptr + pid_b * stride_eb + j * stride_ed + offs_t * stride_et, mask=mask_o, other=0.0)
            # The reference's z_e + (z_q - z_e): not exactly z_q in floating point, so computed as written.
            v = z_e + (v - z_e)
        w = tl.load(w_ptr + offs_c * CB_DIM + j, mask=mask_c, other=0.0)  # (BLOCK_C,)
        acc += w[:, None] * v[None, :]
    bias = tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0)
    acc += bias[:, None]

    out_ptrs = (out_ptr + pid_b * stride_ob + offs_c[:, None].to(tl.int64) * stride_oc
                + offs_o[None, :].to(tl.int64) * stride_ot)
    mask = mask_c[:, None] & mask_o[None, :]
    if ACCUMULATE:
        acc = tl.load(out_ptrs, mask=mask, other=0.0) + sign * acc
    tl.store(out_ptrs, acc, mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NearestConfig:
    """Tile sizes of :func:`codebook_nearest` (all powers of two, >= 16).

    block_t: frames per program; block_k: latent channels per in_proj step; block_n: codebook entries per
    distance tile (a BLOCK_T x BLOCK_N fp32 tile in registers).
    """

    block_t: int
    block_k: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class LookupConfig:
    """Tile sizes of :func:`codebook_lookup`: block_o output frames x block_c channels per program."""

    block_o: int
    block_c: int
    num_warps: int = 4


def nearest_config(T: int, D: int, N: int) -> NearestConfig:
    """Launch configuration for :func:`codebook_nearest` on (B, D, T) latents and an N-entry codebook.

    On GPU: 64 frames x 128 codes per distance tile (one Hopper warpgroup, M = 64 as wgmma wants) and 64
    channels per in_proj step, the fastest of the tiles tried at the real sizes (D = 768, N = 4096; frames
    32-128, codes 64-256, channels 32-128, 2-4 stages). Under the interpreter each block is a numpy op whose
    cost is mostly Python overhead, so blocks are as large as the problem (capped by Triton's block size
    limit).
    """
    if interpreting():
        block_t = pow2_in(T, 16, 512)
        return NearestConfig(block_t=block_t, block_k=pow2_in(D, 16, _MAX_BLOCK_NUMEL // block_t),
                             block_n=pow2_in(N, 16, _MAX_BLOCK_NUMEL // block_t), num_warps=4, num_stages=1)
    return NearestConfig(block_t=64, block_k=64, block_n=128, num_warps=4, num_stages=3)


def lookup_config(T_out: int, D: int) -> LookupConfig:
    """Launch configuration for :func:`codebook_lookup` writing (B, D, T_out) (T_out = frames x repeat).

    The kernel is bound by the output's memory traffic: 256 frames x 16 channels per program keeps each row's
    store 1 KiB contiguous (16-byte vector stores) with many programs in flight; it was the fastest of the
    tiles tried (frames 128-512, channels 16-64). Shorter rows (an engine step: 4 latent frames a stream at
    24 kHz) take tiles of their length and more channels, about 4K elements, rather than 256 lanes of which
    all but a few are masked. Large blocks under the interpreter (see :func:`nearest_config`).
    """
    if interpreting():
        block_c = pow2_in(D, 16, 1024)
        return LookupConfig(block_o=pow2_in(T_out, 16, _MAX_BLOCK_NUMEL // block_c), block_c=block_c)
    block_o = pow2_in(T_out, 1, 256)
    return LookupConfig(block_o=block_o, block_c=max(16, min(pow2_in(D, 16, 1024), 4096 // block_o)), num_warps=4)


# --------------------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------------------


def _check_blocks(config: object, names: Tuple[str, ...], minimum: int) -> None:
    """Block sizes must be powers of two (tl.arange) and at least ``minimum`` (tl.dot's 16)."""
    for name in names:
        v = getattr(config, name)
        if not isinstance(v, int) or v < minimum or v & (v - 1):
            raise ValueError(f"{type(config).__name__}.{name} must be a power of two >= {minimum}, got {v!r}")


def _codebook(name: str, t: object, device: torch.device) -> torch.Tensor:
    """A non-empty (N, d) float32 codebook on ``device``, made contiguous."""
    t = check_tensor(name, t, 2, device)
    if t.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    return t.contiguous()


def _conv_weight(name: str, w: object, rows: Optional[int], cols: int, device: torch.device) -> torch.Tensor:
    """A (rows, cols) or Conv1d-style (rows, cols, 1) weight as a contiguous (rows, cols) tensor; ``rows=None``
    takes any number of rows."""
    w = check_tensor(name, w, (2, 3), device)
    rows = w.shape[0] if rows is None else rows
    if w.dim() == 3:
        if w.shape[2] != 1:
            raise ValueError(f"{name} must be a 1x1 conv weight (kernel size 1), got shape {tuple(w.shape)}")
        w = w[..., 0]
    if tuple(w.shape) != (rows, cols):
        raise ValueError(f"{name} must have shape ({rows}, {cols}) or ({rows}, {cols}, 1), got {tuple(w.shape)}")
    return w.contiguous()


def _launch_device(device: torch.device) -> torch.device:
    """``device``, if the kernels can run on it: CUDA, or any device under the interpreter."""
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 before "
                         "importing snac_stream.kernels to run them on the CPU")
    return device


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def codebook_nearest(
    z: torch.Tensor,
    in_weight: torch.Tensor,
    in_bias: torch.Tensor,
    codebook_unit: torch.Tensor,
    codebook_sqnorm: Optional[torch.Tensor] = None,
    *,
    precision: Optional[str] = None,
    return_projection: bool = False,
    config: Optional[NearestConfig] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Nearest codebook entry of every frame: ``VectorQuantize.nearest(in_proj(z))`` in one kernel.

    Args:
        z: (B, D, T) float32 latents at the level's rate (already average-pooled by its stride).
        in_weight: (d, D) or (d, D, 1) float32 ``in_proj`` weight.
        in_bias: (d,) float32 ``in_proj`` bias.
        codebook_unit: (N, d) float32 L2-normalised codebook, ``F.normalize(codebook)``, computed once.
        codebook_sqnorm: (N,) float32 ``(codebook_unit ** 2).sum(1)``; computed here when None.
        precision: arithmetic of in_proj and of the frame-codebook products, one of ``PRECISIONS``
            (``precision.py``): ``"ieee"`` (fp32 FMAs; the codes of the fp32 reference), ``"tf32x3"`` (three
            TF32 tensor-core products, close to fp32: codes differ from the reference only at ties below fp32
            resolution) or ``"tf32"`` (one TF32 product, fastest; ~0.3% of codes differ). None picks
            ``"tf32x3"`` on GPU and ``"ieee"`` under the interpreter.
        return_projection: also return z_e, the in_proj output before normalisation (for the
            straight-through term of :func:`codebook_lookup`).
        config: launch configuration; :func:`nearest_config` when None.

    Returns:
        (B, T) int64 codes in [0, N), and with ``return_projection`` also (B, d, T) float32 z_e.
        Ties go to the lowest index, as in the reference; frames containing NaN get an unspecified code.
    """
    z = check_tensor("z", z, 3)
    B, D, T = z.shape
    device = z.device
    codebook_unit = _codebook("codebook_unit", codebook_unit, device)
    N, d = codebook_unit.shape
    in_weight = _conv_weight("in_weight", in_weight, d, D, device)
    in_bias = check_shape("in_bias", in_bias, (d,), device).contiguous()
    if codebook_sqnorm is None:
        codebook_sqnorm = codebook_unit.pow(2).sum(1)
    codebook_sqnorm = check_shape("codebook_sqnorm", codebook_sqnorm, (N,), device).contiguous()
    _launch_device(device)
    precision = resolve_precision(precision, device)

    indices = output_buffer(None, (B, T), device, torch.int64)
    z_e = output_buffer(None, (B, d, T), device) if return_projection else None
    if B > 0 and T > 0:
        cfg = config or nearest_config(T, D, N)
        _check_blocks(cfg, ("block_t", "block_k", "block_n"), 16)
        ze_arg = z_e if z_e is not None else indices  # never written when STORE_ZE is False
        ze_strides = z_e.stride() if z_e is not None else (0, 0, 0)
        grid = (cdiv(T, cfg.block_t), B)
        check_grid(grid, "batch size")
        _nearest_kernel[grid](
            z, in_weight, in_bias, codebook_unit, codebook_sqnorm, indices, ze_arg,
            T,
            *z.stride(), *indices.stride(), *ze_strides,
            D=D, N=N, CB_DIM=d, CB_DIM_PAD=max(16, next_pow2(d)),
            BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n,
            PRECISION=precision, STORE_ZE=return_projection,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if return_projection:
        return indices, z_e
    return indices


def codebook_lookup(
    indices: torch.Tensor,
    codebook: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    *,
    repeat: int = 1,
    z_e: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    sign: float = 1.0,
    check_range: bool = True,
    config: Optional[LookupConfig] = None,
) -> torch.Tensor:
    """One level's latent contribution: ``out_proj(codebook[indices]).repeat_interleave(repeat, -1)``.

    With ``z_e`` the straight-through form ``out_proj(z_e + (codebook[indices] - z_e))`` is used, which
    reproduces the reference quantizer's rounding when encoding.

    Args:
        indices: (B, T) int64 (or int32) codes in [0, N).
        codebook: (N, d) float32 codebook (the raw embedding, not normalised).
        out_weight: (D, d) or (D, d, 1) float32 ``out_proj`` weight.
        out_bias: (D,) float32 ``out_proj`` bias.
        repeat: the level's stride: every frame is repeated this many times along time.
        z_e: optional (B, d, T) float32 in_proj output of the frames (from :func:`codebook_nearest`).
        out: optional (B, D, T * repeat) float32 buffer (any strides) updated in place,
            ``out += sign * result``, and returned. Without it a new tensor is returned.
        sign: scale of the result when accumulating (+1 to sum levels, -1 to subtract from a residual).
        check_range: verify on the host that every code lies in [0, N) and raise ValueError otherwise. This
            reads the codes' min and max, a device synchronisation on CUDA that can cost more than the lookup
            itself; pass False for codes known to be valid (e.g. from :func:`codebook_nearest`, or token ids
            the caller already checked). Unchecked out-of-range codes
            are clamped into range, so they never read outside the codebook.
        config: launch configuration; :func:`lookup_config` when None.

    Returns:
        (B, D, T * repeat) float32: ``out`` when given, else a new tensor.
    """
    indices = check_tensor("indices", indices, 2, dtypes=(torch.int64, torch.int32))
    B, T = indices.shape
    device = indices.device
    codebook = _codebook("codebook", codebook, device)
    N, d = codebook.shape
    out_weight = _conv_weight("out_weight", out_weight, None, d, device)
    D = out_weight.shape[0]
    out_bias = check_shape("out_bias", out_bias, (D,), device).contiguous()
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be a positive int, got {repeat!r}")
    if isinstance(sign, bool) or not isinstance(sign, (int, float)):
        raise TypeError(f"sign must be a float, got {type(sign).__name__}")
    if z_e is not None:
        check_shape("z_e", z_e, (B, d, T), device)
    accumulate = out is not None
    out = output_buffer(out, (B, D, T * repeat), device, indices=indices, codebook=codebook, out_weight=out_weight,
                        out_bias=out_bias, z_e=z_e)
    _launch_device(device)
    if check_range and indices.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(indices))
        if lo < 0 or hi >= N:
            raise ValueError(f"indices must lie in [0, {N}) for a codebook of {N} entries, got values in [{lo}, {hi}]")

    if B > 0 and T > 0 and D > 0:
        cfg = config or lookup_config(T * repeat, D)
        _check_blocks(cfg, ("block_o", "block_c"), 1)
        ze_arg = z_e if z_e is not None else out  # never read without STRAIGHT_THROUGH
        ze_strides = z_e.stride() if z_e is not None else (0, 0, 0)
        grid = (cdiv(T * repeat, cfg.block_o), cdiv(D, cfg.block_c), B)
        check_grid(grid, "channel blocks", "batch size")
        _lookup_kernel[grid](
            indices, codebook, out_weight, out_bias, ze_arg, out,
            T, D, N, float(sign),
            *indices.stride(), *ze_strides, *out.stride(),
            CB_DIM=d, REPEAT=repeat, BLOCK_O=cfg.block_o, BLOCK_C=cfg.block_c,
            STRAIGHT_THROUGH=z_e is not None, ACCUMULATE=accumulate,
            num_warps=cfg.num_warps,
        )
    return out
