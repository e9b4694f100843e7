"""End-to-end latency benchmark: N concurrent real-time clients against an in-process server.

The clients are of one kind. ``roundtrip`` (a live call through the codec): each streams the same kind of
signal (a few sines plus noise) in ``chunk_ms`` pieces, each sent when its last sample would have been captured,
for ``duration_s``. ``decode`` (what an LLM-driven TTS deployment looks like): each opens a decode session and
sends the tokens of random codes (seeded per client, in the server's default token layout) for ``duration_s`` of
audio, whole coarse frames a message (one by default), each sent when the audio it describes would have been
generated in real time. Either way every output sample's latency is split into algorithmic delay, server time
and transport (:func:`snac_stream.client.latency_breakdown`, the same mechanism for both kinds). The server's
resident memory, its ticks (engine steps) and its CPU time are measured while the clients run, and so is each
client worker process's CPU time: a worker near one CPU second per second of wall is saturated, and the load
generator, not the server, would be the limit.

The clients speak any client format at any rate the server takes (``sample_format``, ``sample_rate``; decode
clients: their output only): roundtrip messages are coded before the start by
:func:`snac_stream.client.client_messages` (Opus: one frame a message, as a live client's encoder sends them),
and what comes back is decoded frame by frame as it arrives. Latency positions are output samples at the
client's rate (Opus: samples of the decoded 48 kHz stream); what the server's conversions hold back is part of
the algorithmic delay.

The clients run in worker processes by default, as remote callers would: in the server's own process,
tens of clients' websocket traffic would compete with the server for the interpreter lock and the
benchmark would measure itself (and its CPU time would be the clients' too).
"""

from __future__ import annotations

import asyncio
import datetime
import math
import multiprocessing
import os
import platform
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import client as ws_client
from ..config import SNACConfig
from ..formats import check_format
from ..model.snac import SNACModel
from ..protocol import CONTAINER_FORMATS, DEFAULT_LAYOUT, Hello, ProtocolError
from ..tokens import get_layout
from . import ServerOptions, SNACServer
from .conversion import SessionFormats
from .frontends import MultiProcessServer
from .heap import GC_CLOCK

PARTS = ("total", "algorithmic", "server", "transport")
KINDS = ("roundtrip", "decode")  # the clients' session kind


