"""Kernel benchmark cases shared by ``test_kernels.py`` (pytest-benchmark) and ``gpu_report.py``.

Each case builds, on a device, the fused Triton call and the PyTorch eager code it replaces on the same
inputs, plus the fewest bytes the operation must move and its flops (for GB/s and TFLOP/s). On CUDA the
sizes are the ones the targets are stated at; on the CPU (Triton's interpreter) they are tiny, for a smoke
run of the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from snac_stream.model.functional import snake

F32 = 4  # bytes


@dataclass
class Case:
    name: str
    fused: Callable[[], object]
    eager: Callable[[], object]
    bytes: int  # minimum device-memory traffic: inputs read once, outputs written once
    flops: int
    shape: str


def gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def _randn(*shape: int, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, device=device) * scale


def dwconv_case(device: torch.device, C: int, T: int, dilation: int) -> Case:
    from snac_stream.kernels.conv import snake_dwconv

    x = _randn(1, C, T, device=device)
    w, b = _randn(C, 1, 7, device=device, scale=0.3), _randn(C, device=device, scale=0.1)
    a1, a2 = torch.rand(1, C, 1, device=device) + 0.5, torch.rand(1, C, 1, device=device) + 0.5
    pad = 3 * dilation
    return Case(
        f"snake+dwconv+snake d={dilation}",
        lambda: snake_dwconv(x, w, b, alpha=a1, dilation=dilation, padding=pad, alpha_out=a2),
        lambda: snake(F.conv1d(snake(x, a1), w, b, padding=pad, dilation=dilation, groups=C), a2),
        2 * C * T * F32, 2 * 7 * C * T, f"C={C} T={T} k=7",
    )


def pointwise_case(device: torch.device, C: int, T: int) -> Case:
    from snac_stream.kernels.conv import snake_conv

    x, h = _randn(1, C, T, device=device), _randn(1, C, T, device=device)
    w, b = _randn(C, C, 1, device=device, scale=C ** -0.5), _randn(C, device=device, scale=0.1)
    return Case(
        "1x1 conv+bias+residual",
        lambda: snake_conv(h, w, b, residual=x),
        lambda: x + F.conv1d(h, w, b),
        3 * C * T * F32, 2 * C * C * T, f"C={C} T={T}",
    )


def noise_case(device: torch.device, C: int, T: int) -> Case:
    from snac_stream.kernels.conv import snake_conv
    from snac_stream.model.noise import positional_randn

    x = _randn(1, C, T, device=device)
    w = _randn(C, C, 1, device=device, scale=C ** -0.5)
    return Case(
        "noise block (1x1 * randn + x)",
        lambda: snake_conv(x, w, noise_seed=1234, residual=x),
        lambda: x + positional_randn(1234, 0, T, device).view(1, 1, T) * F.conv1d(x, w),
        2 * C * T * F32, 2 * C * C * T, f"C={C} T={T}",
    )


def strided_case(device: torch.device, C_in: int, C_out: int, T_in: int, stride: int) -> Case:
    from snac_stream.kernels.conv import snake_conv

    x = _randn(1, C_in, T_in, device=device)
    w = _randn(C_out, C_in, 2 * stride, device=device, scale=(2 * stride * C_in) ** -0.5)
    b, a = _randn(C_out, device=device, scale=0.1), torch.rand(1, C_in, 1, device=device) + 0.5
    pad = (stride + 1) // 2
    T_out = (T_in + 2 * pad - 2 * stride) // stride + 1
    return Case(
        f"snake+strided conv s={stride}",
        lambda: snake_conv(x, w, b, alpha=a, stride=stride, padding=pad),
        lambda: F.conv1d(snake(x, a), w, b, stride=stride, padding=pad),
        (C_in * T_in + C_out * T_out) * F32, 2 * C_out * C_in * 2 * stride * T_out,
        f"{C_in}->{C_out} T={T_in} k={2 * stride}",
    )


def nearest_case(device: torch.device, D: int, T: int, N: int = 4096, d: int = 8) -> Case:
    from snac_stream.kernels.codebook import codebook_nearest

    z = _randn(1, D, T, device=device)
    w_in, b_in = _randn(d, D, 1, device=device, scale=D ** -0.5), _randn(d, device=device, scale=0.1)
    cb = F.normalize(_randn(N, d, device=device))
    sq = cb.pow(2).sum(1)

    def eager():
        e = F.normalize(F.conv1d(z, w_in, b_in).transpose(1, 2).reshape(-1, d))
        dist = e.pow(2).sum(1, keepdim=True) - 2 * e @ cb.t() + sq[None]
        return (-dist).max(1)[1]

    return Case(
        "codebook nearest (in_proj+norm+argmax)",
        lambda: codebook_nearest(z, w_in, b_in, cb, sq),
        eager,
        D * T * F32 + T * 8, 2 * T * (D * d + N * d), f"D={D} T={T} N={N} d={d}",
    )


def lookup_case(device: torch.device, D: int, T: int, repeat: int, N: int = 4096, d: int = 8) -> Case:
    from snac_stream.kernels.codebook import codebook_lookup

    idx = torch.randint(0, N, (1, T), device=device)
    cb = _randn(N, d, device=device)
    w, b = _randn(D, d, 1, device=device, scale=d ** -0.5), _randn(D, device=device, scale=0.1)
    return Case(
        f"codebook lookup (gather+out_proj+repeat x{repeat})",
        lambda: codebook_lookup(idx, cb, w, b, repeat=repeat, check_range=False),
        lambda: F.conv1d(F.embedding(idx, cb).transpose(1, 2), w, b).repeat_interleave(repeat, -1),
        T * 8 + D * T * repeat * F32, 2 * T * D * d, f"D={D} T={T} N={N}",
    )


def all_cases(device: torch.device) -> Dict[str, Callable[[], Case]]:
    """Case builders by id: full sizes on a GPU, tiny ones under the interpreter."""
    if gpu():
        C, T, frames = 512, 65_536, 65_536
        return {
            "dwconv_d1": lambda: dwconv_case(device, C, T, 1),
            "dwconv_d9": lambda: dwconv_case(device, C, T, 9),
            "pointwise": lambda: pointwise_case(device, C, T // 4),
            "noise": lambda: noise_case(device, C, T // 4),
            "strided_s8": lambda: strided_case(device, 384, 768, T, 8),
            "strided_s2": lambda: strided_case(device, 48, 96, 4 * T, 2),
            "nearest": lambda: nearest_case(device, 768, frames),
            "lookup": lambda: lookup_case(device, 768, frames // 4, 4),
        }
    return {
        "dwconv_d1": lambda: dwconv_case(device, 16, 512, 1),
        "dwconv_d9": lambda: dwconv_case(device, 16, 512, 9),
        "pointwise": lambda: pointwise_case(device, 16, 256),
        "noise": lambda: noise_case(device, 16, 256),
        "strided_s8": lambda: strided_case(device, 8, 16, 512, 8),
        "strided_s2": lambda: strided_case(device, 8, 16, 512, 2),
        "nearest": lambda: nearest_case(device, 32, 256, N=256),
        "lookup": lambda: lookup_case(device, 32, 64, 4, N=256),
    }


def case_ids() -> List[str]:
    return list(all_cases(torch.device("cpu")))
