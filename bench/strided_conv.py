"""Where the Triton dense conv loses time on the encoder's strided shapes (GPU only).

    python bench/strided_conv.py [--json out.json]

Times, in one process (CUDA-event medians, ``triton.testing.do_bench``), ``kernels.conv.snake_conv`` with and
without its fused snake in each ``tl.dot`` precision (tf32x3 in three forms: operands split before the product,
the default for K > 1; split in registers with the rows-first product; split in registers untransposed), cuDNN
in fp32 and TF32, and one cuBLAS product of the same size; the largest error of each tf32x3 form and of cuDNN
fp32 (no TF32) against a float64 conv, relative to the output's largest magnitude; then a sweep of tilings for
the stride-8 384->768 shape (tf32x3, snake on, the default path). The shapes: three of the 24 kHz encoder's
(long inputs), a 1x1 conv, and the 44 kHz encoder's four strided convs on 10 s of audio at batch 1.
"""
import argparse
import itertools
import json

import torch
import triton.testing

from snac_stream.kernels import conv, tuning

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json")
    args = parser.parse_args()

    torch.backends.cudnn.allow_tf32 = True
    dev = "cuda"
    res = {}
    def t(name, fn, rep=100):
        fn(); torch.cuda.synchronize()
        ms = triton.testing.do_bench(fn, rep=rep)
        res[name] = ms * 1e3
        print(f"{name:70s} {ms*1e3:9.1f} us", flush=True)

    torch.manual_seed(0)
    shapes = [("s8 384->768 k16", 384, 768, 16, 8, 65536), ("s8 192->384 k16", 192, 384, 16, 8, 32768),
              ("s2 48->96 k4", 48, 96, 4, 2, 262144), ("1x1 512", 512, 512, 1, 1, 16384),
              ("44k s2 64->128 k4", 64, 128, 4, 2, 430080), ("44k s3 128->256 k6", 128, 256, 6, 3, 215040),
              ("44k s8 256->512 k16", 256, 512, 16, 8, 71680), ("44k s8 512->1024 k16", 512, 1024, 16, 8, 8960)]
    for name, ci, co, k, s, T in shapes:
        x = torch.randn(1, ci, T, device=dev)
        w = torch.randn(co, ci, k, device=dev) / (ci * k) ** 0.5
        b = torch.randn(co, device=dev)
        a = torch.rand(ci, device=dev) + 0.5
        pad = (s + 1) // 2 if s > 1 else 0
        flops = 2 * co * ci * k * ((T + 2 * pad - k) // s + 1)
        print(f"--- {name}: {flops/1e9:.1f} GFLOP", flush=True)
        h = x.double() + torch.sin(a.double().view(1, -1, 1) * x.double()) ** 2 / (a.double().view(1, -1, 1) + 1e-9)
        want = torch.nn.functional.conv1d(h, w.double(), b.double(), stride=s, padding=pad)
        torch.backends.cudnn.allow_tf32 = False
        got = torch.nn.functional.conv1d(h.float(), w, b, stride=s, padding=pad)
        res[f"{name} cudnn fp32 rel err"] = err = ((got.double() - want).abs().max() / want.abs().max()).item()
        print(f"{name} cudnn fp32: max error / max |output| vs float64 = {err:.2e}", flush=True)
        torch.backends.cudnn.allow_tf32 = True
        for split, rows_first in ((True, None), (False, True), (False, False)):
            tag = ("tf32x3 split" if split else "tf32x3 in registers, rows first" if rows_first
                   else "tf32x3 in registers, untransposed")
            form = dict(precision="tf32x3", split=split, rows_first=rows_first)
            t(f"{name} triton snake {tag}", lambda: conv.snake_conv(x, w, b, alpha=a, stride=s, padding=pad, **form))
            t(f"{name} triton nosnake {tag}", lambda: conv.snake_conv(x, w, b, stride=s, padding=pad, **form))
            got = conv.snake_conv(x, w, b, alpha=a, stride=s, padding=pad, **form)
            res[f"{name} {tag} rel err"] = err = ((got.double() - want).abs().max() / want.abs().max()).item()
            print(f"{name} {tag}: max error / max |output| vs float64 = {err:.2e}", flush=True)
        for prec in ("tf32", "ieee"):
            t(f"{name} triton snake {prec}", lambda: conv.snake_conv(x, w, b, alpha=a, stride=s, padding=pad, precision=prec))
            t(f"{name} triton nosnake {prec}", lambda: conv.snake_conv(x, w, b, stride=s, padding=pad, precision=prec))
        torch.backends.cudnn.allow_tf32 = False
        t(f"{name} cudnn fp32", lambda: torch.nn.functional.conv1d(x, w, b, stride=s, padding=pad))
        torch.backends.cudnn.allow_tf32 = True
        t(f"{name} cudnn tf32", lambda: torch.nn.functional.conv1d(x, w, b, stride=s, padding=pad))
        # the same flops as one GEMM, fp32 and tf32
        A = torch.randn(co, ci * k, device=dev); B = torch.randn(ci * k, (T + 2 * pad - k) // s + 1, device=dev)
        torch.backends.cuda.matmul.allow_tf32 = False
        t(f"{name} gemm fp32", lambda: A @ B)
        torch.backends.cuda.matmul.allow_tf32 = True
        t(f"{name} gemm tf32", lambda: A @ B)
        torch.backends.cuda.matmul.allow_tf32 = False
        # tile sweep, snake on, tf32x3
        if k == 16 and ci == 384:
            best = None
            for o, tt, r, wp, st in itertools.product((64, 128), (64, 128), (16, 32), (4,), (3,)):
                cfg = tuning.LaunchConfig({"BLOCK_O": o, "BLOCK_T": tt, "BLOCK_R": r}, wp, st)
                key = tuning.ShapeKey(tuning.CONV, "cuda", ci, co, k, s, 1, tuning.t_bucket((T + 2 * pad - k) // s + 1))
                tuning.TABLE[key] = cfg
                try:
                    fn = lambda: conv.snake_conv(x, w, b, alpha=a, stride=s, padding=pad)
                    fn(); torch.cuda.synchronize()
                    ms = triton.testing.do_bench(fn, rep=30) * 1e3
                except Exception as e:
                    print("fail", cfg, type(e).__name__); continue
                if best is None or ms < best[0]:
                    best = (ms, (o, tt, r, wp, st))
            print(f"{name} best sweep {best}", flush=True)
            res[f"{name} best sweep"] = best
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
