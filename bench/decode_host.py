"""Where a batch-1 offline decode's time goes: host or GPU (GPU only).

    python bench/decode_host.py [--preset 24khz] [--seconds 10]

One model with the Triton backend, random weights: the synchronised wall time of 30 decodes of the same codes
(after 10 warm-up decodes), the host time to enqueue one decode without waiting for it (30 in a row), and a
cProfile of 20 decodes, heaviest functions first. When the host time is near the wall time, launches, not
kernels, set the pace.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from snac_stream import SNAC


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="24khz")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = SNAC.from_config(args.preset, backend="triton").cuda().eval()
    cfg = model.config
    frames = int(args.seconds * cfg.sampling_rate) // cfg.frame_samples
    frames -= frames % (cfg.pad_multiple // cfg.frame_samples)
    codes = [torch.randint(0, cfg.codebook_size, (1, frames * cfg.coarse_stride // s), device="cuda")
             for s in cfg.vq_strides]
    with torch.inference_mode():
        for _ in range(10):
            model.decode(codes)
        torch.cuda.synchronize()
        walls = []
        for _ in range(30):
            start = time.perf_counter()
            model.decode(codes)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - start)
        walls.sort()
        start = time.perf_counter()
        for _ in range(30):
            model.decode(codes)
        host = (time.perf_counter() - start) / 30
        torch.cuda.synchronize()
        print(f"{args.preset} decode of {frames * cfg.frame_samples / cfg.sampling_rate:.2f} s: wall p50 "
              f"{1e3 * walls[15]:.2f} ms (min {1e3 * walls[0]:.2f}); host enqueue per call {1e3 * host:.2f} ms")
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(20):
            model.decode(codes)
        torch.cuda.synchronize()
        profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
