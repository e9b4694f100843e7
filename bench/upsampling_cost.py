"""The decoder's upsampling on a GPU: its data movement, and its products in each form the Triton backend has.

    python bench/upsampling_cost.py [--streams 2048] [--products rows frames ...]

For each of the 24 kHz decoder's four transposed convs at one engine step of ``--streams`` streams (the frames a
step gives each layer):

- ``phase_pairs`` (snake, context, frame pairs in one pass) against a snake, a concatenation and the gather
  copy, and ``channels_first`` (the product's channels-last samples turned channels-first) against the slice and
  transposing copy; GB/s counts the bytes each side must read and write;
- the whole streaming layer (``functional.conv_transpose`` with one frame of context and the snake) for each of
  ``functional.UPSAMPLING_PRODUCTS`` at the default precision (tf32x3): the cuBLAS fp32 product of built rows,
  and the dense-conv kernel on tensor cores, with and without operands split before it, on rows of frame pairs
  or on overlapping rows of single frames (``--products`` picks some). TFLOP/s counts useful
  arithmetic; the error is the largest against the PyTorch backend in float64, relative to the output's
  largest magnitude.

CUDA-event medians (``triton.testing.do_bench``, L2 flushed).
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming_cost import commit  # noqa: E402

from snac_stream.kernels.upsampling import channels_first, phase_pairs  # noqa: E402
from snac_stream.model import functional  # noqa: E402
from snac_stream.model.functional import snake  # noqa: E402

# (input channels, output channels, stride, input frames per 2048-sample step) of the 24 kHz decoder's blocks
LAYERS = ((1024, 512, 8, 4), (512, 256, 8, 32), (256, 128, 4, 256), (128, 64, 2, 1024))


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=200, return_mode="median")


def start_report(doc: str, about: str = "",
                 add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> argparse.Namespace:
    """Parse ``--streams`` (default 2048), and what ``add_arguments`` adds, for a script described by ``doc``,
    and print the report's first line (device, date, commit, streams, then ``about``); returns the arguments."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=2048)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()}, {datetime.now(timezone.utc):%Y-%m-%d}, commit {commit()}, "
          f"{args.streams} streams{about}")
    return args


def main() -> None:
    args = start_report(__doc__, add_arguments=lambda parser: parser.add_argument(
        "--products", nargs="+", choices=functional.UPSAMPLING_PRODUCTS, default=list(functional.UPSAMPLING_PRODUCTS),
        help="the product forms to time (default all)"))
    b = args.streams
    print("| layer | frames | rows: kernel (us) | GB/s | PyTorch (us) | placement: kernel (us) | GB/s | PyTorch (us) "
          "| equal |\n|---|---|---|---|---|---|---|---|---|")
    for c_in, c_out, s, frames in LAYERS:
        x = torch.randn(b, c_in, frames, device="cuda")
        context = torch.randn(b, c_in, 1, device="cuda")
        alpha = torch.rand(1, c_in, 1, device="cuda") + 0.5

        def torch_pairs() -> torch.Tensor:
            v = snake(torch.cat([context, x], -1), alpha)
            return v.unfold(-1, 2, 1).permute(0, 2, 3, 1).reshape(b * frames, 2 * c_in)

        z = torch.randn(b, frames * s, c_out, device="cuda")  # the product's rows: samples channels-last

        def torch_place() -> torch.Tensor:
            return z[:, 1:].transpose(1, 2).contiguous()

        pairs_ms, pairs_torch_ms = ms(lambda: phase_pairs(x, context, alpha)), ms(torch_pairs)
        place_ms, place_torch_ms = ms(lambda: channels_first(z, 1)), ms(torch_place)
        pairs_gb = (x.numel() + 2 * b * frames * c_in) * 4 / 1e9
        place_gb = 2 * z.numel() * 4 / 1e9
        equal = (torch.equal(channels_first(z, 1), torch_place())
                 and torch.allclose(phase_pairs(x, context, alpha), torch_pairs(), rtol=1e-6, atol=2e-6))
        print(f"| {c_in}->{c_out}, stride {s} | {frames} | {pairs_ms * 1e3:.0f} | {pairs_gb / pairs_ms * 1e3:.0f} "
              f"| {pairs_torch_ms * 1e3:.0f} | {place_ms * 1e3:.0f} | {place_gb / place_ms * 1e3:.0f} "
              f"| {place_torch_ms * 1e3:.0f} | {'yes' if equal else 'NO'} |", flush=True)
    products(b, args.products)


def products(b: int, names: Sequence[str]) -> None:
    """The whole streaming layer in each product form of ``names``: us, TFLOP/s and error against float64."""
    print("\n| layer | frames | " + " | ".join(f"{n} (us) | TFLOP/s | error" for n in names) + " |")
    print("|---|---|" + "---|---|---|" * len(names))
    for c_in, c_out, s, frames in LAYERS:
        x = torch.randn(b, c_in, frames, device="cuda")
        context = torch.randn(b, c_in, 1, device="cuda")
        alpha = torch.rand(1, c_in, 1, device="cuda") + 0.5
        weight = torch.randn(c_in, c_out, 2 * s, device="cuda") / (2 * c_in) ** 0.5
        bias = torch.randn(c_out, device="cuda")
        backend = functional._BACKEND.set("torch")
        try:
            want = functional.conv_transpose(x.double(), weight.double(), bias.double(), stride=s,
                                             context=context.double(), alpha=alpha.double())
        finally:
            functional._BACKEND.reset(backend)
        scale = want.abs().max().item()
        flop = 2.0 * b * frames * 2 * c_in * c_out * s
        cells = []
        backend = functional._BACKEND.set("triton")
        try:
            for name in names:
                with functional.use_upsampling_product(name):
                    def layer() -> torch.Tensor:
                        return functional.conv_transpose(x, weight, bias, stride=s, context=context, alpha=alpha)

                    error = (layer().double() - want).abs().max().item() / scale
                    t = ms(layer)
                cells.append(f"{t * 1e3:.0f} | {flop / t / 1e9:.1f} | {error:.1e}")
        finally:
            functional._BACKEND.reset(backend)
        del want
        print(f"| {c_in}->{c_out}, stride {s} | {frames} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
