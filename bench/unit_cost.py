"""The decoder's residual units at one engine step's sizes: one kernel against two (GPU only).

    python bench/unit_cost.py [--streams 2048]

For each residual unit of the 24 kHz decoder's blocks (channels, dilation 1, 3 and 9) at one 2048-sample step
of ``--streams`` streams, as a streaming step calls it (the new frames and the unit's cache as context):
``kernels.conv.snake_residual_unit`` (the depthwise conv computed as the 1x1 conv loads its input) under its
default tiles and a few others (at dilation 3), against ``snake_dwconv`` then ``snake_conv`` (the two kernels a
unit took before; their own default tiles). CUDA-event medians (``triton.testing.do_bench``), the bytes a step must move
at least (input, cache and output, once each) per microsecond, and each path's largest error against float64.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dense_cost import BLOCKS  # noqa: E402  - the same (channels, frames) of the decoder's blocks
from upsampling_cost import ms, start_report  # noqa: E402

from snac_stream.kernels import conv, tuning  # noqa: E402
from snac_stream.model.functional import snake  # noqa: E402

TAPS = 7
# (BLOCK_O, BLOCK_T, BLOCK_R, warps): tilings that compile for sm_90 without spilling (ptxas -v)
TILINGS = ((64, 64, 16, 4), (64, 64, 32, 4), (128, 64, 16, 8), (128, 64, 32, 8), (64, 128, 16, 8), (32, 64, 16, 4))


def main() -> None:
    b = start_report(__doc__, "; time in us (GB/s of the bytes a step must move), largest error against float64")
    names = [f"{o}x{t}x{r}/{w}" for o, t, r, w in TILINGS]
    print(f"| channels | frames | dilation | two kernels | one kernel, default | {' | '.join(names)} | error: two "
          f"| one |\n|{'---|' * (7 + len(names))}")
    for c, t in BLOCKS:
        for dil in (1, 3, 9):
            torch.manual_seed(0)
            halo = dil * (TAPS - 1)
            x, ctx = torch.randn(b, c, t, device="cuda"), torch.randn(b, c, halo, device="cuda")
            dw, dw_b = torch.randn(c, 1, TAPS, device="cuda") * 0.3, torch.randn(c, device="cuda")
            pw, pw_b = torch.randn(c, c, 1, device="cuda") / c ** 0.5, torch.randn(c, device="cuda")
            a, a_mid = torch.rand(c, device="cuda") + 0.2, torch.rand(c, device="cuda") + 0.2
            kw = dict(alpha=a, alpha_mid=a_mid, dilation=dil, context=ctx, residual_offset=halo // 2)

            def one() -> torch.Tensor:
                return conv.snake_residual_unit(x, dw, dw_b, pw, pw_b, **kw)

            def two() -> torch.Tensor:
                h = conv.snake_dwconv(x, dw, dw_b, alpha=a, dilation=dil, context=ctx, alpha_out=a_mid)
                return conv.snake_conv(h, pw, pw_b, residual=x, residual_context=ctx, residual_offset=halo // 2)

            v = torch.cat([ctx, x], -1).double()
            h = snake(F.conv1d(snake(v, a.double().view(1, -1, 1)), dw.double(), dw_b.double(), dilation=dil,
                               groups=c), a_mid.double().view(1, -1, 1))
            want = v[..., halo // 2:halo // 2 + t] + F.conv1d(h, pw.double(), pw_b.double())
            errors = [(f().double() - want).abs().max().item() for f in (two, one)]
            del v, h, want
            times = [ms(two), ms(one)]
            key = tuning.ShapeKey(tuning.CONV_UNIT, "cuda", c, c, TAPS, 1, dil, tuning.t_bucket(t), True)
            for o, tt, r, w in TILINGS:
                if dil != 3:  # each tiling is a compilation: swept at one dilation
                    times.append(float("nan"))
                    continue
                tuning.TABLE[key] = tuning.LaunchConfig({"BLOCK_O": o, "BLOCK_T": tt, "BLOCK_R": r}, w, 3)
                try:
                    times.append(ms(one))
                except Exception as err:  # a tiling this Triton cannot compile or launch
                    print(f"<!-- {c} ch, dilation {dil}, {o}x{tt}x{r}/{w}: {type(err).__name__} -->")
                    times.append(float("nan"))
            del tuning.TABLE[key]
            moved = 4 * b * c * (2 * t + halo)
            cells = " | ".join(f"{m * 1e3:.0f} ({moved / m / 1e6:.0f})" for m in times)
            print(f"| {c} | {t} | {dil} | {cells} | " + " | ".join(f"{e:.1e}" for e in errors) + " |", flush=True)
            del x, ctx


if __name__ == "__main__":
    main()
