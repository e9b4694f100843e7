"""GPU figures for bench/RESULTS.md: kernels against torch eager, whole-model decode and encode at batch 1 against
the reference (ours eager and replaying CUDA graphs), streaming pushes at batch 1 eager against CUDA graphs.

    python bench/gpu_report.py [--sections kernels decode streaming] [--lengths 1 10 60] [--json out.json]

Prints markdown tables. Measured ceilings (device-to-device copy, fp32 matmul) are taken in the same run.
Timings are medians of CUDA-event timings (``triton.testing.do_bench``, L2 flushed between runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import all_cases  # noqa: E402
from streaming_cost import commit  # noqa: E402

from snac_stream import PRESETS, SNAC  # noqa: E402
from snac_stream.kernels import conv  # noqa: E402
from snac_stream.model import functional  # noqa: E402


def bench_ms(fn, rep: int = 200) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def ceilings() -> dict:
    n = 256 * 2**20  # floats: 1 GiB
    a, b = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    a.normal_()
    copy_ms = bench_ms(lambda: b.copy_(a))
    m = torch.randn(8192, 8192, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    mm_ms = bench_ms(lambda: m @ m, rep=100)
    return {"copy_tbps": 2 * n * 4 / copy_ms / 1e9, "fp32_tflops": 2 * 8192**3 / mm_ms / 1e9}


def kernel_rows() -> list:
    rows = []
    for case_id, build in all_cases(torch.device("cuda")).items():
        case = build()
        fused, eager = bench_ms(case.fused), bench_ms(case.eager)
        rows.append({"id": case_id, "name": case.name, "shape": case.shape, "triton_us": fused * 1e3,
                     "torch_us": eager * 1e3, "speedup": eager / fused, "gbps": case.bytes / fused / 1e6,
                     "tflops": case.flops / fused / 1e9})
        print(f"| {case.name} | {case.shape} | {fused * 1e3:.1f} | {eager * 1e3:.1f} | {eager / fused:.1f}x "
              f"| {case.bytes / fused / 1e6:.0f} | {case.flops / fused / 1e9:.1f} |", flush=True)
    return rows


def decode_rows(lengths_s: tuple = (1.0, 10.0, 60.0), batch: int = 1) -> list:
    """Offline decode and encode at batch 1: the reference against ours eager (``offline_graphs=0``) and ours
    replaying the CUDA graph of the call's shape (the default; ``bench_ms``'s warm-up calls capture it)."""
    import snac as reference

    rows = []
    for preset in ("24khz", "32khz", "44khz"):
        torch.manual_seed(0)
        ours = SNAC.from_config(preset).cuda().eval()
        eager = SNAC.from_config(preset, offline_graphs=0).cuda().eval()
        eager.load_state_dict(ours.state_dict())
        ref = reference.SNAC(**ours.config.to_dict()).cuda().eval()
        cfg = ours.config
        for seconds in lengths_s:
            frames = int(seconds * cfg.sampling_rate) // cfg.frame_samples
            frames -= frames % (cfg.pad_multiple // cfg.frame_samples)
            codes = [torch.randint(0, cfg.codebook_size, (batch, frames * cfg.coarse_stride // s), device="cuda")
                     for s in cfg.vq_strides]
            audio = torch.randn(batch, 1, frames * cfg.frame_samples, device="cuda") * 0.1
            row = {"preset": preset, "audio_s": frames * cfg.frame_samples / cfg.sampling_rate, "batch": batch}
            with torch.inference_mode():
                for what, args in (("decode", codes), ("encode", audio)):
                    row[f"reference_{what}_ms"] = bench_ms(lambda: getattr(ref, what)(args), rep=300)
                    row[f"eager_{what}_ms"] = bench_ms(lambda: getattr(eager, what)(args), rep=300)
                    row[f"graphs_{what}_ms"] = bench_ms(lambda: getattr(ours, what)(args), rep=300)
                row["graphs_equal_eager"] = (torch.equal(ours.decode(codes), eager.decode(codes)) and all(
                    torch.equal(a, b) for a, b in zip(ours.encode(audio), eager.encode(audio))))
            row["memory_reserved_gib"] = torch.cuda.memory_reserved() / 2**30
            rows.append(row)
            cells = []
            for what in ("decode", "encode"):
                r, e, g = (row[f"{k}_{what}_ms"] for k in ("reference", "eager", "graphs"))
                cells.append(f"{r:.2f} | {e:.2f} | {g:.2f} | {r / e:.2f}x | **{r / g:.2f}x**")
            print(f"| {preset} | {row['audio_s']:.2f} s x{batch} | {' | '.join(cells)} "
                  f"| {'yes' if row['graphs_equal_eager'] else 'NO'} |", flush=True)
        ours = eager = ref = None  # free this preset's models before the next
        torch.cuda.empty_cache()
    return rows


def _push_times(streams: dict, chunks: list) -> tuple:
    """Host wall time (s) of every push, synchronised before and after, the streams taking turns chunk by chunk
    (the same conditions for each); also every push's outputs, per stream."""
    times = {name: [] for name in streams}
    outputs = {name: [] for name in streams}
    with torch.inference_mode():
        for chunk in chunks:
            for name, stream in streams.items():
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = stream.push(chunk)
                torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
                outputs[name].append(out)
    return times, outputs