def bench_signal(samples: int, rate: int, seed: int) -> np.ndarray:
    """Mono float32 (samples,): three sines and a little noise, about -10 dBFS."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / rate
    x = sum(0.2 * np.sin(2 * np.pi * f * t + p) for f, p in zip(rng.uniform(80, 2000, 3), rng.uniform(0, 6.3, 3)))
    return np.clip(x + 0.02 * rng.standard_normal(samples), -0.9, 0.9).astype(np.float32)


def bench_tokens(config: SNACConfig, frames: int, seed: int, layout: str = DEFAULT_LAYOUT) -> np.ndarray:
    """Token ids (frames * frame_tokens,) int64: ``frames`` coarse frames of uniformly random codes of
    ``config``'s model, in ``layout`` (:func:`snac_stream.tokens.get_layout`), as a decode client sends them
    (the audio they decode to is noise)."""
    rng = np.random.default_rng(seed)
    tokens = get_layout(layout, config)
    codes = [torch.from_numpy(rng.integers(0, config.codebook_size, (1, frames * r))) for r in tokens.codes_per_frame]
    return tokens.to_flat(codes)[0].numpy()


def machine_info(*devices: torch.device) -> Dict[str, Any]:
    """The machine a benchmark ran on: CPU, torch, Python, date, commit, and the GPU model of ``devices``
    (each one's, ``gpus``, when there are several)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: Dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "python": platform.python_version(),
                            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    gpus = [torch.cuda.get_device_name(device) for device in devices if device.type == "cuda"]
    if gpus:
        info["gpu"] = gpus[0]
    if len(gpus) > 1:
        info["gpus"] = gpus
    info["commit"] = source_commit()
    return info


def source_commit() -> Optional[str]:
    """The checkout's commit (``+dirty`` with uncommitted changes to tracked files), or None outside git;
    ``$SNAC_STREAM_COMMIT`` overrides it for copies of a working tree whose git metadata is not the source's
    (a remote benchmark machine)."""
    if os.environ.get("SNAC_STREAM_COMMIT"):
        return os.environ["SNAC_STREAM_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def _rss_bytes() -> Optional[int]:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def default_client_processes(clients: int) -> int:
    """Worker processes for ``clients`` benchmark clients: half the cores less one (the server keeps an
    event loop and an engine thread busy), at least one, at most one per client."""
    return max(1, min(clients, (os.cpu_count() or 2) // 2 - 1))


OPUS_MESSAGE_MS = (10, 20, 40, 60)  # an Opus client's message is one frame of one of these durations


def client_format(sample_format: str, sample_rate: Optional[int], chunk_ms: Optional[float], model_rate: int, *,
                  kind: str = "roundtrip", frame_samples: Optional[int] = None) -> Tuple[str, int, int]:
    """The clients' (format, rate in Hz, samples a message): ``sample_rate`` None is the format's default as in
    the server's hello (the model's rate for PCM, 8000 for G.711, 48000 for Opus).

    ``roundtrip`` clients send and receive audio in that format; a message holds ``chunk_ms`` (default 20) of
    it, samples at the client's rate (Opus: one frame, 10, 20, 40 or 60 ms). ``decode`` clients receive it (the
    format is their output's) and send tokens: a message holds the tokens of whole coarse frames
    (``frame_samples`` each, at the model's rate), ``chunk_ms`` worth rounded up to at least one (default: one),
    and its samples are those frames' at the model's rate. Raises ``ValueError`` for an unknown kind, a
    combination the server or an Opus encoder does not take, or Opus without PyAV."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if chunk_ms is not None and not chunk_ms > 0:
        raise ValueError(f"chunk_ms must be positive, got {chunk_ms:g}")
    fmt, rate = check_format(sample_format, sample_rate, model_rate=model_rate)
    if kind == "decode":
        if frame_samples is None:
            raise ValueError("decode clients need the model's frame_samples")
        frames = 1 if chunk_ms is None else max(1, math.ceil(model_rate * chunk_ms / 1000 / frame_samples - 1e-6))
        chunk = frames * frame_samples
    else:
        chunk_ms = 20.0 if chunk_ms is None else chunk_ms
        if fmt in CONTAINER_FORMATS and chunk_ms not in OPUS_MESSAGE_MS:
            raise ValueError(f"{fmt} clients send one Opus frame a message: the message must be 10, 20, 40 or 60 "
                             f"ms, got {chunk_ms:g} ms")
        chunk = max(1, round(rate * chunk_ms / 1000))
    if fmt in CONTAINER_FORMATS:
        try:
            import av  # noqa: F401 - the clients code and decode Opus with it, as the server does
        except ImportError:
            raise ValueError(f"{fmt} needs PyAV: pip install 'snac-stream[opus]' (or pip install av)") from None
    return fmt, rate, chunk


@dataclass(frozen=True)
class _Load:
    """What the clients do: ``clients`` sessions of ``kind``, their starts spread over one engine step
    (``step_s``, seconds), each receiving audio in ``sample_format`` at ``rate`` (Hz), ``output_items`` output
    samples (at ``rate``) when complete. ``roundtrip``: each streams ``samples`` of audio in that format, in
    messages of ``chunk`` samples. ``decode``: each sends :func:`bench_tokens` of ``frames`` coarse frames of
    ``config``'s model, ``chunk`` tokens a message."""

    kind: str
    clients: int
    sample_format: str
    rate: int
    chunk: int
    step_s: float
    output_items: float
    samples: int = 0
    frames: int = 0
    config: Optional[SNACConfig] = None


def _client_inputs(ks: Sequence[int], load: _Load) -> Dict[int, Any]:
    """Clients ``ks``' input, made before they start: roundtrip messages coded as a live client codes as it
    captures, at a cost that is no part of the server's; decode tokens (seeded per client)."""
    if load.kind == "decode":
        assert load.config is not None
        return {k: bench_tokens(load.config, load.frames, seed=k) for k in ks}
    return {k: ws_client.client_messages(bench_signal(load.samples, load.rate, seed=k), load.sample_format,
                                         load.rate, load.chunk) for k in ks}


def _client_stream(url: str, data: Any, load: _Load) -> Awaitable[ws_client.StreamResult]:
    """One client's session, paced in real time, its output decoded as it arrives: a roundtrip of ``data``
    (:class:`~snac_stream.client.ClientMessages`), or a decode of ``data`` (tokens) ``load.chunk`` at a time."""
    common: Dict[str, Any] = {"realtime": True, "decode_output": True, "sample_format": load.sample_format,
                              "sample_rate": load.rate}
    if load.kind == "decode":
        return ws_client.decode(url, data, chunk_tokens=load.chunk, token_layout=DEFAULT_LAYOUT, **common)
    return ws_client.roundtrip(url, data, **common)


async def _run_clients(url: str, ks: Sequence[int], inputs: Dict[int, Any], load: _Load) -> List[Any]:
    """Clients ``ks``, each started ``k / clients`` of a step after the others' origin, as independent callers
    would (not a synchronisation); each decodes its output as it arrives. A failed client's result is its
    exception."""
    async def one(k: int) -> Any:
        await asyncio.sleep(k * load.step_s / load.clients)
        try:
            return await _client_stream(url, inputs[k], load)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            return exc

    return list(await asyncio.gather(*(one(k) for k in ks)))


def _summary(result: Any, load: _Load) -> Any:
    """What the report needs of one client: its latency breakdown (every 16th output sample), whether its
    output is complete (``load.output_items`` samples, give or take a resampler's rounding), and the server's
    warnings; an exception as a "Type: message" string."""
    if isinstance(result, BaseException):
        return f"{type(result).__name__}: {result}"
    assert result.decoded is not None
    return {"latency": ws_client.latency_breakdown(result, decimate=16),
            "complete": abs(result.decoded.size - load.output_items) < 1, "warnings": len(result.warnings)}


def _client_process(conn: Any, url: str, ks: Sequence[int], load: _Load) -> None:
    """A worker process: code its clients' input, report ready, wait for the go, run clients ``ks``, report
    done, then send their summaries back with its CPU over the streams (:func:`_process_cpu`)."""
    inputs = _client_inputs(ks, load)
    conn.send("ready")
    conn.recv()
    # Over the streams only, as the server's: coding the input before and summing up after are no load.
    t0, times0 = time.perf_counter(), os.times()
    results = asyncio.run(_run_clients(url, ks, inputs, load))
    wall, times1 = time.perf_counter() - t0, os.times()
    conn.send("done")
    conn.send(([_summary(r, load) for r in results], _process_cpu(times0, times1, wall)))
    conn.close()


def _process_cpu(times0: Any, times1: Any, wall: float) -> Dict[str, float]:
    """A process's CPU between two ``os.times()`` (every thread's, not its children's) over ``wall`` seconds:
    ``window_s`` (that wall), ``user_s``, ``system_s`` and ``cpu_per_wall_s`` (CPU seconds per second of wall)."""
    user, system = times1.user - times0.user, times1.system - times0.system
    return {"window_s": round(wall, 2), "user_s": round(user, 2), "system_s": round(system, 2),
            "cpu_per_wall_s": round((user + system) / wall, 3) if wall > 0 else 0.0}


def _clients_cpu(per_process: Sequence[Dict[str, float]]) -> Dict[str, Any]:
    """The client workers' CPU for the report: ``cpu_per_wall_s`` in all (the sum of the workers'), the busiest
    worker's (``max_process_cpu_per_wall_s``; near 1.0 it is saturated, one interpreter lock a process) and
    each worker's (``per_process``, in worker order), each in CPU seconds per second of its streams' wall;
    ``window_s``, the longest worker's window; ``user_s`` and ``system_s`` summed over the workers."""
    rates = [p["cpu_per_wall_s"] for p in per_process]
    return {"processes": len(rates), "cpu_per_wall_s": round(sum(rates), 3),
            "max_process_cpu_per_wall_s": max(rates) if rates else None, "per_process": rates,
            "window_s": max((p["window_s"] for p in per_process), default=0.0),
            "user_s": round(sum(p["user_s"] for p in per_process), 2),
            "system_s": round(sum(p["system_s"] for p in per_process), 2)}


async def _clients_in_processes(processes: int, url: str, load: _Load, *,
                                streams_start: Callable[[], None] = lambda: None,
                                streams_done: Callable[[], None] = lambda: None
                                ) -> Tuple[List[Any], List[Dict[str, float]]]:
    """Run the clients spread over ``processes`` spawned workers; their summaries (:func:`_summary`) in client
    order, and each worker's CPU while its clients streamed (:func:`_process_cpu`), in worker order.
    ``streams_start`` is called as the workers are told to go, ``streams_done`` once every client's stream has
    ended, before the summaries come into this process."""
    loop = asyncio.get_running_loop()
    context = multiprocessing.get_context("spawn")
    shares = [list(range(i, load.clients, processes)) for i in range(processes)]
    workers = []
    try:
        for ks in shares:
            parent, child = context.Pipe()
            proc = context.Process(target=_client_process, args=(child, url, ks, load), daemon=True)
            proc.start()
            child.close()
            workers.append((proc, parent))
        for _, conn in workers:  # everyone imported and ready: the clients' start times are comparable
            await loop.run_in_executor(None, conn.recv)
        streams_start()
        for _, conn in workers:
            conn.send("go")
        for _, conn in workers:
            await loop.run_in_executor(None, conn.recv)  # "done"
        streams_done()
        per_worker = [await loop.run_in_executor(None, conn.recv) for _, conn in workers]
    finally:
        for proc, conn in workers:
            conn.close()
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    results: List[Any] = [None] * load.clients
    for ks, (got, _) in zip(shares, per_worker):
        for k, r in zip(ks, got):
            results[k] = r
    return results, [cpu for _, cpu in per_worker]


def _thread_cpu_s() -> Optional[Dict[int, Tuple[str, float]]]:
    """CPU seconds (user + system) of each of this process's Python threads so far, by native id, with its
    name; None where ``/proc`` does not say."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: Dict[int, Tuple[str, float]] = {}
    for thread in threading.enumerate():
        if thread.native_id is None:
            continue
        try:
            with open(f"/proc/self/task/{thread.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the name, which may hold spaces
        except (OSError, IndexError):
            return None
        out[thread.native_id] = (thread.name, (int(fields[11]) + int(fields[12])) / tick)  # utime, stime
    return out


def _process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread's) of process ``pid`` so far; 0 once it has ended."""
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


class _CPUClock:
    """The process's CPU time over a window (every thread's: ``os.times``), split by thread role: the event
    loop's thread (the one that makes the clock), the engine workers, the loop's thread pool (Opus encoding;
    also the benchmark's scrapes) and the rest (threads torch or CUDA started, threads that ended)."""

    def __init__(self) -> None:
        self.loop_thread = threading.get_native_id()
        self.started: Optional[Tuple[float, Any, Optional[Dict[int, Tuple[str, float]]]]] = None
        self.report: Optional[Dict[str, Any]] = None
        self.others: List[int] = []  # the server's other processes (front ends), measured over the same window
        self._others0: List[float] = []
        self.others_report: Optional[Dict[str, Any]] = None

    def start(self) -> None:
        self._others0 = [_process_cpu_s(pid) for pid in self.others]
        self.started = (time.perf_counter(), os.times(), _thread_cpu_s())

    def _role(self, name: str, native_id: int) -> Optional[str]:
        if native_id == self.loop_thread:
            return "event_loop"
        if name.startswith("snac-engine"):
            return "engine"
        return "thread_pool" if name.startswith("asyncio") else None

    def stop(self) -> None:
        """End the window; ``report``: CPU seconds per second of wall, in all and per role."""
        assert self.started is not None
        t0, times0, threads0 = self.started
        wall, times1, threads1 = time.perf_counter() - t0, os.times(), _thread_cpu_s()
        user, system = times1.user - times0.user, times1.system - times0.system
        roles: Optional[Dict[str, float]] = None
        if threads0 is not None and threads1 is not None:
            roles = {"event_loop": 0.0, "engine": 0.0, "thread_pool": 0.0}
            for tid, (name, cpu) in threads1.items():
                role = self._role(name, tid)
                if role is not None:
                    roles[role] += cpu - threads0.get(tid, (name, 0.0))[1]
            roles["other"] = max(0.0, user + system - sum(roles.values()))
        if self.others:
            rates = [round((_process_cpu_s(pid) - before) / wall, 3) for pid, before in zip(self.others, self._others0)]
            self.others_report = {"processes": len(rates), "cpu_per_wall_s": round(sum(rates), 3),
                                  "max_process_cpu_per_wall_s": max(rates), "per_process": rates}
        self.report = {"window_s": round(wall, 2), "user_s": round(user, 2), "system_s": round(system, 2),
                       "cpu_per_wall_s": round((user + system) / wall, 3),
                       "threads_cpu_per_wall_s": ({k: round(v / wall, 3) for k, v in roles.items()}
                                                  if roles is not None else None)}


def _tick_parts(parts: Sequence[Tuple[float, float, float, float]]) -> Optional[Dict[str, Dict[str, float]]]:
    """Where the engine thread's ticks went (ms): its CPU time, its time blocked waiting for steps on a GPU,
    the rest (waiting for the interpreter lock, or for a core), and the process's garbage collections during
    the tick (on the engine thread, part of its CPU time; on another, part of the rest); None without ticks."""
    if not parts:
        return None
    wall, cpu, blocked, collecting = (np.array(column) for column in zip(*parts))
    return {"cpu": _stats(cpu), "blocked": _stats(blocked),
            "rest": _stats(np.maximum(wall - cpu - blocked, 0.0)), "gc": _stats(collecting)}


TICK_BANDS = ((0, 50), (50, 95), (95, 99), (99, 100))  # percentiles of tick duration


def _tick_work(work: Sequence[Tuple[float, float, float, int, int, int]]) -> Optional[Dict[str, Any]]:
    """What the ticks did, by duration (``stats["tick_work"]`` records): for the ticks in each band of
    :data:`TICK_BANDS` ("p50-p95": longer than the p50, up to the p95), their count and mean duration, engine
    thread CPU (ms), stream-steps launched, passes of streams warming up and sessions ended; over the run,
    the warm-up passes and sessions ended in all, and when the last warm-up pass ran (seconds after the first
    tick). Which
    work the long ticks carry is where a latency tail comes from. None without ticks."""
    if not work:
        return None
    start, wall, cpu, rows, warming, ended = (np.array(column, dtype=np.float64) for column in zip(*work))
    means = {"tick_ms": 1e3 * wall, "cpu_ms": 1e3 * cpu, "stream_steps": rows, "warmup_passes": warming,
             "sessions_ended": ended}
    edges = np.percentile(wall, [band[0] for band in TICK_BANDS] + [100])
    bands: Dict[str, Any] = {}
    for k, (low, high) in enumerate(TICK_BANDS):
        pick = (wall <= edges[k + 1]) & ((wall > edges[k]) if k else (wall >= edges[k]))
        band: Dict[str, Any] = {"ticks": int(pick.sum())}
        if band["ticks"]:
            band.update({name: round(float(column[pick].mean()), 2) for name, column in means.items()})
        bands[f"p{low}-p{high}"] = band
    with_warming = np.flatnonzero(warming)
    return {"by_duration": bands, "warmup_passes": int(warming.sum()), "sessions_ended": int(ended.sum()),
            "last_warmup_s": round(float(start[with_warming[-1]] - start[0]), 2) if with_warming.size else None}


def _stats(values: Union[np.ndarray, Sequence[float]]) -> Dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    if not values.size:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "max": float("nan")}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": 1e3 * p50, "p95": 1e3 * p95, "p99": 1e3 * p99, "max": 1e3 * float(values.max())}


def _scrape(url: str, hz: float, stop: asyncio.Event, durations: List[float]) -> None:
    """[a thread] GET ``url`` ``hz`` times a second until ``stop`` is set; appends each request's seconds."""
    period = 1.0 / hz
    next_at = time.perf_counter()
    while not stop.is_set():
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
        durations.append(time.perf_counter() - t0)
        next_at += period
        time.sleep(max(0.0, next_at - time.perf_counter()))


async def run_latency_bench(model: SNACModel, *, clients: int, duration_s: float, chunk_ms: Optional[float] = None,
                            kind: str = "roundtrip", sample_format: str = "pcm16", sample_rate: Optional[int] = None,
                            model_name: str = "snac", random_weights: bool = False,
                            backend: Optional[str] = None, threads: Optional[int] = None,
                            client_processes: Optional[int] = None, scrape_hz: float = 0.0,
                            devices: Optional[Sequence[torch.device]] = None, frontends: int = 0,
                            say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the benchmark; returns a JSON-able report (latencies in ms, memory in MiB, CPU in seconds per
    second of wall).

    ``kind``: the clients' sessions, ``"roundtrip"`` (audio in and out, ``chunk_ms`` of audio a message, default
    20) or ``"decode"`` (random tokens in, audio out, as an LLM-driven TTS: ``chunk_ms`` worth of whole coarse
    frames a message, rounded up; default one frame), each paced in real time for ``duration_s`` of audio
    (decode: rounded up to whole decoder steps). The algorithmic latency is that kind's (``ready``'s). Decode
    sessions get no 'behind' warnings from the server: whether they keep up shows in the latency drift.
    ``sample_format``, ``sample_rate`` (Hz): what the clients send and receive (decode: receive)
    (:func:`client_format`; raises ``ValueError`` for a kind or combination the server does not take).
    ``threads``: the server's engine worker threads (:attr:`ServerOptions.threads`), per device.
    ``client_processes``: worker processes running the clients (default :func:`default_client_processes`; 0
    runs them in this process, beside the server, and the server's CPU figures are theirs too: the report's
    ``client_cpu`` is then None, else the workers' own, from :func:`_clients_cpu`). ``scrape_hz``: GET ``/metrics`` this often while the clients run, as a Prometheus
    server would (from a thread of this process), to measure what scraping costs the engine step. ``devices``:
    the server's devices (default: the model's), each with slots for its share of the clients. ``frontends``:
    run the server's client side in that many processes (:class:`~.frontends.MultiProcessServer`; 0: all in
    this process, :class:`SNACServer`); their CPU is reported beside this process's (``frontends_cpu``).
    """
    if client_processes is None:
        client_processes = default_client_processes(clients)
    if client_processes < 0:
        raise ValueError(f"client_processes must be >= 0, got {client_processes}")
    client_processes = min(client_processes, clients)
    rate, frame_samples = model.config.sampling_rate, model.config.frame_samples
    fmt, client_rate, chunk = client_format(sample_format, sample_rate, chunk_ms, rate, kind=kind,
                                            frame_samples=frame_samples)
    try:  # what the server announces to these clients (it converts with this very object)
        formats = SessionFormats(Hello(kind=kind, sample_format=fmt, sample_rate=client_rate), rate)
    except ProtocolError as exc:
        raise ValueError(exc.message) from None
    announced = formats.ready_fields()
    places = list(devices) if devices else [model.device]
    # Sessions go to the device with the most free slots: each gets an even share of the clients.
    options = ServerOptions(port=0, max_sessions=math.ceil(clients / len(places)),
                            idle_timeout_s=max(30.0, duration_s), backend=backend, threads=threads)
    if any(place.type == "cuda" for place in places):
        say(f"server  building engines for {options.max_sessions} sessions per device: compiling kernels and "
            f"capturing CUDA graphs (this can take minutes)")
    building = time.perf_counter()  # engines built, kernels compiled, graphs captured, processes started
    server: Union[SNACServer, MultiProcessServer] = (
        MultiProcessServer(model, options, frontends=frontends, model_name=model_name, random_weights=random_weights,
                           devices=places) if frontends
        else SNACServer(model, options, model_name=model_name, random_weights=random_weights, devices=places))
    step_s = server.step_samples / rate
    algorithmic = server.latency[kind] + formats.added_latency  # as ready says: model samples
    if kind == "decode":  # whole decoder steps (a decode stream must end on one), at least one
        frames = max(1, math.ceil(duration_s * rate / server.step_samples - 1e-9)) * server.step_frames
        frame_tokens = get_layout(DEFAULT_LAYOUT, model.config).frame_tokens
        load = _Load(kind, clients, fmt, client_rate, chunk // frame_samples * frame_tokens, step_s,
                     output_items=frames * frame_samples * client_rate / rate, frames=frames, config=model.config)
        stream_s = frames * frame_samples / rate
        message = (f"{frames} coarse frames of random codes ({DEFAULT_LAYOUT} layout) each, {chunk // frame_samples} "
                   f"frame{'s' if chunk > frame_samples else ''} ({load.chunk} tokens, {1e3 * chunk / rate:.1f} ms "
                   f"of audio) a message; output")
    else:
        samples = int(duration_s * client_rate)
        load = _Load(kind, clients, fmt, client_rate, chunk, step_s, output_items=samples, samples=samples)
        stream_s = duration_s
        message = f"{chunk}-sample chunks ({1e3 * chunk / client_rate:g} ms),"
    rss: List[List[float]] = []
    results: List[Any] = []
    cpu = _CPUClock()
    client_cpu: Optional[Dict[str, Any]] = None
    async with server:
        server_start_s = time.perf_counter() - building
        if isinstance(server, MultiProcessServer):
            cpu.others = [process.pid for process in server.processes if process.pid is not None]
        say(f"server  {server.url}: {model_name}{' (RANDOM WEIGHTS)' if random_weights else ''} on "
            f"{','.join(server.devices)}, step {server.step_samples} samples ({1e3 * step_s:.1f} ms), {kind} "
            f"algorithmic latency {server.latency[kind]} samples "
            f"({1e3 * server.latency[kind] / rate:.1f} ms), "
            f"{server.threads} engine thread{'s' if server.threads > 1 else ''}"
            f"{f' on each of {len(places)} devices' if len(places) > 1 else ''}"
            + (f", clients served by {frontends} front-end processes" if frontends else "")
            + f"; started in {server_start_s:.1f} s")
        say(f"clients {clients} x {stream_s:g} s real-time {kind}, {message} "
            f"{fmt}{f' at {client_rate} Hz' if formats.converted else ''}, "
            + (f"in {client_processes} worker process{'es' if client_processes > 1 else ''}"
               if client_processes else "in the server's process"))
        if formats.converted:
            held = [(way, announced[f"{key}_latency_samples"]) for way, key in (("in", "input"), ("out", "output"))
                    if announced[f"{key}_latency_samples"] is not None]  # decode: its output only
            say(f"format  the server converts {fmt} at {client_rate} Hz: adds "
                f"{' + '.join(f'{way} {n}' for way, n in held)} samples at {client_rate} Hz "
                f"({' + '.join(f'{1e3 * n / client_rate:.1f}' for _, n in held)} ms), part of the algorithmic "
                f"latency ({algorithmic} samples, {1e3 * algorithmic / rate:.1f} ms); latency positions: "
                + ("samples of the decoded 48 kHz Opus stream"
                   + (" (the clients' own encoder counts as algorithmic)" if kind == "roundtrip" else "")
                   if fmt in CONTAINER_FORMATS else f"output samples at {client_rate} Hz"))
        start = time.perf_counter()
        stop = asyncio.Event()

        async def sample_rss() -> None:
            while not stop.is_set():
                value = _rss_bytes()
                if value is not None:
                    rss.append([round(time.perf_counter() - start, 2), round(value / 2**20, 1)])
                try:
                    await asyncio.wait_for(stop.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass

        def streams_done() -> None:
            cpu.stop()
            stop.set()

        sampler = asyncio.create_task(sample_rss())
        scrapes: List[float] = []
        scraper = (asyncio.ensure_future(asyncio.to_thread(_scrape, f"http://127.0.0.1:{server.port}/metrics",
                                                           scrape_hz, stop, scrapes))
                   if scrape_hz > 0 else None)
        if client_processes:
            # The server's memory and CPU are measured while the streams run, not while the results come in.
            results, workers_cpu = await _clients_in_processes(client_processes, server.url, load,
                                                               streams_start=cpu.start, streams_done=streams_done)
            client_cpu = _clients_cpu(workers_cpu)
        else:
            inputs = _client_inputs(range(clients), load)
            cpu.start()
            results = await _run_clients(server.url, range(clients), inputs, load)
            streams_done()
            results = [_summary(r, load) for r in results]
        await sampler
        if scraper is not None:
            await scraper
        wall = time.perf_counter() - start
        front_stats = await server.front_stats() if isinstance(server, MultiProcessServer) else server.stats
        server_errors = dict(front_stats.get("errors", {}))
    errors = [r for r in results if isinstance(r, str)]
    good = [r for r in results if not isinstance(r, str)]
    parts: Dict[str, List[np.ndarray]] = {p: [] for p in PARTS}
    under_way: List[np.ndarray] = []  # server + transport after each stream's first quarter (its start left out)
    drift = []
    short = 0
    for r in good:
        if not r["complete"]:
            short += 1
        b = r["latency"]
        for p in PARTS:
            parts[p].append(b[p])
        n = b["total"].size
        under_way.append((b["server"] + b["transport"])[n // 4:])
        if n >= 8:  # latency growth across the stream: a server that falls behind drifts upwards
            drift.append(float(np.median(b["total"][-n // 4:]) - np.median(b["total"][: n // 4])))
    merged = {p: np.concatenate(v) if v else np.zeros(0) for p, v in parts.items()}
    latency = {p: _stats(merged[p]) for p in PARTS}
    overhead = merged["server"] + merged["transport"]
    warnings = sum(r["warnings"] for r in good)
    # Keeping up is a rate: every stream complete, no error, no 'behind' warning and no latency growth of a
    # step or more across the streams. The tail (p99 of server + transport within one step) is its own verdict.
    keeps_up = (not errors and not server_errors and short == 0 and overhead.size > 0 and warnings == 0
                and bool(drift) and max(drift) < step_s)
    tail_within_step = overhead.size > 0 and float(np.percentile(overhead, 99)) < step_s
    steady = [m for t, m in rss if t >= min(5.0, wall / 3)]
    server_cpu = {**(cpu.report or {}), "clients_included": not client_processes}
    added = {way: announced[f"{way}_latency_samples"] for way in ("input", "output")}  # decode: no input
    report: Dict[str, Any] = {
        "kind": kind, "model": model_name, "random_weights": random_weights, "device": ",".join(server.devices),
        "backend": model.resolved_backend(backend), "sample_rate": rate, "sample_format": fmt,
        "client_sample_rate": client_rate, "converted": formats.converted,
        "input_latency_samples": added["input"], "output_latency_samples": added["output"],
        "added_latency_ms": {way: None if n is None else 1e3 * n / client_rate for way, n in added.items()},
        "clients": clients, "duration_s": duration_s, "stream_s": stream_s,
        # Audio a message carries (roundtrip: at the client's rate) or its tokens describe (decode: model rate).
        "chunk_samples": chunk,
        "chunk_tokens": load.chunk if kind == "decode" else None,
        "token_layout": DEFAULT_LAYOUT if kind == "decode" else None,
        "step_samples": server.step_samples,
        "algorithmic_latency_samples": algorithmic, "server_start_s": round(server_start_s, 2),
        "wall_s": round(wall, 2),
        "latency_ms": latency, "server_plus_transport_p99_ms": _stats(overhead)["p99"],
        "server_plus_transport_p99_steady_ms": _stats(np.concatenate(under_way) if under_way else np.zeros(0))["p99"],
        "drift_ms_max": 1e3 * max(drift) if drift else None,
        "keeps_up": keeps_up, "p99_within_step": tail_within_step, "errors": len(errors) + short,
        "error_messages": errors[:10], "server_errors": server_errors, "incomplete_streams": short,
        "behind_warnings": warnings,
        "rss_mib": rss, "rss_growth_mib": round(steady[-1] - steady[0], 1) if len(steady) > 1 else None,
        "server_cpu": server_cpu, "client_cpu": client_cpu, "frontends": frontends,
        "frontends_cpu": cpu.others_report,
        "engine_threads": server.threads, "client_processes": client_processes, "ticks": server.stats["ticks"],
        "ticks_per_device": [worker.ticks for worker in server.workers],
        "tick_ms": _stats(server.stats["tick_s"]), "engine_step_ms": _stats(server.stats["step_s"]),
        "tick_parts_ms": _tick_parts(server.stats["tick_parts_s"]),
        "tick_work": _tick_work(server.stats["tick_work"]),
        "gc": GC_CLOCK.report(),  # the engine process's collections since its server started
        "scrape_hz": scrape_hz, "scrapes": len(scrapes), "scrape_ms": _stats(scrapes) if scrapes else None,
        "machine": machine_info(*places),
    }
    say("latency (ms) per output sample, all clients:   p50      p95      p99      max")
    for p in PARTS:
        s = latency[p]
        say(f"  {p:<12}                               {s['p50']:8.1f} {s['p95']:8.1f} {s['p99']:8.1f} {s['max']:8.1f}")
    say(f"errors  {report['errors']} (server: {server_errors or 'none'}; 'behind' warnings: "
        f"{report['behind_warnings']})")
    say(f"verdict keeps up in real time: {'yes' if keeps_up else 'NO'} (latency drift {report['drift_ms_max'] or 0:.1f} ms "
        f"across the streams, a step is {1e3 * step_s:.1f} ms); p99 server + transport within one step: "
        f"{'yes' if tail_within_step else 'no'} ({report['server_plus_transport_p99_ms']:.1f} ms; "
        f"{report['server_plus_transport_p99_steady_ms']:.1f} ms after each stream's first quarter)")
    tick, step = report["tick_ms"], report["engine_step_ms"]
    say(f"ticks   {report['ticks']}: p50 {tick['p50']:.1f} ms, p99 {tick['p99']:.1f} ms, max {tick['max']:.1f} ms "
        f"(engine steps in them: p50 {step['p50']:.1f} ms, p99 {step['p99']:.1f} ms)")
    parts = report["tick_parts_ms"]
    if parts is not None:
        say(f"        the engine thread in a tick, p50 / p99: its CPU {parts['cpu']['p50']:.1f} / "
            f"{parts['cpu']['p99']:.1f} ms, blocked waiting for the GPU {parts['blocked']['p50']:.1f} / "
            f"{parts['blocked']['p99']:.1f} ms, the rest (waiting for the interpreter lock or a core) "
            f"{parts['rest']['p50']:.1f} / {parts['rest']['p99']:.1f} ms; garbage collection in the process "
            f"meanwhile {parts['gc']['p50']:.1f} / {parts['gc']['p99']:.1f} ms")
    work = report["tick_work"]
    if work is not None:
        say("        ticks by duration: count, mean ms, engine thread CPU ms, stream-steps, passes of "
            "streams warming up, sessions ended")
        for band, w in work["by_duration"].items():
            if w["ticks"]:
                say(f"          {band:<8} {w['ticks']:6d} {w['tick_ms']:8.1f} {w['cpu_ms']:8.1f} "
                    f"{w['stream_steps']:8.1f} {w['warmup_passes']:6.2f} {w['sessions_ended']:6.2f}")
        say(f"        passes of streams warming up: {work['warmup_passes']}"
            + (f", the last {work['last_warmup_s']:.2f} s after the first tick" if work["last_warmup_s"] is not None
               else ""))
    if scrapes:
        say(f"scrapes {len(scrapes)} GET /metrics at {scrape_hz:g} Hz: p50 {report['scrape_ms']['p50']:.1f} ms, "
            f"p99 {report['scrape_ms']['p99']:.1f} ms")
    roles = server_cpu.get("threads_cpu_per_wall_s")
    say(f"cpu     server process {server_cpu['cpu_per_wall_s']:.2f} s of CPU per s of wall over the "
        f"{server_cpu['window_s']:g} s the streams ran (user {server_cpu['user_s']:g} s, system "
        f"{server_cpu['system_s']:g} s)"
        + (f": event loop {roles['event_loop']:.2f}, engine {roles['engine']:.2f}, thread pool "
           f"{roles['thread_pool']:.2f}, other threads {roles['other']:.2f}" if roles else "")
        + (" (the clients' too: they ran in this process)" if not client_processes else ""))
    if cpu.others_report is not None:
        fronts = cpu.others_report
        say(f"cpu     front ends: {fronts['processes']} processes, {fronts['cpu_per_wall_s']:.2f} s of CPU per s of "
            f"wall in all, the busiest {fronts['max_process_cpu_per_wall_s']:.2f} (near 1.0: saturated, add front "
            f"ends)")
    if client_cpu is not None:
        n = client_cpu["processes"]
        say(f"cpu     clients: {n} process{'es' if n > 1 else ''}, {client_cpu['cpu_per_wall_s']:.2f} s of CPU per s "
            f"of wall in all, the busiest {client_cpu['max_process_cpu_per_wall_s']:.2f} (a process near 1.0 is "
            f"saturated: the load generator would be the limit)")
    else:
        say("cpu     clients: in the server's process, their CPU is included in the server's above (no separate "
            "figure)")
    if rss:
        say(f"memory  server process RSS {rss[0][1]:.0f} -> {rss[-1][1]:.0f} MiB (max {max(m for _, m in rss):.0f}; "
            f"growth after warm-up {report['rss_growth_mib']} MiB)")
    return report
