"""Client audio formats on the server: the latency each conversion adds and its CPU cost per stream.

For each format a session may speak (``docs/protocol.md``, "Formats and sample rates") and both directions,
through the server's own per-session conversion (:class:`snac_stream.server.conversion.SessionFormats`, which
runs :mod:`snac_stream.formats`' stream objects), against a 24 kHz model:

* **added latency**: what ``ready`` announces (the converters' ``latency_samples``, at the client's rate) and
  what is measured: the worst, over 2 s pushed in 1 ms pieces (Opus input: the sender's 20 ms pages), of the
  audio that went in minus the audio that came out. Opus bytes are timed by decoding them without
  resampling (48 kHz), so only the conversion's own delay counts, not the sender's page.
* **CPU per stream**: process CPU time (``time.process_time``: every thread, the Opus encoder's thread-pool
  work included) per second of audio, as the server runs it: input in 20 ms client messages (decoded on the
  event loop, as ``Gateway._on_audio`` does), output in engine frames of one coarse frame (2048 samples,
  85.3 ms) handed to ``SessionFormats.take`` (Opus: each frame coded in the loop's thread pool, as in the
  server). PCM at the model's rate is not converted by the session: its figure is the protocol's own
  ``decode_audio`` / ``audio_payload`` (the lanes convert output per batch). Median of ``--repeats`` runs;
  the session's set-up (soxr streams, the Opus codec) is timed apart.

The input signal is synthetic speech-like audio (a gliding harmonic voice in syllables, noise bursts), the
same every run. Run it alone on the machine: the figures are CPU time, but a busy machine slows caches and
clocks.

    python bench/format_cost.py [--seconds 20] [--repeats 5] [--json bench/results/format_cost_cpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming_cost import cpu_name  # noqa: E402

from snac_stream import client as ws_client
from snac_stream.formats import OPUS_RATE, InputDecoder
from snac_stream.protocol import (AUDIO_FORMATS, CONTAINER_FORMATS, HEADER, PAYLOAD_AUDIO, Hello, audio_payload,
                                  dumps)
from snac_stream.server.conversion import SessionFormats
from snac_stream.server.loadtest import source_commit

MODEL_RATE = 24000
FRAME = 2048  # one coarse frame of the 24 kHz model: what one engine step hands over
MESSAGE_MS = 20  # a live client's message
# (label, format, client rate)
CASES: List[Tuple[str, str, int]] = [
    ("pcm16 at the model's rate (24 kHz)", "pcm16", 24000),
    ("pcm16 16 kHz", "pcm16", 16000),
    ("float32 44.1 kHz", "float32", 44100),
    ("mu-law 8 kHz", "mulaw", 8000),
    ("A-law 8 kHz", "alaw", 8000),
    ("Opus, Ogg, 48 kHz (24 kbps)", "opus", 48000),
    ("Opus, WebM, 48 kHz (24 kbps)", "webm", 48000),
]


def describe_cpu() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores"


def speechlike(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """Mono float32: a harmonic voice gliding 100-220 Hz in 4 Hz syllables, with noise bursts (fricatives)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 160 + 60 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 30) if k * 220 < rate / 2)
    syllables = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 2
    noise = rng.standard_normal(t.shape[0]) * (np.sin(2 * np.pi * 1.3 * t) > 0.8)
    x = 0.25 * voice * syllables + 0.05 * noise
    return (x / np.abs(x).max() * 0.8).astype(np.float32)


