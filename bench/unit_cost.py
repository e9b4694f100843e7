"""Depthwise residual units at one engine step's sizes: one fused kernel against the two it replaces (GPU only).

    python bench/unit_cost.py [--streams 2048]

For each residual unit of the 24 kHz decoder and encoder that one kernel covers (up to
``kernels.conv.UNIT_MAX_CHANNELS`` channels; dilations 1, 3 and 9) at one 2048-sample step of ``--streams``
streams, called as a streaming step calls it (the unit's cache as context, the step's frames, no padding):
``kernels.conv.snake_residual_unit`` (one window of every channel per program, the hidden activations in
registers) against ``snake_dwconv`` then ``snake_conv`` (the hidden activations written and read back), tf32x3.
CUDA-event medians (``triton.testing.do_bench``), GB/s of the bytes the fused kernel must move (input, context
and output), and the largest difference between the two paths' outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upsampling_cost import ms, start_report  # noqa: E402  - the same CUDA-event medians and first line

from snac_stream.kernels import conv  # noqa: E402

# (model side, channels, frames a stream per 2048-sample step) of the 24 kHz model's residual units
UNITS = (("decoder", 128, 1024), ("decoder", 64, 2048), ("encoder", 48, 2048), ("encoder", 96, 1024))
DILATIONS = (1, 3, 9)
KERNEL = 7


def main() -> None:
    b = start_report(__doc__, "; tf32x3, time in us")
    print("| unit | channels | frames | dilation | two kernels (us) | fused (us) | speed-up | fused GB/s | largest "
          "difference |\n|---|---|---|---|---|---|---|---|---|")
    for side, c, t in UNITS:
        torch.manual_seed(0)
        x = torch.randn(b, c, t, device="cuda")
        dw = torch.randn(c, 1, KERNEL, device="cuda") / KERNEL ** 0.5
        dw_bias = torch.randn(c, device="cuda") * 0.1
        w = torch.randn(c, c, 1, device="cuda") / c ** 0.5
        bias = torch.randn(c, device="cuda") * 0.1
        alpha = torch.rand(c, device="cuda") + 0.5
        alpha_mid = torch.rand(c, device="cuda") + 0.5
        for dilation in DILATIONS:
            pad = dilation * (KERNEL - 1) // 2
            context = torch.randn(b, c, 2 * pad, device="cuda")

            def two() -> torch.Tensor:
                h = conv.snake_dwconv(x, dw, dw_bias, alpha=alpha, dilation=dilation, context=context, length=t,
                                      alpha_out=alpha_mid)
                return conv.snake_conv(h, w, bias, residual=x, residual_context=context, residual_offset=pad,
                                       precision="tf32x3")

            def fused() -> torch.Tensor:
                return conv.snake_residual_unit(x, dw, dw_bias, w, bias, alpha=alpha, alpha_mid=alpha_mid,
                                                dilation=dilation, context=context, length=t, precision="tf32x3")

            two_ms, fused_ms = ms(two), ms(fused)
            gb = (x.numel() + context.numel() + x.numel()) * 4 / 1e9
            diff = (fused() - two()).abs().max().item()
            print(f"| {side} | {c} | {t} | {dilation} | {two_ms * 1e3:.0f} | {fused_ms * 1e3:.0f} | "
                  f"{two_ms / fused_ms:.2f} | {gb / fused_ms * 1e3:.0f} | {diff:.1e} |", flush=True)
            del context
        del x


if __name__ == "__main__":
    main()
