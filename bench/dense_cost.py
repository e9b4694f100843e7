"""The decoder's 1x1 convs at one engine step's sizes: the Triton dense kernel against cuBLAS (GPU only).

    python bench/dense_cost.py [--streams 2048]

For each 1x1 conv of the 24 kHz decoder's residual units at one 2048-sample step of ``--streams`` streams
(the frames a step gives each block), as the residual unit calls it (bias and skip add fused):
``kernels.conv.snake_conv`` at tf32x3 (products split in registers: rows first, the default for 1x1 convs on
CUDA, and the untransposed form before it; and on operands split before the kernel) against batched cuBLAS
products of the same size, one per stream:
fp32 without tensor cores, one TF32 product, and a tf32x3 product as one TF32 product of channel-stacked split
operands (``[w_hi | w_hi | w_lo] @ [x_hi; x_lo; x_hi]``, the operands split beforehand and not timed: the
kernel before the conv would write them). CUDA-event medians (``triton.testing.do_bench``), TFLOP/s of useful
arithmetic (2 C^2 T a stream) and each path's largest error against float64. It measures how far the dense
kernel is from a tensor-core product, to choose what to build, not a path the model takes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upsampling_cost import ms, start_report  # noqa: E402  - the same CUDA-event medians and first line

from snac_stream.kernels import conv  # noqa: E402
from snac_stream.kernels.precision import tf32_split  # noqa: E402
from snac_stream.model.functional import _tf32_matmuls  # noqa: E402

# (channels, output frames a stream per 2048-sample step) of the 24 kHz decoder's blocks
BLOCKS = ((512, 32), (256, 256), (128, 1024), (64, 2048))


def main() -> None:
    b = start_report(__doc__, "; time in us (TFLOP/s of useful arithmetic), largest error against float64").streams
    print("| channels | frames | Triton tf32x3, rows first | Triton tf32x3, untransposed | Triton split operands "
          "| cuBLAS fp32 | cuBLAS TF32 | cuBLAS split TF32 (tf32x3) | error: rows first | untransposed | cuBLAS fp32 "
          "| cuBLAS split |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c, t in BLOCKS:
        torch.manual_seed(0)
        y = torch.randn(b, c, t, device="cuda")
        x = torch.randn(b, c, t, device="cuda")
        w = torch.randn(c, c, 1, device="cuda") / c ** 0.5
        bias = torch.randn(c, device="cuda")
        flops = 2 * c * c * t * b
        want = x.double() + bias.double().view(1, -1, 1) + torch.matmul(w[..., 0].double(), y.double())

        def triton_conv(split: bool, rows_first: bool = True) -> torch.Tensor:
            return conv.snake_conv(y, w, bias, residual=x, precision="tf32x3", split=split, rows_first=rows_first)

        w2 = w[..., 0].expand(b, c, c)
        res = x + bias.view(1, -1, 1)

        def cublas(tf32: bool) -> torch.Tensor:
            with _tf32_matmuls(y.device, tf32):
                return torch.baddbmm(res, w2, y)

        y_hi, y_lo = tf32_split(y)
        w_hi, w_lo = tf32_split(w[..., 0])
        stacked_y = torch.cat([y_hi, y_lo, y_hi], dim=1)
        stacked_w = torch.cat([w_hi, w_hi, w_lo], dim=1).expand(b, c, 3 * c)

        def cublas_split() -> torch.Tensor:
            with _tf32_matmuls(y.device, True):
                return torch.baddbmm(res, stacked_w, stacked_y)

        times = [ms(lambda: triton_conv(False)), ms(lambda: triton_conv(False, rows_first=False)),
                 ms(lambda: triton_conv(True)), ms(lambda: cublas(False)), ms(lambda: cublas(True)), ms(cublas_split)]
        errors = [(got.double() - want).abs().max().item()
                  for got in (triton_conv(False), triton_conv(False, rows_first=False), cublas(False), cublas_split())]
        cells = " | ".join(f"{m * 1e3:.0f} ({flops / m / 1e9:.1f})" for m in times)
        print(f"| {c} | {t} | {cells} | " + " | ".join(f"{e:.1e}" for e in errors) + " |", flush=True)
        del y, x, want, stacked_y, stacked_w, res


if __name__ == "__main__":
    main()
