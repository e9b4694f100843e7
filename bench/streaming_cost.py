"""CPU (or GPU) cost of exact streaming against offline encode/decode of the same audio.

Streaming pushes one coarse frame at a time (2048 samples at 24 kHz, 3072 at 32/44 kHz), the chunk a live
stream would use. Each figure is the median of ``--repeats`` runs; the ratio is streaming time over offline
time, measured in the same process on the same input. Random weights (the official ones are not needed
for timing: the arithmetic is the same).

    python bench/streaming_cost.py [--seconds 10] [--presets 24khz 32khz 44khz] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from snac_stream import PRESETS, SNAC
from snac_stream.server.loadtest import source_commit


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` synchronised runs, after one warm-up run."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads"


def positive_int(text: str) -> int:
    """argparse type: a whole number above zero."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def commit() -> str:
    """The checkout's commit, as every report of this project names it (``$SNAC_STREAM_COMMIT`` first)."""
    return source_commit() or "unknown"


def measure(preset: str, seconds: float, repeats: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = SNAC.from_config(preset).to(device).eval()
    cfg = model.config
    F = cfg.frame_samples
    length = int(seconds * cfg.sampling_rate) // cfg.pad_multiple * cfg.pad_multiple
    audio = torch.randn(1, 1, length, device=device) * 0.1
    with torch.inference_mode():
        codes = model.encode(audio)
        frames = codes[0].shape[-1]
        enc = model.streaming_encoder()
        dec = model.streaming_decoder()

        def stream_encode():
            enc.reset()
            for start in range(0, length, F):
                enc.push(audio[..., start : start + F])
            enc.flush()

        def stream_decode():
            dec.reset()
            for j in range(frames):
                dec.push([c[:, j * c.shape[1] // frames : (j + 1) * c.shape[1] // frames] for c in codes])
            dec.flush()

        row = {"preset": preset, "audio_seconds": length / cfg.sampling_rate, "chunk_samples": F}
        row["offline_encode_s"] = median_time(lambda: model.encode(audio), repeats, device)
        row["stream_encode_s"] = median_time(stream_encode, repeats, device)
        row["offline_decode_s"] = median_time(lambda: model.decode(codes), repeats, device)
        row["stream_decode_s"] = median_time(stream_decode, repeats, device)
    row["encode_ratio"] = row["stream_encode_s"] / row["offline_encode_s"]
    row["decode_ratio"] = row["stream_decode_s"] / row["offline_decode_s"]
    row["stream_encode_rtf"] = row["audio_seconds"] / row["stream_encode_s"]
    row["stream_decode_rtf"] = row["audio_seconds"] / row["stream_decode_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length per preset (default 10)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "commit": commit(),
            "device": describe_machine(device), "torch": torch.__version__}
    print(f"# streaming vs offline, {meta['date']}, commit {meta['commit']}, {meta['device']}, torch {meta['torch']}")
    print("| preset | audio | chunk | offline encode | stream encode | ratio | offline decode | stream decode "
          "| ratio | stream real-time factor (enc / dec) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for preset in args.presets:
        r = measure(preset, args.seconds, args.repeats, device)
        rows.append(r)
        print(f"| {preset} | {r['audio_seconds']:.2f} s | {r['chunk_samples']} | {r['offline_encode_s'] * 1e3:.0f} ms "
              f"| {r['stream_encode_s'] * 1e3:.0f} ms | {r['encode_ratio']:.2f}x | {r['offline_decode_s'] * 1e3:.0f} ms "
              f"| {r['stream_decode_s'] * 1e3:.0f} ms | {r['decode_ratio']:.2f}x "
              f"| {r['stream_encode_rtf']:.1f}x / {r['stream_decode_rtf']:.1f}x |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
