"""Tune the dense conv kernel's launch parameters for the layer shapes a real model uses (GPU only).

    python bench/tune.py [--presets 24khz 44khz] [--seconds 10] [--min-kernel-size 2] [--json out.json]

Runs one offline encode and decode per preset with the Triton backend, records every ``snake_conv`` call,
then times each distinct layer shape under a set of candidate configs (CUDA-event medians) and prints the
winners as ``kernels/tuning.py`` TABLE entries; each shape's default and best times are printed as it
finishes (and written to ``--json``), for bench/RESULTS.md rather than the code. Shapes run slowest first,
so a sweep cut short has covered the ones that matter. ``--min-kernel-size 2`` keeps the convs with more
than one tap: in tf32x3 those take the split-operand path, whose best tiles differ from the 1x1 convs'.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton.testing

from snac_stream import SNAC
from snac_stream.kernels import conv as conv_kernels
from snac_stream.kernels import tuning

CANDIDATES = [
    tuning.LaunchConfig({"BLOCK_O": o, "BLOCK_T": t, "BLOCK_R": r}, num_warps=w, num_stages=s)
    for o, t, r, w, s in itertools.product((64, 128), (64, 128), (16, 32, 64), (4,), (3,))
]
MIN_US = 40  # shapes faster than this by default are not worth a sweep


def record_calls(presets, seconds):
    calls = {}
    original = conv_kernels.snake_conv

    def recorder(x, weight, bias=None, **kw):
        c_out, c_in, k = weight.shape
        out = original(x, weight, bias, **kw)
        key = tuning.ShapeKey(tuning.CONV, "cuda", c_in, c_out, k, kw.get("stride", 1), kw.get("dilation", 1),
                              tuning.t_bucket(out.shape[-1]))
        if c_out > 1:
            calls.setdefault(key, (x, weight, bias, kw))
        return out

    conv_kernels.snake_conv = recorder
    try:
        for preset in presets:
            torch.manual_seed(0)
            model = SNAC.from_config(preset, backend="triton").cuda().eval()
            cfg = model.config
            n = int(seconds * cfg.sampling_rate) // cfg.pad_multiple * cfg.pad_multiple
            with torch.inference_mode():
                codes = model.encode(torch.randn(1, 1, n, device="cuda") * 0.1)
                model.decode(codes)
    finally:
        conv_kernels.snake_conv = original
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["24khz"])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--min-kernel-size", type=int, default=1)
    parser.add_argument("--json", help="write every shape's default and best times here")
    args = parser.parse_args()
    calls = {k: v for k, v in record_calls(args.presets, args.seconds).items()
             if k.kernel_size >= args.min_kernel_size}
    print(f"# {torch.cuda.get_device_name()}: {len(calls)} dense conv shapes, {len(CANDIDATES)} candidates each",
          flush=True)
    defaults = {}
    for key, (x, weight, bias, kw) in calls.items():
        tuning.TABLE.pop(key, None)
        defaults[key] = triton.testing.do_bench(lambda: conv_kernels.snake_conv(x, weight, bias, **kw),
                                                warmup=10, rep=50, return_mode="median")
    entries, report = [], []
    for key in sorted(calls, key=lambda k: -defaults[k]):
        x, weight, bias, kw = calls[key]
        run = lambda: conv_kernels.snake_conv(x, weight, bias, **kw)  # noqa: E731
        default_ms = defaults[key]
        best = (default_ms, None)
        if default_ms * 1e3 < MIN_US:
            continue
        for cand in CANDIDATES:
            tuning.TABLE[key] = cand
            try:
                ms = triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")
            except Exception as exc:  # out of shared memory / registers for this tile
                print(f"  skip {cand}: {type(exc).__name__}")
                continue
            if ms < best[0]:
                best = (ms, cand)
        tuning.TABLE.pop(key, None)
        print(f"{key}: default {default_ms * 1e3:.1f} us, best {best[0] * 1e3:.1f} us {best[1]}", flush=True)
        report.append({"key": [key.c_in, key.c_out, key.kernel_size, key.stride, key.dilation, key.t_bucket],
                       "default_us": default_ms * 1e3, "best_us": best[0] * 1e3,
                       "best": None if best[1] is None else [best[1].blocks, best[1].num_warps, best[1].num_stages]})
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "shapes": report}, f, indent=1)
        if best[1] is not None and best[0] < 0.95 * default_ms:
            entries.append((key, best[1]))
    print("\n# TABLE entries (paste into kernels/tuning.py)")
    for key, cfg in entries:
        print(f"    ShapeKey({key.kernel!r}, 'cuda', {key.c_in}, {key.c_out}, {key.kernel_size}, {key.stride}, "
              f"{key.dilation}, {key.t_bucket}): LaunchConfig({cfg.blocks}, num_warps={cfg.num_warps}, "
              f"num_stages={cfg.num_stages}),")


if __name__ == "__main__":
    main()
