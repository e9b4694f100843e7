"""Where one streaming push's wall time goes, batch 1: the whole push against its parts.

    python bench/push_cost.py [--preset 24khz] [--pushes 200] [--device cuda] [--profile]

For ``model.streaming_encoder()`` and ``streaming_decoder()``, after the warm-up, one unit per push (a coarse
frame at 24 kHz, an attention window of 4 at 32/44 kHz): the p50 wall time of the push, of its unit pass
(``UnitPass.run``: staging the input, the replay, copying the outputs), of the replay alone, of the input check
and of ``model_stamp``, each timed with the device synchronised before and after. On CUDA pushes replay
CUDA graphs (``push_mode="graphs"``); elsewhere they take the same path uncaptured (``"units"``), with no
replay to time. ``--profile`` adds the host functions of back-to-back pushes (cProfile) and, on CUDA, the
device events per push and the operations launched outside the graph (``torch.profiler``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming_cost import commit, median_time, positive_int  # noqa: E402

from snac_stream import PRESETS, SNAC  # noqa: E402
from snac_stream.streaming.graphs import model_stamp  # noqa: E402


def measure(model: SNAC, codec: str, pushes: int, profile: bool) -> Dict[str, float]:
    device, cfg = model.device, model.config
    mode = "graphs" if device.type == "cuda" else "units"
    make = model.streaming_encoder if codec == "encoder" else model.streaming_decoder
    stream = make(push_mode=mode)
    gen = torch.Generator().manual_seed(0)
    if codec == "encoder":
        chunk = (torch.randn(1, 1, stream.unit, generator=gen) * 0.1).to(device)
        check = lambda: model.check_audio(chunk)  # noqa: E731
    else:
        chunk = [torch.randint(0, cfg.codebook_size, (1, stream.unit * cfg.coarse_stride // s), generator=gen).to(device)
                 for s in cfg.vq_strides]
        check = lambda: model.check_codes(chunk, whole_windows=False, allow_empty=True)  # noqa: E731
    row: Dict[str, float] = {}
    with torch.inference_mode():
        for _ in range(stream.warmup_units + 3):  # the warm-up, then the capture and a replay
            stream.push(chunk)
        unit_pass = stream._unit_pass
        assert unit_pass is not None, "the pushes never took the unit pass"
        parts: Dict[str, Callable[[], object]] = {
            "push": lambda: stream.push(chunk),
            "unit_pass": lambda: unit_pass.run(chunk),
            "check": check,
            "model_stamp": lambda: model_stamp(model, stream._parameters, stream.backend),
        }
        if device.type == "cuda":
            parts["replay"] = unit_pass.passes.graph(1).replay
        for name, fn in parts.items():
            row[f"{name}_ms"] = 1e3 * median_time(fn, pushes, device)
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(pushes):
                stream.push(chunk)
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
            print(f"\n### {codec}: host functions of {pushes} pushes back to back\n```\n{out.getvalue().strip()}\n```")
            if device.type == "cuda":
                from torch.profiler import ProfilerActivity
                from torch.profiler import profile as torch_profile

                with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(10):
                        stream.push(chunk)
                    torch.cuda.synchronize(device)
                events = [e for e in prof.events() if e.device_type.name == "CUDA"]
                row["device_events_per_push"] = len(events) / 10
                row["device_us_per_push"] = sum(e.device_time for e in events) / 10
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12,
                                                max_name_column_width=50))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="24khz", choices=sorted(PRESETS))
    parser.add_argument("--pushes", type=positive_int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = SNAC.from_config(args.preset).to(args.device).eval()
    name = torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu"
    print(f"# {args.preset} push parts on {name}, {datetime.now(timezone.utc):%Y-%m-%d}, commit {commit()}, "
          f"torch {torch.__version__}, p50 of {args.pushes} (ms)")
    rows = {codec: measure(model, codec, args.pushes, args.profile) for codec in ("encoder", "decoder")}
    print("\n| codec | push | unit pass | replay alone | input check | model_stamp | device events per push (us) |")
    print("|---|---|---|---|---|---|---|")
    for codec, row in rows.items():
        replay = f"{row['replay_ms']:.3f}" if "replay_ms" in row else "-"
        events = (f"{row['device_events_per_push']:.0f} ({row['device_us_per_push']:.0f})"
                  if "device_events_per_push" in row else "-")
        print(f"| {codec} | {row['push_ms']:.3f} | {row['unit_pass_ms']:.3f} | {replay} | {row['check_ms']:.3f} "
              f"| {row['model_stamp_ms']:.3f} | {events} |")


if __name__ == "__main__":
    main()
