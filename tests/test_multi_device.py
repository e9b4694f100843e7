"""Several engine sets in one server (``serve --device cpu,cpu``): placement by most free slots, exactness on
every set, server_full only when all are full, /healthz, /readyz, /metrics and /config.json over all sets,
the drain; and the command line's device lists.

Two engine sets on the CPU run the same code as two GPUs (one model copy, engine set and worker thread each),
so the placement logic is tested without them. Small random-weight models as in test_server.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any, Awaitable, Callable, Dict, List

import numpy as np
import pytest
import torch

from helpers import run_cli, single_error
from snac_stream import client as ws_client
from snac_stream.loading import ModelLoadError, resolve_devices
from snac_stream.server import ServerOptions, SNACServer
from snac_stream.tokens import get_layout
from test_ops import ServeProcess, aget, free_port, metric_values, save_checkpoint
from test_server import AUDIO_TOL, assert_session_exact, model_for, offline, random_chunks, signal as _audio

TWO = ["cpu", "cpu"]


def serve_on(devices: List[str], test: Callable[[SNACServer], Awaitable[Any]], **options: Any) -> Any:
    """Run ``test(server)`` against a server with one engine set per entry of ``devices``."""
    async def run() -> Any:
        async with SNACServer(model_for("24k"), ServerOptions(port=0, threads=1, **options),
                              devices=devices) as server:
            return await asyncio.wait_for(test(server), 120)
    return asyncio.run(run())


async def _settled(server: SNACServer) -> None:
    """Return once every worker has run the commands posted so far (aborts of closed sessions included)."""
    for worker in server.workers:
        await worker.call(lambda events: None)


def _build_info(values: Dict[Any, float]) -> Dict[str, str]:
    """The labels of ``snac_build_info`` in parsed metrics."""
    (labels,) = [key[1] for key in values if key[0] == "snac_build_info"]
    return dict(labels)


def _engine_streams(server: SNACServer) -> List[List[int]]:
    """Open streams of each engine set: [encoder, decoder] per set."""
    return [[engines.encoder.active_streams, engines.decoder.active_streams] for engines in server.engine_sets]


def test_sessions_go_to_the_engine_set_with_the_most_free_slots_and_full_means_all_full() -> None:
    """3 slots per set. The order below tells "most free slots, ties to the first" apart from round robin
    (s4 goes to set 0) and from "first set with a free slot" (s5 goes to set 1); the engines' own streams
    show where each session really runs. A session is taken while one set is full and the other is not;
    server_full comes only once both are; /readyz, /metrics and ready.limits count both."""

    async def test(server: SNACServer):
        opened = {}
        placements, streams = [], []

        async def open_(name: str) -> None:
            opened[name] = await ws_client.Session.open(server.url, "roundtrip")
            await _settled(server)
            placements.append(server.workers.sessions_open())
            streams.append(_engine_streams(server))

        async def close(name: str) -> None:
            await opened.pop(name).close()
            await server.wait_sessions(len(opened))

        await open_("s1")
        await open_("s2")
        await open_("s3")
        await close("s1")
        await open_("s4")
        await close("s2")
        await open_("s5")
        await open_("s6")
        await open_("s7")
        partly_full = await aget(server.port, "/readyz")
        partly_metrics = metric_values((await aget(server.port, "/metrics"))[2].decode())
        await open_("s8")
        full = await aget(server.port, "/readyz")
        with pytest.raises(ws_client.ServerError) as refused:
            await ws_client.Session.open(server.url, "encode")
        full_metrics = metric_values((await aget(server.port, "/metrics"))[2].decode())
        limits = opened["s8"].ready.limits
        for session in opened.values():
            await session.close()
        return placements, streams, partly_full, partly_metrics, full, refused.value, full_metrics, limits

    placements, streams, partly_full, partly_metrics, full, refused, full_metrics, limits = serve_on(
        TWO, test, max_sessions=3)
    assert placements == [[1, 0], [1, 1], [2, 1], [2, 1], [2, 1], [2, 2], [3, 2], [3, 3]]
    assert streams == [[[n, n] for n in p] for p in placements]  # the sessions' streams are where they were placed
    assert partly_full[0] == 200 and json.loads(partly_full[2]) == {
        "ready": True, "reason": "ready", "sessions_open": 5, "slots_free": 1,
        "devices": [{"engine_set": 0, "device": "cpu", "sessions_open": 3, "slots_free": 0},
                    {"engine_set": 1, "device": "cpu", "sessions_open": 2, "slots_free": 1}]}
    assert partly_metrics["snac_device_slots_free", (("device", "cpu"), ("engine_set", "0"))] == 0
    assert partly_metrics["snac_device_slots_free", (("device", "cpu"), ("engine_set", "1"))] == 1
    assert partly_metrics["snac_device_sessions_open", (("device", "cpu"), ("engine_set", "0"))] == 3
    assert partly_metrics["snac_session_slots", ()] == 6 and partly_metrics["snac_session_slots_free", ()] == 1
    assert partly_metrics["snac_ready", ()] == 1
    assert full[0] == 503 and json.loads(full[2])["reason"] == "full" and json.loads(full[2])["slots_free"] == 0
    assert refused.code == "server_full" and refused.close_code == 1013 and "all 6 sessions" in refused.message
    assert full_metrics["snac_refusals_total", (("reason", "server_full"),)] == 1
    assert full_metrics["snac_ready", ()] == 0
    assert limits["max_sessions"] == 6 and limits["max_sessions_per_device"] == 3


def test_concurrent_sessions_on_two_engine_sets_are_each_exact_and_both_sets_step() -> None:
    """Six sessions of every kind at once on two sets of three slots: all slots taken, so each set serves
    three; each session equals its own offline result; /metrics has each set's steps, ticks and the build's
    two devices; /config.json tells the slots."""
    model = model_for("24k")
    rng = np.random.default_rng(21)
    kinds = ["roundtrip", "encode", "decode", "roundtrip", "decode", "encode"]
    inputs: List[Any] = []
    for i, kind in enumerate(kinds):
        if kind == "decode":
            inputs.append([torch.from_numpy(rng.integers(0, 4096, (1, 13 * r))) for r in (1, 2, 4)])
        else:
            inputs.append(_audio(int(rng.integers(9000, 20000)), seed=50 + i))
    chunkings = [random_chunks(rng, 8, 3000) for _ in kinds]
    layout = get_layout("interleaved", model.config)

    async def test(server: SNACServer):
        async def one(i: int) -> Any:
            if kinds[i] == "decode":
                return await ws_client.decode(server.url, layout.to_flat(inputs[i])[0].numpy(),
                                              chunk_tokens=chunkings[i], sample_format="float32")
            stream = ws_client.encode if kinds[i] == "encode" else ws_client.roundtrip
            return await stream(server.url, inputs[i], chunk_samples=chunkings[i], realtime=True,
                                sample_format="float32")

        # No session gets its ready before all six hold a slot: none can end before the last is placed.
        open_streams, all_open = server.workers.open, asyncio.Event()

        async def open_together(session: Any) -> None:
            await open_streams(session)
            placed.append(server.workers.sessions_open())
            if len(placed) == len(kinds):
                all_open.set()
            await all_open.wait()

        server.workers.open = open_together  # type: ignore[method-assign]
        placed: List[List[int]] = []
        results = await asyncio.gather(*(one(i) for i in range(len(kinds))))
        await server.wait_sessions(0)
        metrics = (await aget(server.port, "/metrics"))[2].decode()
        config = json.loads((await aget(server.port, "/config.json"))[2])
        return results, placed, metrics, config

    results, placed, metrics, config = serve_on(TWO, test, max_sessions=3)
    assert placed[-1] == [3, 3]
    for kind, given, result in zip(kinds, inputs, results):
        assert_session_exact(model, kind, given, result, layout, AUDIO_TOL)
    values = metric_values(metrics)
    for engine_set in ("0", "1"):
        labels = (("device", "cpu"), ("engine_set", engine_set))
        assert values["snac_engine_ticks_total", labels] > 0
        for lane in ("encode", "decode"):
            assert values["snac_engine_step_seconds_count", (*labels, ("lane", lane))] > 0
            assert values["snac_engine_batch_streams_sum", (*labels, ("lane", lane))] > 0
    assert _build_info(values)["device"] == "cpu,cpu"
    assert values["snac_sessions_total", (("kind", "decode"), ("outcome", "completed"))] == 2
    assert config["max_sessions"] == 6 and config["max_sessions_per_device"] == 3 and config["devices"] == TWO


def test_health_covers_every_engine_set_and_the_drain_ends_them_all() -> None:
    """A stopped worker on the second set makes /healthz 503 (naming that set) and /readyz unhealthy. On a
    healthy server, a drain lets a session on each set finish exactly, refuses new ones, and stops both
    workers."""
    audio = _audio(24000, seed=60)  # one second, sent in real time
    _, expected = offline(model_for("24k"), audio)

    async def dead_second(server: SNACServer):
        healthy = await aget(server.port, "/healthz")
        server.workers[1]._ticker.cancel()  # the second set's tick loop gone
        await asyncio.sleep(0.1)
        return healthy, await aget(server.port, "/healthz"), await aget(server.port, "/readyz")

    healthy, dead, unready = serve_on(TWO, dead_second)
    assert healthy[0] == 200 and json.loads(healthy[2]) == {"healthy": True, "reason": "ok"}
    assert dead[0] == 503 and json.loads(dead[2]) == {"healthy": False,
                                                      "reason": "engine set 1 (cpu): engine worker stopped"}
    assert unready[0] == 503 and json.loads(unready[2])["reason"] == "unhealthy"

    async def drain(server: SNACServer):
        sessions = [asyncio.ensure_future(ws_client.roundtrip(server.url, audio, chunk_samples=960, realtime=True,
                                                              sample_format="float32")) for _ in range(2)]
        await asyncio.sleep(0.3)
        spread = server.workers.sessions_open()
        summary = asyncio.ensure_future(server.drain(20))
        await asyncio.sleep(0.05)
        readyz = await aget(server.port, "/readyz")
        with pytest.raises(ws_client.ServerError) as refused:
            await ws_client.Session.open(server.url, "decode")
        results = await asyncio.gather(*sessions)
        return spread, readyz, refused.value, results, await summary, server.health()

    spread, readyz, refused, results, summary, health = serve_on(TWO, drain)
    assert spread == [1, 1]
    assert readyz[0] == 503 and json.loads(readyz[2])["reason"] == "draining"
    assert refused.code == "draining"
    for result in results:
        assert result.audio.shape == audio.shape and np.abs(result.audio - expected[: audio.size]).max() <= AUDIO_TOL
    assert summary["sessions_open_at_start"] == 2 and summary["sessions_ended_at_timeout"] == 0
    assert health == (False, "engine set 0 (cpu): engine worker stopped")  # both stopped; the first is named


def test_no_devices_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one device"):
        SNACServer(model_for("24k"), ServerOptions(port=0), devices=[])


# ---- command line ---------------------------------------------------------------------------------------
def test_serve_with_device_cpu_cpu_runs_two_engine_sets_and_drains(tmp_path) -> None:
    """``snac-stream serve --device cpu,cpu``: /readyz lists both sets with --max-sessions slots each, the
    build info both devices; two sessions land one on each; SIGTERM drains and the process exits 0."""
    ckpt = save_checkpoint(tmp_path / "ckpt")
    port = free_port()
    server = ServeProcess(ckpt, port, "--device", "cpu,cpu", "--max-sessions", "2", log=tmp_path / "serve.log")
    try:
        server.wait_ready()

        async def run() -> Any:
            url = f"ws://127.0.0.1:{port}"
            first = await ws_client.Session.open(url, "encode")
            second = await ws_client.Session.open(url, "decode")
            readyz = await aget(port, "/readyz")
            metrics = metric_values((await aget(port, "/metrics"))[2].decode())
            await first.close()
            await second.close()
            return readyz, metrics, first.ready.limits

        readyz, metrics, limits = asyncio.run(asyncio.wait_for(run(), 60))
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(30)
    finally:
        server.stop()
    assert readyz[0] == 200 and json.loads(readyz[2])["devices"] == [
        {"engine_set": 0, "device": "cpu", "sessions_open": 1, "slots_free": 1},
        {"engine_set": 1, "device": "cpu", "sessions_open": 1, "slots_free": 1}]
    assert _build_info(metrics)["device"] == "cpu,cpu"
    assert limits["max_sessions"] == 4 and limits["max_sessions_per_device"] == 2
    assert code == 0 and "on cpu,cpu" in server.output() and "up to 4 sessions (2 per device)" in server.output()


def test_bench_latency_runs_on_two_engine_sets(tmp_path) -> None:
    """``bench-latency --device cpu,cpu``: the clients are served from both sets, without an error."""
    from snac_stream.cli import main

    ckpt = save_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "bench.json"
    status = main(["bench-latency", "--model", str(ckpt), "--clients", "2", "--duration", "1.5", "--device",
                   "cpu,cpu", "--threads", "1", "--client-processes", "0", "--json", str(out), "--quiet"])
    report = json.loads(out.read_text())
    assert status == 0 and report["errors"] == 0 and report["device"] == "cpu,cpu" and report["clients"] == 2
    assert len(report["ticks_per_device"]) == 2 and min(report["ticks_per_device"]) > 0  # one client on each
    assert report["client_cpu"] is None  # the clients ran in the server's process: their CPU is its


@pytest.mark.parametrize("argv, needle", [
    (["--device", "cuda:0,,"], "--device 'cuda:0,,': empty entry in the list"),
    (["--device", ",cpu"], "empty entry in the list"),
    (["--device", "cpu,banana"], "--device 'banana' is not a torch device"),
    (["--all-gpus", "--device", "cpu"], "--all-gpus takes every visible GPU; it cannot be combined with --device cpu"),
] + ([] if torch.cuda.is_available() else [
    (["--device", "cpu,cuda:0"], "--device cuda:0: CUDA is not available"),
    (["--all-gpus"], "--device cuda: CUDA is not available"),
]))
@pytest.mark.parametrize("command", ["serve", "bench-latency"])
def test_bad_device_lists_are_clear_errors(capsys, command: str, argv: List[str], needle: str) -> None:
    rc, err = run_cli([command, "--model", "24khz", "--random-weights", *argv], capsys)
    assert rc == 2 and needle in single_error(err)


def test_device_lists_are_checked_entry_by_entry(monkeypatch) -> None:
    """What needs GPUs, with the CUDA checks stood in for: a GPU may appear once (``cuda`` is the current
    one), cpu any number of times, one device type per list; --all-gpus lists every visible GPU."""
    import snac_stream.loading as loading

    monkeypatch.setattr(loading, "resolve_device", lambda spec: torch.device(spec))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert resolve_devices("cuda:0,cuda:1") == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert resolve_devices(" cpu , cpu,cpu") == [torch.device("cpu")] * 3
    assert resolve_devices("cuda:1") == [torch.device("cuda:1")]
    assert resolve_devices("auto", all_gpus=True) == [torch.device("cuda", i) for i in range(3)]
    assert resolve_devices("cuda", all_gpus=True) == [torch.device("cuda", i) for i in range(3)]
    with pytest.raises(ModelLoadError, match="cuda:0 appears twice; a GPU runs one engine set"):
        resolve_devices("cuda,cuda:0")
    with pytest.raises(ModelLoadError, match="cuda:1 appears twice"):
        resolve_devices("cuda:1,cuda:0,cuda:1")
    with pytest.raises(ModelLoadError, match=r"mixes device types \(cpu, cuda\)"):
        resolve_devices("cpu,cuda:0")
