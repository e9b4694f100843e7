"""GPU figures for bench/RESULTS.md: kernels against torch eager, whole-model decode against the reference.

    python bench/gpu_report.py [--json out.json]

Prints markdown tables. Measured ceilings (device-to-device copy, fp32 matmul) are taken in the same run.
Timings are medians of CUDA-event timings (``triton.testing.do_bench``, L2 flushed between runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import all_cases  # noqa: E402
from streaming_cost import commit  # noqa: E402

from snac_stream import SNAC  # noqa: E402


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


def decode_rows(seconds: float = 10.0, batch: int = 1) -> list:
    import snac as reference

    rows = []
    for preset in ("24khz", "32khz", "44khz"):
        torch.manual_seed(0)
        ours = SNAC.from_config(preset).cuda().eval()
        ref = reference.SNAC(**ours.config.to_dict()).cuda().eval()
        cfg = ours.config
        frames = int(seconds * cfg.sampling_rate) // cfg.frame_samples
        frames -= frames % (cfg.pad_multiple // cfg.frame_samples)
        codes = [torch.randint(0, cfg.codebook_size, (batch, frames * cfg.coarse_stride // s), device="cuda")
                 for s in cfg.vq_strides]
        audio = torch.randn(batch, 1, frames * cfg.frame_samples, device="cuda") * 0.1
        row = {"preset": preset, "audio_s": frames * cfg.frame_samples / cfg.sampling_rate, "batch": batch}
        with torch.inference_mode():
            row["reference_decode_ms"] = bench_ms(lambda: ref.decode(codes), rep=300)
            row["reference_encode_ms"] = bench_ms(lambda: ref.encode(audio), rep=300)
            for backend in ("torch", "triton"):
                ours.backend = backend
                row[f"{backend}_decode_ms"] = bench_ms(lambda: ours.decode(codes), rep=300)
                row[f"{backend}_encode_ms"] = bench_ms(lambda: ours.encode(audio), rep=300)
        rows.append(row)
        print(f"| {preset} | {row['audio_s']:.2f} s x{batch} | {row['reference_decode_ms']:.2f} "
              f"| {row['torch_decode_ms']:.2f} | {row['triton_decode_ms']:.2f} "
              f"| {row['reference_decode_ms'] / row['triton_decode_ms']:.2f}x | {row['reference_encode_ms']:.2f} "
              f"| {row['torch_encode_ms']:.2f} | {row['triton_encode_ms']:.2f} "
              f"| {row['reference_encode_ms'] / row['triton_encode_ms']:.2f}x |", flush=True)
    return rows


def streaming_rows(frames: int = 64) -> list:
    """Wall time of one exact streaming decoder push of one coarse frame, batch 1 (host clock, synchronised)."""
    import time

    rows = []
    for preset in ("24khz", "44khz"):
        torch.manual_seed(0)
        model = SNAC.from_config(preset).cuda().eval()
        cfg = model.config
        step = cfg.pad_multiple // cfg.frame_samples  # whole attention windows
        codes = [torch.randint(0, cfg.codebook_size, (1, frames * cfg.coarse_stride // s), device="cuda")
                 for s in cfg.vq_strides]
        row = {"preset": preset, "frames_per_push": step, "samples_per_push": step * cfg.frame_samples}
        for backend in ("torch", "triton"):
            dec = model.streaming_decoder(backend=backend)
            times = []
            with torch.inference_mode():
                for j in range(0, frames, step):
                    chunk = [c[:, j * c.shape[1] // frames : (j + step) * c.shape[1] // frames] for c in codes]
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    dec.push(chunk)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
            times = sorted(times[8:])  # warm-up pushes excluded
            row[f"{backend}_p50_ms"] = 1e3 * times[len(times) // 2]
            row[f"{backend}_p95_ms"] = 1e3 * times[int(len(times) * 0.95)]
        rows.append(row)
        print(f"| {preset} | {row['samples_per_push']} | {row['torch_p50_ms']:.2f} / {row['torch_p95_ms']:.2f} "
              f"| {row['triton_p50_ms']:.2f} / {row['triton_p95_ms']:.2f} |", flush=True)
    return rows


def profile_decode(preset: str = "24khz", seconds: float = 10.0, top: int = 14) -> None:
    """Where the GPU time of one offline decode goes: ours (Triton) against the reference."""
    import snac as reference
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    ours = SNAC.from_config(preset, backend="triton").cuda().eval()
    ref = reference.SNAC(**ours.config.to_dict()).cuda().eval()
    cfg = ours.config
    frames = int(seconds * cfg.sampling_rate) // cfg.frame_samples
    codes = [torch.randint(0, cfg.codebook_size, (1, frames * cfg.coarse_stride // s), device="cuda")
             for s in cfg.vq_strides]
    for name, fn in (("ours (triton)", lambda: ours.decode(codes)), ("reference", lambda: ref.decode(codes))):
        with torch.inference_mode():
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                fn()
                torch.cuda.synchronize()
        print(f"\n### {preset} decode, {name}\n```")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60))
        print("```")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", action="store_true", help="also profile one 24 kHz decode, ours and reference")
    args = parser.parse_args()
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "commit": commit(),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(f"# {meta['device']}, {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, "
          f"triton {meta['triton']}")
    ceil = ceilings()
    print(f"ceilings: copy {ceil['copy_tbps']:.2f} TB/s (read+write), fp32 matmul {ceil['fp32_tflops']:.1f} TFLOP/s")
    print("\n| kernel | shape | Triton (us) | torch eager (us) | speedup | GB/s | TFLOP/s |\n|---|---|---|---|---|---|---|")
    kernels = kernel_rows()
    print("\n| preset | audio | reference decode (ms) | ours torch (ms) | ours Triton (ms) | vs reference "
          "| reference encode (ms) | ours torch (ms) | ours Triton (ms) | vs reference |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    decodes = decode_rows()
    print("\n| preset | samples per push | torch backend p50 / p95 (ms) | Triton backend p50 / p95 (ms) |")
    print("|---|---|---|---|")
    streaming = streaming_rows()
    if args.profile:
        profile_decode()
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "ceilings": ceil, "kernels": kernels, "decode": decodes,
                                         "streaming": streaming},
                                        indent=2))


if __name__ == "__main__":
    main()
