"""A server tick's host work per session: what the engine thread spends around the engine steps.

    python bench/tick_host.py [--kind roundtrip|decode] [--sessions 16 64 256] [--device cpu|cuda]
                              [--preset 24khz] [--small] [--ticks 8] [--profile] [--overlap on|off|both]
                              [--gc serving|default|both] [--json out.json]

Builds the server's engine set (:class:`snac_stream.server.worker.EngineSet`: the encode and decode engines and
their lanes) for N sessions and runs ticks as the server's engine thread does. Roundtrip sessions: before each
tick every session's inbox gets one step of audio in ``--message-samples`` pieces (480: 20 ms messages at
24 kHz, the step's last piece shorter; a whole step: what the connection side hands over, whole steps at a
time); the tick submits it, steps both engines (the encoder's codes go on to the decoder in the same tick)
and turns the outputs into the sessions' frames (tokens and PCM16). Decode sessions (an LLM's tokens, as
Orpheus-style TTS sends them): each inbox gets one step of codes, as the connection side hands them over
(whole steps at a time); the tick decodes and sends PCM16. The tick's time less the
engine steps' time is its host work: the lanes' Python per session (inboxes, step markers, token layouts,
PCM conversion, frame headers). That work, times the sessions, must fit in a step beside the
GPU's; this measures it per session. ``--small`` narrows the model (host work does not depend on the widths,
the CPU's compute does); ``--profile`` prints the functions the host work spends its time in (cProfile).

On a GPU the tick overlaps its host work with the steps (server/worker.py): ticks run back to back, as under
load, and "engine steps" is the device time of the steps a tick finished (the decode step launched by the
tick before among them), so "host" is what the overlap leaves exposed, and may fall below zero when the
device's work also covered the feed before the tick. ``--overlap off`` waits for every step (the A/B).
"Engine thread CPU" and "blocked on the GPU" split the tick as ``snac-stream bench-latency`` does for the
server's ticks: with no other thread here they add up to the tick, so a server tick that takes longer at the
same CPU time waited for the interpreter lock or a core. "gc per tick" is the process's time in cyclic garbage
collection per feed and tick (its mean: collections are rare and long), with the server's thresholds
(``snac_stream.server.heap``) or CPython's (``--gc``).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming_cost import commit, describe_machine, positive_int  # noqa: E402

from snac_stream import PRESETS, SNAC  # noqa: E402
from snac_stream.protocol import Hello  # noqa: E402
from snac_stream.server.heap import GC_CLOCK, freeze_heap, thaw_heap  # noqa: E402
from snac_stream.server.session import Session  # noqa: E402
from snac_stream.server.stats import new_stats  # noqa: E402
from snac_stream.server.worker import EngineSet  # noqa: E402
from snac_stream.tokens import get_layout  # noqa: E402

MESSAGE_SAMPLES = 480  # 20 ms at 24 kHz, the load test's and a voice agent's message
DEFAULT_GC_THRESHOLDS = gc.get_threshold()  # CPython's, as this process started
PROFILE_ROWS = 25  # functions listed by --profile


def build(preset: str, small: bool, device: str) -> SNAC:
    torch.manual_seed(0)
    structure = PRESETS[preset].to_dict()
    if small:
        structure.update(encoder_dim=4, decoder_dim=16)
    return SNAC(**structure).to(device).eval()


def measure(model: SNAC, sessions: int, ticks: int, profile: bool, kind: str = "roundtrip", overlap: bool = True,
            message_samples: int = MESSAGE_SAMPLES, gc_thresholds: str = "serving") -> Dict[str, Any]:
    stats = new_stats()
    engines = EngineSet(model, sessions, stats)
    for engine in (engines.encoder, engines.decoder):  # off: every step waits for its outputs (the A/B)
        engine.async_output = engine.async_output and overlap
    cfg = model.config
    step = engines.step_samples
    size = min(message_samples, step)
    pieces = [size] * (step // size) + ([step % size] if step % size else [])
    rng = np.random.default_rng(sessions)
    group: List[Session] = []
    for number in range(sessions):
        session = Session(None, number + 1)  # type: ignore[arg-type]
        session.hello = Hello(kind=kind)
        session.layout = get_layout(session.hello.token_layout, cfg)
        session.audio_format = "pcm16"
        engines.open(session)
        group.append(session)
    audio = (0.1 * rng.standard_normal(step)).astype(np.float32)
    # One step of coarse frames, as the connection side hands them over (flattened, every level side by side).
    step_codes = rng.integers(0, cfg.codebook_size, engines.step_frames * cfg.frame_codes)
    step_tokens = step_codes.size

    def feed() -> None:
        now = time.perf_counter()
        for session in group:
            if kind == "decode":
                session.loop.received += step_tokens
                session.inbox.append((step_codes, session.loop.received, now))
                continue
            start = 0
            for size in pieces:
                session.loop.received += size
                session.inbox.append((audio[start:start + size], session.loop.received, now))
                start += size

    warm = max(engines.encoder.warmup_steps, 1) + max(engines.decoder.warmup_steps, 1) + 2
    for _ in range(warm):  # past the engines' warm-up: every later tick emits tokens and audio for everyone
        feed()
        engines.tick([], group, [])
    freeze_heap()  # as the server does once started
    if gc_thresholds == "default":
        gc.set_threshold(*DEFAULT_GC_THRESHOLDS)
    collected = GC_CLOCK.seconds
    totals, cycles, steps, frames, cpus, blocks = [], [], [], [], [], []
    profiler = cProfile.Profile() if profile else None
    for _ in range(ticks):  # back to back, as under load: a tick's last step runs on into the next feed and tick
        c0 = time.perf_counter()
        feed()
        if profiler is not None:
            profiler.enable()
        t0 = time.perf_counter()
        events, _, _, _ = engines.tick([], group, [])
        totals.append(time.perf_counter() - t0)
        cycles.append(time.perf_counter() - c0)
        if profiler is not None:
            profiler.disable()
        steps.append(stats["step_s"][-1])
        cpus.append(stats["tick_parts_s"][-1][1])
        blocks.append(stats["tick_parts_s"][-1][2])
        frames.append(len(events))
    collected = GC_CLOCK.seconds - collected
    engines.tick([], [], [])  # the step left running
    thaw_heap()
    host = [t - s for t, s in zip(totals, steps)]
    row = {"kind": kind, "sessions": sessions, "ticks": ticks, "message_samples": size,
           "overlap": overlap and model.device.type == "cuda", "gc_thresholds": gc_thresholds,
           "gc_ms": 1e3 * collected / ticks,
           "tick_ms": 1e3 * statistics.median(totals), "cycle_ms": 1e3 * statistics.median(cycles),
           "engine_steps_ms": 1e3 * statistics.median(steps), "host_ms": 1e3 * statistics.median(host),
           "host_us_per_session": 1e6 * statistics.median(host) / sessions,
           "thread_cpu_ms": 1e3 * statistics.median(cpus), "blocked_ms": 1e3 * statistics.median(blocks),
           "frames_per_tick": statistics.median(frames)}
    if profiler is not None:
        listing = pstats.Stats(profiler)
        listing.sort_stats("tottime")
        top = []
        by_own_time = sorted(listing.stats.items(), key=lambda kv: -kv[1][2])
        for (file, line, name), (cc, nc, tt, ct, _) in by_own_time[:PROFILE_ROWS]:
            top.append({"function": f"{Path(file).name}:{line}({name})", "calls": nc,
                        "own_ms_per_tick": 1e3 * tt / ticks, "cumulative_ms_per_tick": 1e3 * ct / ticks})
        row["profile"] = top
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="roundtrip", choices=["roundtrip", "decode"])
    parser.add_argument("--sessions", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="24khz", choices=sorted(PRESETS))
    parser.add_argument("--small", action="store_true", help="narrow layers (host work is the same)")
    parser.add_argument("--ticks", type=int, default=8)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--overlap", default="on", choices=["on", "off", "both"],
                        help="GPU: steps overlapping the host work (the server's way), every step waited for, "
                             "or both one after the other")
    parser.add_argument("--message-samples", type=positive_int, default=MESSAGE_SAMPLES,
                        help="roundtrip: samples per inbox piece, 480 (20 ms messages) or a whole step (2048 or "
                             "more: what the connection side hands over, whole steps at a time)")
    parser.add_argument("--gc", default="serving", choices=["serving", "default", "both"],
                        help="the garbage collector's thresholds: the server's (snac_stream.server.heap), "
                             "CPython's default, or both one after the other")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = build(args.preset, args.small, args.device)
    machine = describe_machine(torch.device(args.device))
    print(f"# tick host work, {args.kind} sessions, {args.preset}{' (narrow layers)' if args.small else ''} on {args.device}; "
          f"{machine}; commit {commit()}")
    print("| sessions | overlap | tick (ms) | feed + tick (ms) | engine steps (ms) | host (ms) | host per session (us) "
          "| engine thread CPU (ms) | blocked on the GPU (ms) | gc thresholds | gc per tick (ms) | frames per tick |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for n in args.sessions:
        for overlap in {"on": [True], "off": [False], "both": [False, True]}[args.overlap]:
            for thresholds in {"serving": ["serving"], "default": ["default"], "both": ["default", "serving"]}[args.gc]:
                row = measure(model, n, args.ticks, args.profile, args.kind, overlap, args.message_samples,
                              thresholds)
                rows.append(row)
                print(f"| {n} | {'yes' if row['overlap'] else 'no'} | {row['tick_ms']:.1f} | {row['cycle_ms']:.1f} | "
                      f"{row['engine_steps_ms']:.1f} | {row['host_ms']:.2f} | {row['host_us_per_session']:.1f} | "
                      f"{row['thread_cpu_ms']:.1f} | {row['blocked_ms']:.1f} | {thresholds} | {row['gc_ms']:.2f} | "
                      f"{row['frames_per_tick']:.0f} |", flush=True)
    if args.profile:
        for row in rows:
            print(f"\n## {row['sessions']} sessions: top functions by own time per tick (cProfile)")
            print("| function | calls per tick | own (ms) | cumulative (ms) |\n|---|---|---|---|")
            for p in row["profile"]:
                print(f"| {p['function']} | {p['calls'] / args.ticks:.0f} | {p['own_ms_per_tick']:.2f} | "
                      f"{p['cumulative_ms_per_tick']:.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine, "commit": commit(), "kind": args.kind,
                                         "preset": args.preset,
                                         "small": args.small, "device": args.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