def client_messages(fmt: str, rate: int, seconds: float, ms: int) -> List[bytes]:
    """What a client sends: the signal in ``fmt`` at ``rate``, ``ms`` a message (Opus: one page a message), as
    :func:`snac_stream.client.client_messages` codes it (no resampling, only the format)."""
    return ws_client.client_messages(speechlike(seconds, rate), fmt, rate, rate * ms // 1000).payloads


# ---- CPU per stream ------------------------------------------------------------------------------------------
def input_cost(fmt: str, rate: int, messages: List[bytes]) -> Tuple[float, float]:
    """(CPU s of decoding ``messages`` as the server does, CPU s of the session's set-up)."""
    t0 = time.process_time()
    formats = SessionFormats(Hello(kind="encode", sample_format=fmt, sample_rate=rate), MODEL_RATE)
    setup = time.process_time() - t0
    received = 0
    t0 = time.process_time()
    for payload in messages:  # Gateway._on_audio / _deliver_audio
        samples = formats.decode(payload)
        if samples.size:
            received += samples.size
            formats.delivered(received)
    formats.end_input(time.perf_counter())
    return time.process_time() - t0, setup


def output_cost(fmt: str, rate: int, audio: np.ndarray) -> Tuple[float, float]:
    """(CPU s of converting ``audio`` (model rate) frame by frame as the server does, CPU s of set-up)."""
    async def run() -> Tuple[float, float]:
        t0 = time.process_time()
        formats = SessionFormats(Hello(kind="decode", sample_format=fmt, sample_rate=rate), MODEL_RATE)
        setup = time.process_time() - t0
        sent: List[Any] = []
        failed: List[Any] = []
        t0 = time.process_time()
        frames = range(0, audio.shape[0], FRAME)
        for start in frames:
            chunk = audio[start:start + FRAME]
            if formats.converted:
                # The lanes hand a converted session float32 frames; the session converts them on the loop
                # (Opus: in the loop's thread pool, one frame at a time as the frames come one a tick).
                item = HEADER.pack(PAYLOAD_AUDIO, 0, start, start, chunk.shape[0], 0, 0) + chunk.tobytes()
                formats.take(item, sent.append, failed.append)
                await formats.drained()
            else:  # the lanes' own conversion (batched per sample format in the engine thread)
                sent.append(HEADER.pack(PAYLOAD_AUDIO, 0, start, start, chunk.shape[0], 0, 0)
                            + audio_payload(chunk, fmt).tobytes())
        if formats.converted:
            formats.take(dumps({"type": "done", "input_items": 0, "output_samples": audio.shape[0],
                                "output_tokens": 0}), sent.append, failed.append)
            await formats.drained()
        assert not failed, failed
        return time.process_time() - t0, setup

    return asyncio.run(run())


# ---- added latency -------------------------------------------------------------------------------------------
def _content_clock(fmt: str, rate: int) -> Callable[[bytes], float]:
    """Seconds of audio the bytes given so far carry: samples for PCM and G.711, decoded 48 kHz samples (no
    resampler) for Opus."""
    if fmt in CONTAINER_FORMATS:
        ref = InputDecoder(fmt, model_rate=OPUS_RATE)
        total = [0]

        def opus(data: bytes) -> float:
            total[0] += ref.push(data).shape[0] if data else 0
            return total[0] / OPUS_RATE
        return opus
    width, count = AUDIO_FORMATS[fmt], [0]

    def samples(data: bytes) -> float:
        count[0] += len(data) // width
        return count[0] / rate
    return samples


def input_latency(fmt: str, rate: int) -> float:
    """Worst (audio received) - (audio out at the model's rate), in seconds, 1 ms pieces (Opus: 20 ms pages)."""
    formats = SessionFormats(Hello(kind="encode", sample_format=fmt, sample_rate=rate), MODEL_RATE)
    if formats.input is None:
        return 0.0
    clock = _content_clock(fmt, rate)
    out = 0
    worst = 0.0
    for payload in client_messages(fmt, rate, 2.0, 1 if fmt not in CONTAINER_FORMATS else MESSAGE_MS):
        received = clock(payload)
        out += formats.input.push(payload).shape[0]
        worst = max(worst, received - out / MODEL_RATE)
    return worst


def output_latency(fmt: str, rate: int) -> float:
    """Worst (audio pushed at the model's rate) - (audio the bytes out carry), seconds, 1 ms pieces."""
    formats = SessionFormats(Hello(kind="decode", sample_format=fmt, sample_rate=rate), MODEL_RATE)
    if formats.output is None:
        return 0.0
    clock = _content_clock(fmt, rate)
    audio = speechlike(2.0, MODEL_RATE)
    step = MODEL_RATE // 1000
    worst = 0.0
    for start in range(0, audio.shape[0], step):
        carried = clock(formats.output.push(audio[start:start + step]))
        worst = max(worst, (start + step) / MODEL_RATE - carried)
    return worst


# ---- report --------------------------------------------------------------------------------------------------
def measure(label: str, fmt: str, rate: int, seconds: float, repeats: int) -> Dict[str, Any]:
    messages = client_messages(fmt, rate, seconds, MESSAGE_MS)
    model_audio = speechlike(seconds, MODEL_RATE, seed=1)
    inputs = [input_cost(fmt, rate, messages) for _ in range(repeats + 1)][1:]  # the first warms caches up
    outputs = [output_cost(fmt, rate, model_audio) for _ in range(repeats + 1)][1:]
    ready = SessionFormats(Hello(kind="roundtrip", sample_format=fmt, sample_rate=rate), MODEL_RATE).ready_fields()
    row: Dict[str, Any] = {"case": label, "format": fmt, "rate": rate, "seconds": seconds}
    for way, runs, announced, measured in (
            ("input", inputs, ready["input_latency_samples"], input_latency(fmt, rate)),
            ("output", outputs, ready["output_latency_samples"], output_latency(fmt, rate))):
        cpu = statistics.median(r[0] for r in runs)
        row[way] = {"announced_latency_samples": announced, "announced_latency_ms": announced / rate * 1000,
                    "measured_latency_ms": measured * 1000, "cpu_us_per_audio_s": cpu / seconds * 1e6,
                    "core_percent": cpu / seconds * 100, "setup_us": statistics.median(r[1] for r in runs) * 1e6,
                    "cpu_s_runs": [r[0] for r in runs]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="audio per run (default 20)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure, after one warm-up (default 5)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": source_commit() or "unknown",
            "device": describe_cpu(), "model_rate": MODEL_RATE, "python": platform.python_version()}
    try:
        import av
        meta["pyav"] = av.__version__
    except ImportError:
        pass
    print(f"# client formats, {meta['date']}, commit {meta['commit']}, {meta['device']}, 24 kHz model, "
          f"{args.seconds:g} s of audio a run, median of {args.repeats}")
    print("| format | direction | added latency, announced: samples at the client's rate (ms) | measured "
          "| CPU per stream (us per s of audio) | % of a core | set-up (us) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for label, fmt, rate in CASES:
        r = measure(label, fmt, rate, args.seconds, args.repeats)
        rows.append(r)
        for way, name in (("input", "in (client -> server)"), ("output", "out (server -> client)")):
            x = r[way]
            announced = (f"{x['announced_latency_samples']} ({x['announced_latency_ms']:.1f} ms)"
                         if x["announced_latency_samples"] else "0")
            measured = f"{x['measured_latency_ms']:.1f} ms" if x["measured_latency_ms"] else "0"
            print(f"| {label} | {name} | {announced} | {measured} | {x['cpu_us_per_audio_s']:.0f} "
                  f"| {x['core_percent']:.3f} % | {x['setup_us']:.0f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