def streaming_rows(measured: int = 40) -> list:
    """Wall time of one exact streaming push of one unit (one coarse frame at 24 kHz, one attention window of 4
    at 44 kHz), batch 1, Triton backend: eager pushes against pushes replaying the CUDA graph of the unit pass
    (``push_mode="graphs"``, the default on CUDA), decoder and encoder, after each stream's warm-up."""
    rows = []
    for preset in ("24khz", "44khz"):
        torch.manual_seed(0)
        model = SNAC.from_config(preset).cuda().eval()
        cfg = model.config
        for codec in ("decoder", "encoder"):
            make = model.streaming_decoder if codec == "decoder" else model.streaming_encoder
            streams = {mode: make(push_mode=mode) for mode in ("eager", "graphs")}
            graphs = streams["graphs"]
            warmup = graphs.warmup_units
            count = warmup + 3 + measured  # warm-up (eager in both), the capture, two more before timing
            if codec == "decoder":
                chunks = [[torch.randint(0, cfg.codebook_size, (1, graphs.unit * cfg.coarse_stride // s), device="cuda")
                           for s in cfg.vq_strides] for _ in range(count)]
                samples = graphs.unit * cfg.frame_samples
            else:
                chunks = [torch.randn(1, 1, graphs.unit, device="cuda") * 0.1 for _ in range(count)]
                samples = graphs.unit
            times, outputs = _push_times(streams, chunks)
            row = {"preset": preset, "codec": codec, "samples_per_push": samples, "warmup_pushes": warmup,
                   "capture_ms": 1e3 * times["graphs"][warmup]}
            for mode in streams:
                kept = sorted(times[mode][warmup + 3:])
                row[f"{mode}_p50_ms"] = 1e3 * kept[len(kept) // 2]
                row[f"{mode}_p95_ms"] = 1e3 * kept[int(len(kept) * 0.95)]
            row["speedup"] = row["eager_p50_ms"] / row["graphs_p50_ms"]
            # The replay alone (the GPU's share of a push; the rest is host work: checks, staging, copies).
            graph = graphs._unit_pass.passes.graph(1)
            replays = []
            for _ in range(20):
                torch.cuda.synchronize()
                start = time.perf_counter()
                graph.replay()
                torch.cuda.synchronize()
                replays.append(time.perf_counter() - start)
            row["replay_p50_ms"] = 1e3 * sorted(replays)[len(replays) // 2]
            if codec == "decoder":
                diff = (torch.cat(outputs["graphs"], -1) - torch.cat(outputs["eager"], -1)).abs().max().item()
                row["graphs_vs_eager_max_abs"] = diff
                check = f"max diff {diff:.1e}"
            else:
                same = all(torch.equal(a, b) for ga, ea in zip(outputs["graphs"], outputs["eager"])
                           for a, b in zip(ga, ea))
                row["codes_equal"] = same
                check = "codes equal" if same else "CODES DIFFER"
            rows.append(row)
            print(f"| {preset} | {codec} | {samples} | {row['eager_p50_ms']:.2f} / {row['eager_p95_ms']:.2f} "
                  f"| {row['graphs_p50_ms']:.3f} / {row['graphs_p95_ms']:.3f} | {row['speedup']:.1f}x "
                  f"| {row['replay_p50_ms']:.3f} | {row['capture_ms']:.0f} | {check} |", flush=True)
    return rows


def profile_offline(preset: str = "24khz", seconds: float = 10.0, top: int = 14) -> None:
    """Where the GPU time of one offline decode and one encode at batch 1 goes: ours (Triton, eager, so that
    each kernel shows) against the reference."""
    import snac as reference
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    ours = SNAC.from_config(preset, backend="triton", offline_graphs=0).cuda().eval()  # the kernels, eagerly
    ref = reference.SNAC(**ours.config.to_dict()).cuda().eval()
    cfg = ours.config
    frames = int(seconds * cfg.sampling_rate) // cfg.frame_samples
    frames -= frames % (cfg.pad_multiple // cfg.frame_samples)  # whole attention windows (32/44 kHz)
    codes = [torch.randint(0, cfg.codebook_size, (1, frames * cfg.coarse_stride // s), device="cuda")
             for s in cfg.vq_strides]
    audio = torch.randn(1, 1, frames * cfg.frame_samples, device="cuda") * 0.1
    calls = (("decode", "ours (triton)", lambda: ours.decode(codes)),
             ("decode", "reference", lambda: ref.decode(codes)),
             ("encode", "ours (triton)", lambda: ours.encode(audio)),
             ("encode", "reference", lambda: ref.encode(audio)))
    for what, name, fn in calls:
        with torch.inference_mode():
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                fn()
                torch.cuda.synchronize()
        print(f"\n### {preset} {what}, {seconds:g} s, {name}\n```")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60))
        print("```")


SECTIONS = ("kernels", "decode", "streaming")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", metavar="PRESET", nargs="?", const="24khz", default=None, choices=list(PRESETS),
                        help="also profile one offline decode and encode of 10 s at batch 1, ours and the reference "
                             "(24khz unless a preset is named)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="what to measure (default: all; the ceilings come with kernels)")
    parser.add_argument("--lengths", nargs="+", type=float, default=[1.0, 10.0, 60.0],
                        help="seconds of audio of the offline rows (batch 1)")
    parser.add_argument("--upsampling-product", default="auto", choices=["auto", *functional.UPSAMPLING_PRODUCTS],
                        help="how our decoder multiplies its upsampling's frame pairs (bench/upsampling_cost.py)")
    parser.add_argument("--split-operands", default="rule", choices=["rule", "on", "off"],
                        help="tf32x3 dense convs: operands split before the kernel (on), in registers with the "
                             "rows-first product (off), or the rule (before, for convs with taps)")
    args = parser.parse_args()
    if min(args.lengths) <= 0:
        parser.error("--lengths must be positive (seconds)")
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "commit": commit(),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "upsampling_product": args.upsampling_product, "split_operands": args.split_operands}
    print(f"# {meta['device']}, {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, "
          f"triton {meta['triton']}, upsampling product {args.upsampling_product}, split operands "
          f"{args.split_operands}")
    split = conv.split_operands(args.split_operands == "on") if args.split_operands != "rule" else nullcontext()
    with functional.use_upsampling_product(args.upsampling_product), split:
        report = sections(args, meta)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def sections(args: argparse.Namespace, meta: dict) -> dict:
    """Measure and print ``args.sections``; returns the report."""
    report: dict = {"meta": meta}
    if "kernels" in args.sections:
        ceil = report["ceilings"] = ceilings()
        print(f"ceilings: copy {ceil['copy_tbps']:.2f} TB/s (read+write), "
              f"fp32 matmul {ceil['fp32_tflops']:.1f} TFLOP/s")
        print("\n| kernel | shape | Triton (us) | torch eager (us) | speedup | GB/s | TFLOP/s |"
              "\n|---|---|---|---|---|---|---|")
        report["kernels"] = kernel_rows()
    if "decode" in args.sections:
        print("\n| preset | audio | reference decode (ms) | ours eager | ours graphs | eager vs reference "
              "| graphs vs reference | reference encode (ms) | ours eager | ours graphs | eager vs reference "
              "| graphs vs reference | graphs equal eager |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        report["decode"] = decode_rows(tuple(args.lengths))
    if "streaming" in args.sections:
        print("\n| preset | codec | samples per push | eager p50 / p95 (ms) | CUDA graphs p50 / p95 (ms) | speedup "
              "| replay alone p50 (ms) | first replayed push, with capture (ms) | graphs vs eager |")
        print("|---|---|---|---|---|---|---|---|---|")
        report["streaming"] = streaming_rows()
    if args.profile:
        profile_offline(args.profile)
    return report


if __name__ == "__main__":
    main()
