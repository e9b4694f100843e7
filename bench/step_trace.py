"""One engine step's kernels in launch order, and the step's time with the GPU at its power limit (CUDA only).

    python bench/step_trace.py [--kind decode|encode] [--preset 24khz] [--streams 4096] [--json out.json]

Builds an engine of ``--streams`` streams past their warm-up (random weights), takes the captured graph of its
full step and:

- replays it ``--spaced`` times with 0.3 s of idle GPU between replays, then ``--back-to-back`` times with
  none (as a loaded server steps), timing each replay with CUDA events while ``nvidia-smi`` samples the SM
  clock, power draw and throttle reasons every 250 ms. A step that keeps the GPU at its power limit runs at a
  lower clock than one timed alone, so a step near its budget is judged by the back-to-back figures;
- traces 3 replays with the profiler and prints the middle one's kernels in launch order: duration, the idle
  gap before each, grid, block, registers and shared memory, then the time per kernel name.

``bench/engine_capacity.py --profile`` gives the step's kernel shares; this gives the order, the shapes and
the clock the step actually ran at.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import warm_engine  # noqa: E402
from streaming_cost import commit  # noqa: E402

from snac_stream import SNAC  # noqa: E402

SMI_FIELDS = "clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"


def engine_graph(model: SNAC, kind: str, streams: int):
    """An engine of ``streams`` streams past their warm-up and its full step's captured graph."""
    engine = warm_engine(model, kind, streams, "graphs", queued=3, ran=2)
    torch.cuda.synchronize()
    passes = engine._bucket_passes
    return engine, passes.graph(max(passes.captured()))


def replay_times(graph, count: int, idle_s: float) -> list:
    """Milliseconds of each of ``count`` replays (CUDA events), ``idle_s`` of idle GPU after each."""
    times = []
    for _ in range(count):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
        if idle_s:
            time.sleep(idle_s)
    return times


def summary(times: list) -> dict:
    ordered = sorted(times)
    q = lambda p: ordered[min(len(ordered) - 1, int(p * len(ordered)))]  # noqa: E731
    return {"p50_ms": q(0.5), "p95_ms": q(0.95), "min_ms": ordered[0], "max_ms": ordered[-1]}


def smi_samples(lines: list) -> list:
    """``nvidia-smi`` CSV lines as dicts: SM clock (MHz), power (W), temperature (C), throttle reasons."""
    out = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            out.append({"sm_mhz": float(parts[0].split()[0]), "power_w": float(parts[1].split()[0]),
                        "temp_c": float(parts[2]), "throttle": parts[3]})
        except ValueError:
            continue
    return out


def sampled(fn):
    """``fn()``'s result and ``nvidia-smi``'s samples (:func:`smi_samples`) taken every 250 ms while it ran."""
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader", "-lms", "250"],
                           stdout=subprocess.PIPE, text=True)
    try:
        result = fn()
    finally:
        smi.terminate()
    return result, smi_samples(smi.communicate()[0].splitlines())


def trace_kernels(graph, replays: int = 3) -> list:
    """The middle replay's GPU activities in launch order: (name, duration us, idle gap before it us, grid,
    block, registers per thread, shared memory bytes), from a profiler trace of ``replays`` replays."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    events = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                    key=lambda e: e["ts"])
    per = len(events) // replays
    rows, previous_end = [], None
    for e in events[(replays // 2) * per:(replays // 2 + 1) * per]:
        args = e.get("args", {})
        gap = 0.0 if previous_end is None else e["ts"] - previous_end
        previous_end = e["ts"] + e["dur"]
        rows.append({"name": e["name"], "us": e["dur"], "gap_us": gap, "grid": args.get("grid"),
                     "block": args.get("block"), "registers": args.get("registers per thread"),
                     "shared_memory": args.get("shared memory")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=["decode", "encode"], default="decode")
    parser.add_argument("--preset", default="24khz")
    parser.add_argument("--streams", type=int, default=4096)
    parser.add_argument("--spaced", type=int, default=15, help="replays with 0.3 s idle after each")
    parser.add_argument("--back-to-back", type=int, default=60, help="replays with no idle between")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: the step's graph, its trace and nvidia-smi")
    if args.streams < 1 or args.spaced < 1 or args.back_to_back < 1:
        parser.error("--streams, --spaced and --back-to-back must be at least 1")
    torch.manual_seed(0)
    model = SNAC.from_config(args.preset).to("cuda").eval()
    engine, graph = engine_graph(model, args.kind, args.streams)
    budget_ms = 1e3 * engine.step_samples / model.config.sampling_rate
    spaced, spaced_smi = sampled(lambda: replay_times(graph, args.spaced, 0.3))
    back, loaded = sampled(lambda: replay_times(graph, args.back_to_back, 0.0))
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "kind": args.kind,
              "preset": args.preset, "streams": args.streams, "budget_ms": budget_ms,
              "spaced": summary(spaced), "back_to_back": summary(back), "back_to_back_ms": back,
              "smi_spaced": spaced_smi, "smi_back_to_back": loaded}
    print(f"# {args.preset} {args.kind}, {args.streams} streams, {report['device']}, {report['date']}, "
          f"commit {report['commit']}; step budget {budget_ms:.2f} ms")
    for label, times, samples in (("spaced (0.3 s idle after each)", spaced, spaced_smi),
                                  ("back to back", back, loaded)):
        s = summary(times)
        print(f"replay, {label}: p50 {s['p50_ms']:.2f} ms, p95 {s['p95_ms']:.2f}, min {s['min_ms']:.2f}, "
              f"max {s['max_ms']:.2f} ({len(times)} replays)")
        if samples:
            clocks = sorted(x["sm_mhz"] for x in samples)
            power = sorted(x["power_w"] for x in samples)
            print(f"  nvidia-smi, {len(samples)} samples: SM clock {clocks[0]:.0f}-{clocks[-1]:.0f} MHz (median "
                  f"{clocks[len(clocks) // 2]:.0f}), power {power[0]:.0f}-{power[-1]:.0f} W (median "
                  f"{power[len(power) // 2]:.0f}), throttle reasons "
                  + ", ".join(sorted({x["throttle"] for x in samples})))
    rows = trace_kernels(graph)
    report["kernels"] = rows
    busy = sum(r["us"] for r in rows)
    gaps = sum(r["gap_us"] for r in rows)
    print(f"\ntraced replay: {len(rows)} kernels, {busy / 1e3:.2f} ms busy, {gaps / 1e3:.2f} ms idle between them")
    print("| # | kernel | ms | gap before (us) | grid | block | registers | shared memory (B) |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        print(f"| {i} | {r['name'][:60]} | {r['us'] / 1e3:.3f} | {r['gap_us']:.1f} | {r['grid']} | {r['block']} "
              f"| {r['registers']} | {r['shared_memory']} |")
    by_name = collections.Counter()
    for r in rows:
        by_name[r["name"][:60]] += r["us"]
    print("\n| kernel | launches | ms | share |")
    print("|---|---|---|---|")
    for name, us in by_name.most_common():
        print(f"| {name} | {sum(r['name'][:60] == name for r in rows)} | {us / 1e3:.3f} | {100 * us / busy:.1f} % |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
