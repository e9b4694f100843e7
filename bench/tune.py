"""Tune the conv kernels' launch parameters for the layer shapes a real model uses (GPU only).

    python bench/tune.py [--presets 24khz 44khz] [--seconds 10] [--min-kernel-size 2] [--json out.json]
    python bench/tune.py --engine-streams 2048 [--engine-kinds decode encode] ...
    python bench/tune.py ... --json more.json --resume cut_short.json
    python bench/tune.py --engine-streams 2048 --kernels snake_conv_rows_first ...
    python bench/tune.py --engine-streams 4096 --kernels snake_dwconv ...
    python bench/tune.py --presets 44khz --split-operands off ...

Runs one offline encode and decode per preset with the Triton backend (or, with ``--engine-streams N``, one
batched step of N streams of each engine kind: the flat launches of a server's step), records every
``snake_conv`` call and depthwise launch, then times each distinct layer shape under a set of candidate
configs (CUDA-event medians) and prints the winners as ``kernels/tuning.py`` TABLE entries (``many_rows`` for
an engine step's); each shape's default and best times are printed as it finishes (and written to ``--json``,
which ``bench/engine_capacity.py --tuning-json`` reads), for bench/RESULTS.md rather than the code. Shapes run
slowest first, so a sweep cut short has covered the ones that matter; ``--resume`` keeps an earlier sweep's
shapes and sweeps the rest (compiling every tiling takes minutes). ``--min-kernel-size 2`` keeps the
convs with more than one tap: in tf32x3 those take the split-operand path, whose best tiles differ from the 1x1 convs'.
The 1x1 convs' rows-first launches (tf32x3 on CUDA) are entries of their own (``snake_conv_rows_first``).
``--kernels snake_dwconv`` sweeps the depthwise kernel's tiles instead (the residual units' snake + depthwise
conv + snake, and the decoder's last conv, which sums its channels in the same kernel).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
from pathlib import Path
from typing import Callable, List, NamedTuple, Sequence, Tuple

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import warm_engine  # noqa: E402

from snac_stream import SNAC  # noqa: E402
from snac_stream.kernels import conv as conv_kernels  # noqa: E402
from snac_stream.kernels import tuning  # noqa: E402
from snac_stream.model import functional  # noqa: E402

CANDIDATES = [
    tuning.LaunchConfig({"BLOCK_O": o, "BLOCK_T": t, "BLOCK_R": r}, num_warps=w, num_stages=s)
    for o, t, r, w, s in itertools.product((64, 128), (64, 128), (16, 32, 64), (4,), (3,))
]
# An engine step's launches tile (stream, frame) pairs; 8 warps and 32-frame tiles join the sweep there.
ENGINE_CANDIDATES = CANDIDATES + [
    tuning.LaunchConfig({"BLOCK_O": o, "BLOCK_T": t, "BLOCK_R": r}, num_warps=8, num_stages=3)
    for o, t, r in itertools.product((128,), (64, 128), (16, 32))
] + [tuning.LaunchConfig({"BLOCK_O": 64, "BLOCK_T": 32, "BLOCK_R": r}, num_warps=4, num_stages=3) for r in (16, 32)]


def dwconv_candidates(channels: int, reduce: bool) -> List[tuning.LaunchConfig]:
    """Tilings of the depthwise kernel (``snake_dwconv``), with 4 or 8 warps. Plain launches take 2K to 8K
    elements a tile, from 16 channels x 128 frames to 2 x 1024 (a long window re-reads less of the halo, a
    short one leaves fewer lanes idle past the last output), with the window (``launch_config`` drops it where
    the halo does not fit), and four 4K tiles without (a load and a snake per tap instead of rotating the
    window through shared memory). A reducing launch (the decoder's last conv) steps through its channels in
    each program: 1K to 8K elements a step, from every channel at once (the rule) to 4 channels x 512 frames."""
    if reduce:
        widest = 1 << max(0, channels - 1).bit_length()
        return [tuning.LaunchConfig({"BLOCK_C": c, "BLOCK_T": t, "WINDOW": 1}, num_warps=w)
                for t in (64, 128, 256, 512) for c in (4, 8, 16, 32, 64, 128, 256)
                if c <= widest and 1024 <= c * t <= 8192 for w in (4, 8)]
    return [tuning.LaunchConfig({"BLOCK_C": c, "BLOCK_T": t, "WINDOW": 1}, num_warps=w)
            for t in (128, 256, 512, 1024) for c in (2, 4, 8, 16, 32, 64)
            if c <= channels and 2048 <= c * t <= 8192 for w in (4, 8)] + [
        tuning.LaunchConfig({"BLOCK_C": c, "BLOCK_T": 4096 // c, "WINDOW": 0}, num_warps=4)
        for c in (4, 8, 16, 32) if c <= channels]


MIN_US = 40  # shapes faster than this by default are not worth a sweep
KEEP_BELOW = 0.95  # a tiling becomes a table entry when it takes under this share of the default's time


def record_key(key: tuning.ShapeKey) -> list:
    """A shape's ``key`` in the ``--json`` records."""
    return [key.c_in, key.c_out, key.kernel_size, key.stride, key.dilation, key.t_bucket, key.many_rows]


def winning_entries(shapes: Sequence[dict]) -> List[Tuple[tuning.ShapeKey, tuning.LaunchConfig]]:
    """The ``kernels/tuning.py`` entries that a sweep's records (``--json``'s "shapes") justify: the tilings
    more than 5 % faster than the default rule. ``bench/engine_capacity.py --tuning-json`` adds the same."""
    return [(tuning.ShapeKey(shape.get("kernel", tuning.CONV), "cuda", *shape["key"]),
             tuning.LaunchConfig(shape["best"][0], num_warps=shape["best"][1], num_stages=shape["best"][2]))
            for shape in shapes if shape["best"] is not None and shape["best_us"] < KEEP_BELOW * shape["default_us"]]


class Recorded(NamedTuple):
    """A recorded launch: ``run()`` launches it again (same inputs; a depthwise launch rewrites ``out``, a dense
    call returns a new output); ``reduce``: a depthwise launch summing its channels; ``out``: its first output."""

    run: Callable[[], object]
    reduce: bool
    out: torch.Tensor


def record_calls(presets, seconds, engine_streams=0, engine_kinds=("decode",), device="cuda"):
    """The first ``snake_conv`` call and depthwise launch (``snake_dwconv``, the decoder's reducing last conv
    included) of each layer shape, their arguments kept, from offline calls of ``seconds`` of audio or, with
    ``engine_streams``, from one batched step of that many streams per engine kind (warmed up first, outside
    the recording). Values: :class:`Recorded`."""
    calls = {}
    original = conv_kernels.snake_conv
    original_dwconv = conv_kernels._launch_dwconv
    recording = [False]

    def dwconv_recorder(src, weight, bias, alpha, alpha_out, out, **kw):
        original_dwconv(src, weight, bias, alpha, alpha_out, out, **kw)
        if recording[0]:
            reduce = kw.get("reduce", False)
            key = tuning.ShapeKey(tuning.DWCONV, "cuda", src.x.shape[1], 1 if reduce else src.x.shape[1],
                                  weight.shape[2], 1, kw["dilation"], tuning.t_bucket(out.shape[-1]),
                                  src.x.shape[0] > 1)
            calls.setdefault(key, Recorded(lambda: original_dwconv(src, weight, bias, alpha, alpha_out, out, **kw),
                                           reduce, out))

    def recorder(x, weight, bias=None, **kw):
        c_out, c_in, k = weight.shape
        out = original(x, weight, bias, **kw)
        form = conv_kernels.product_form(k, kw.get("precision"), x.device, split=kw.get("split"),
                                         rows_first=kw.get("rows_first"))
        kernel = tuning.CONV_ROWS_FIRST if form == "rows_first" else tuning.CONV  # the table's key for its tiles
        key = tuning.ShapeKey(kernel, "cuda", c_in, c_out, k, kw.get("stride", 1), kw.get("dilation", 1),
                              tuning.t_bucket(out.shape[-1]), x.shape[0] > 1)
        if c_out > 1 and recording[0]:
            calls.setdefault(key, Recorded(lambda: original(x, weight, bias, **kw), False, out))
        return out

    conv_kernels.snake_conv = recorder
    conv_kernels._launch_dwconv = dwconv_recorder
    try:
        for preset in presets:
            torch.manual_seed(0)
            model = SNAC.from_config(preset, backend="triton").to(device).eval()
            cfg = model.config
            with torch.inference_mode():
                if not engine_streams:
                    n = int(seconds * cfg.sampling_rate) // cfg.pad_multiple * cfg.pad_multiple
                    recording[0] = True
                    codes = model.encode(torch.randn(1, 1, n, device=device) * 0.1)
                    model.decode(codes)
                    continue
                for kind in engine_kinds:
                    engine = warm_engine(model, kind, engine_streams, "buckets")
                    recording[0] = True
                    engine.step()
                    recording[0] = False
    finally:
        conv_kernels.snake_conv = original
        conv_kernels._launch_dwconv = original_dwconv
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["24khz"])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--min-kernel-size", type=int, default=1)
    parser.add_argument("--kernels", nargs="+", default=[tuning.CONV, tuning.CONV_ROWS_FIRST],
                        choices=[tuning.CONV, tuning.CONV_ROWS_FIRST, tuning.DWCONV],
                        help="which launches' entries to sweep (default the dense kernel's two; "
                             "snake_conv_rows_first: only the rows-first products, the 1x1 convs and upsampling "
                             "products on CUDA; snake_dwconv: the depthwise kernel's launches)")
    parser.add_argument("--engine-streams", type=int, default=0,
                        help="tune the launches of one engine step of this many streams instead of offline calls")
    parser.add_argument("--engine-kinds", nargs="+", default=["decode"], choices=["decode", "encode"])
    parser.add_argument("--upsampling-product", default="auto", choices=["auto", *functional.UPSAMPLING_PRODUCTS],
                        help="the decoder upsampling's product form (default auto, the model's): its dense-conv "
                             "launches are recorded where the form has them")
    parser.add_argument("--split-operands", default="rule", choices=["rule", "on", "off"],
                        help="tf32x3 dense convs: operands split before the kernel (on), in registers with the "
                             "rows-first product (off), or the rule; recorded and swept that way")
    parser.add_argument("--json", help="write every shape's default and best times here")
    parser.add_argument("--resume", type=Path,
                        help="an earlier --json file: its shapes are kept as they are and not swept again (a sweep "
                             "cut short goes on where it stopped)")
    args = parser.parse_args()
    if args.engine_streams < 0:
        parser.error("--engine-streams must be at least 1 (or 0: offline calls)")
    report: List[dict] = []
    if args.resume:
        try:
            report = json.loads(args.resume.read_text())["shapes"]
            winning_entries(report)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            parser.error(f"--resume {args.resume}: not a bench/tune.py --json file ({exc!r})")
    held = contextlib.ExitStack()  # to the end of main: the recorded calls are timed again below
    if args.split_operands != "rule":
        held.enter_context(conv_kernels.split_operands(args.split_operands == "on"))
    done = {(shape.get("kernel", tuning.CONV), *shape["key"]) for shape in report}
    with functional.use_upsampling_product(args.upsampling_product):
        recorded = record_calls(args.presets, args.seconds, args.engine_streams, args.engine_kinds)
    calls = {k: v for k, v in recorded.items()
             if k.kernel_size >= args.min_kernel_size and k.kernel in args.kernels
             and (k.kernel, *record_key(k)) not in done}
    if done:
        print(f"# {len(done)} shapes kept from {args.resume}", flush=True)
    dense = ENGINE_CANDIDATES if args.engine_streams else CANDIDATES

    def candidates(key: tuning.ShapeKey, reduce: bool) -> List[tuning.LaunchConfig]:
        return dwconv_candidates(key.c_in, reduce) if key.kernel == tuning.DWCONV else dense

    print(f"# {torch.cuda.get_device_name()}: {len(calls)} shapes ("
          + ", ".join(f"{kernel} {sum(k.kernel == kernel for k in calls)}" for kernel in args.kernels) + ")",
          flush=True)
    defaults = {}
    for key, (run, _, _) in calls.items():
        tuning.TABLE.pop(key, None)
        defaults[key] = triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")
    for key in sorted(calls, key=lambda k: -defaults[k]):
        run, reduce, _ = calls[key]
        default_ms = defaults[key]
        best = (default_ms, None)
        if default_ms * 1e3 < MIN_US:
            continue
        for cand in candidates(key, reduce):
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
        report.append({"kernel": key.kernel, "key": record_key(key), "default_us": default_ms * 1e3,
                       "best_us": best[0] * 1e3,
                       "best": None if best[1] is None else [best[1].blocks, best[1].num_warps, best[1].num_stages]})
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "shapes": report}, f, indent=1)
    print("\n# TABLE entries (paste into kernels/tuning.py)")
    for key, cfg in winning_entries(report):
        print(f"    ShapeKey({key.kernel!r}, 'cuda', {key.c_in}, {key.c_out}, {key.kernel_size}, {key.stride}, "
              f"{key.dilation}, {key.t_bucket}{', True' if key.many_rows else ''}): "
              f"LaunchConfig({cfg.blocks}, num_warps={cfg.num_warps}, num_stages={cfg.num_stages}),")


if __name__ == "__main__":
    main()
