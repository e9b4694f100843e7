"""Production serving: /healthz, /readyz and /metrics on the websocket port, and the graceful drain (in process
and as a ``snac-stream serve`` process sent SIGTERM).

Small random-weight models as in test_server.py; the subprocess tests save one as a checkpoint.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from helpers import settled_outcomes, settled_sessions
from snac_stream.loading import load_model
from snac_stream import client as ws_client
from snac_stream.protocol import ERRORS, PAYLOAD_AUDIO
from snac_stream.server import SNACServer
from test_server import _slow_engines, model_for, offline, serve, signal as _audio

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-ops-token"


# ---- helpers (also used by test_scaleout.py) ------------------------------------------------------------
def http_get(port: int, path: str, method: str = "GET", headers: Optional[Dict[str, str]] = None,
             timeout: float = 5.0) -> Tuple[int, Dict[str, str], bytes]:
    """A plain HTTP request to 127.0.0.1:port: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()


async def aget(port: int, path: str, **kwargs: Any) -> Tuple[int, Dict[str, str], bytes]:
    return await asyncio.to_thread(http_get, port, path, **kwargs)


def metric_values(text: str) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value of a Prometheus text exposition."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_checkpoint(directory: Path) -> Path:
    """The 24 kHz test structure (test_server.model_for('24k')) as a checkpoint a serve process loads."""
    return model_for("24k").save_pretrained(directory)


class ServeProcess:
    """A ``snac-stream serve`` subprocess on a given port (CPU, one engine thread)."""

    def __init__(self, checkpoint: Path, port: int, *args: str, drain_timeout: float = 5.0, log: Optional[Path] = None):
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.port = port
        self.log = log
        self._out = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "snac_stream.cli", "serve", "--model", str(checkpoint), "--device", "cpu",
             "--port", str(port), "--threads", "1", "--drain-timeout", str(drain_timeout),
             "--server-id", f"backend-{port}", "--no-web", *args],
            env=env, stdout=self._out, stderr=self._out)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}: {self.output()}"
            try:
                if http_get(self.port, "/readyz", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"serve on port {self.port} not ready after {timeout} s: {self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.log:
            self._out.close()


# ---- endpoints ------------------------------------------------------------------------------------------
def test_ops_endpoints_answer_without_the_token_reveal_no_secret_and_count_sessions() -> None:
    """With a token and --no-web, /healthz, /readyz and /metrics answer plain GETs without auth; the metrics
    count a completed session, a refused hello, the engine steps and the bytes; no token, session id or
    server id in any body; POST gets 405, an oversized header line 431, the page 426 (off)."""
    model = model_for("24k")
    audio = _audio(9000, seed=4)

    async def test(server: SNACServer):
        result = await ws_client.roundtrip(server.url, audio, chunk_samples=1000, auth=TOKEN)
        with pytest.raises(ws_client.ServerError) as refused:
            await ws_client.Session.open(server.url, "encode", auth="wrong")
        await server.wait_sessions(0)
        answers = {path: await aget(server.port, path) for path in ("/healthz", "/readyz", "/metrics", "/")}
        post = await aget(server.port, "/metrics", method="POST")
        huge = await aget(server.port, "/readyz", headers={"X-Junk": "a" * 20000})
        return result, refused.value, answers, post, huge, server.gateway.server_id

    result, refused, answers, post, huge, server_id = serve(model, test, token=TOKEN, web=False)
    assert refused.code == "unauthorized"
    status, headers, body = answers["/healthz"]
    assert status == 200 and json.loads(body) == {"healthy": True, "reason": "ok"}
    status, headers, body = answers["/readyz"]
    assert status == 200 and json.loads(body) == {"ready": True, "reason": "ready", "sessions_open": 0,
                                                  "slots_free": 8}
    status, headers, body = answers["/metrics"]
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    values = metric_values(text)
    assert values["snac_sessions_total", (("kind", "roundtrip"), ("outcome", "completed"))] == 1
    for code in ERRORS:  # every error code is a series from the start
        assert values["snac_sessions_total", (("kind", "encode"), ("outcome", code))] == 0
    assert values["snac_refusals_total", (("reason", "unauthorized"),)] == 1
    assert values["snac_refusals_total", (("reason", "draining"),)] == 0
    for lane in ("encode", "decode"):
        assert values["snac_engine_step_seconds_count", (("lane", lane),)] > 0
        assert values["snac_engine_batch_streams_sum", (("lane", lane),)] >= \
            values["snac_engine_batch_streams_count", (("lane", lane),)]
    assert values["snac_received_bytes_total", ()] >= audio.size * 2
    assert values["snac_sent_bytes_total", ()] >= audio.size * 2
    assert values["snac_sessions_open", (("kind", "roundtrip"),)] == 0
    assert values["snac_session_slots_free", ()] == 8 and values["snac_ready", ()] == 1
    assert values["snac_build_info", (("device", "cpu"), ("model", "snac"), ("version", ws_client_version()))] == 1
    for status, _, body in answers.values():
        assert TOKEN not in body.decode() and server_id not in body.decode()
    assert f"session\":{result.ready.session}" not in text and "127.0.0.1" not in text
    assert answers["/"][0] == 426  # no page with --no-web: a plain GET of / is a failed websocket handshake
    assert post[0] == 405 and post[1]["allow"] == "GET"
    assert huge[0] == 431  # websockets' parser: Request Header Fields Too Large


def ws_client_version() -> str:
    from snac_stream import __version__
    return __version__


def test_readyz_is_503_when_full_and_healthz_503_while_a_tick_is_stuck_or_the_worker_is_dead() -> None:
    model = model_for("24k")

    async def test(server: SNACServer):
        first = await ws_client.Session.open(server.url, "encode")
        full = await aget(server.port, "/readyz")
        _slow_engines(server, 1.5)
        await first.send_audio(_audio(4000, seed=1))
        stuck = None
        for _ in range(100):  # the slow step is under way within a moment
            stuck = await aget(server.port, "/healthz")
            if stuck[0] == 503:
                break
            await asyncio.sleep(0.05)
        await first.close()
        await server.wait_sessions(0)
        await asyncio.sleep(2.0)  # the slow tick ends
        healthy = await aget(server.port, "/healthz")
        server.worker._ticker.cancel()  # the tick loop gone: the worker is dead
        await asyncio.sleep(0.1)
        dead = await aget(server.port, "/healthz")
        unready = await aget(server.port, "/readyz")
        return full, stuck, healthy, dead, unready

    full, stuck, healthy, dead, unready = serve(model, test, max_sessions=1, stuck_tick_s=0.5)
    assert full[0] == 503 and json.loads(full[2]) == {"ready": False, "reason": "full", "sessions_open": 1,
                                                      "slots_free": 0}
    assert stuck[0] == 503 and json.loads(stuck[2])["reason"].startswith("engine tick running for")
    assert healthy[0] == 200
    assert dead[0] == 503 and json.loads(dead[2]) == {"healthy": False, "reason": "engine worker stopped"}
    assert unready[0] == 503 and json.loads(unready[2])["reason"] == "unhealthy"


# ---- drain ----------------------------------------------------------------------------------------------
def test_slow_and_garbage_http_clients_do_not_stall_sessions_or_the_endpoints() -> None:
    """Slowloris-style clients (a request line trickled a byte at a time, never finished), raw garbage and a
    request that stops after its headers hold no slot and stall nothing: a real-time session beside them
    completes exactly and /healthz answers at once; the half-open requests are closed by the server (the
    websocket library's opening-handshake timeout), not kept forever."""
    model = model_for("24k")
    audio = _audio(24000, seed=11)
    _, expected = offline(model, audio)

    async def trickle(port: int, stop: asyncio.Event) -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10000
        try:
            for byte in request:
                if stop.is_set() or reader.at_eof():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.02)
            return "closed by server" if reader.at_eof() else "still open"
        except (ConnectionError, OSError):
            return "closed by server"
        finally:
            writer.close()

    async def one_shot(port: int, data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), 20)  # what the server answers before it closes
        finally:
            writer.close()

    async def test(server: SNACServer):
        stop = asyncio.Event()
        slow = [asyncio.ensure_future(trickle(server.port, stop)) for _ in range(20)]
        garbage = asyncio.ensure_future(one_shot(server.port, b"\x16\x03\x01\x02\x00" + os.urandom(500)))
        headers_only = asyncio.ensure_future(one_shot(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n"))
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        health = await aget(server.port, "/healthz")
        health_s = time.monotonic() - t0
        result = await ws_client.roundtrip(server.url, audio, chunk_samples=960, realtime=True,
                                           sample_format="float32")
        sessions_during = await settled_sessions(server)  # the roundtrip's own slot is freed just after it ends
        endings = await asyncio.wait_for(asyncio.gather(*slow), 30)
        stop.set()
        return health, health_s, result, sessions_during, endings, await garbage, await headers_only

    health, health_s, result, sessions_during, endings, garbage, headers_only = serve(model, test)
    assert health[0] == 200 and health_s < 1.0
    assert result.audio.shape == audio.shape and np.abs(result.audio - expected[: audio.size]).max() <= 1e-5
    assert sessions_during == 0  # none of the HTTP clients held a slot
    assert endings == ["closed by server"] * 20  # the handshake timeout closed every trickle
    assert garbage.startswith(b"HTTP/1.1 400") or garbage == b""  # refused (or dropped), never a hang
    assert headers_only == b"" or headers_only.startswith(b"HTTP/1.1")


def test_drain_lets_an_open_session_finish_exactly_and_refuses_new_ones() -> None:
    model = model_for("24k")
    audio = _audio(24000, seed=7)  # one second, sent in real time
    codes, expected = offline(model, audio)

    async def test(server: SNACServer):
        session = asyncio.ensure_future(ws_client.roundtrip(server.url, audio, chunk_samples=960, realtime=True,
                                                            sample_format="float32"))
        await asyncio.sleep(0.3)
        assert server.active_sessions == 1
        drain = asyncio.ensure_future(server.drain(20))
        await asyncio.sleep(0.05)
        readyz = await aget(server.port, "/readyz")
        metrics = metric_values((await aget(server.port, "/metrics"))[2].decode())
        with pytest.raises(ws_client.ServerError) as refused:
            await ws_client.Session.open(server.url, "decode")
        result = await session
        summary = await drain
        return result, readyz, metrics, refused.value, summary

    result, readyz, metrics, refused, summary = serve(model, test)
    assert readyz[0] == 503 and json.loads(readyz[2]) == {"ready": False, "reason": "draining", "sessions_open": 1,
                                                          "slots_free": 7}
    assert metrics["snac_draining", ()] == 1 and metrics["snac_ready", ()] == 0
    assert refused.code == "draining" and refused.close_code == 1013
    assert result.audio.shape == audio.shape and np.abs(result.audio - expected[: audio.size]).max() <= 1e-5
    assert result.done["output_samples"] == audio.size
    assert summary["sessions_open_at_start"] == 1 and summary["sessions_ended_at_timeout"] == 0
    assert summary["seconds"] < 5


def test_drain_timeout_ends_the_sessions_left_with_going_away_1001() -> None:
    model = model_for("24k")

    async def test(server: SNACServer):
        held = await ws_client.Session.open(server.url, "roundtrip")
        await held.send_audio(_audio(3000, seed=2))
        t0 = time.monotonic()
        summary = await server.drain(0.5)
        elapsed = time.monotonic() - t0
        with pytest.raises(ws_client.ServerError) as ended:
            while True:
                await asyncio.wait_for(held.receive(), 5)
        return summary, elapsed, ended.value, await settled_outcomes(server, 1)

    summary, elapsed, ended, outcomes = serve(model, test)
    assert summary["sessions_ended_at_timeout"] == 1 and 0.5 <= elapsed < 3
    assert ended.code == "going_away" and ended.close_code == 1001
    assert outcomes == {("roundtrip", "going_away"): 1}


def test_drain_is_not_held_up_by_connections_that_sent_no_hello() -> None:
    """Connections without a hello hold no session and do not make the drain wait for its timeout: it ends once
    the open session has finished, and closes one still silent with 1001 (no `error`); one that sends its hello
    during the drain gets `draining`."""
    model = model_for("24k")
    audio = _audio(6000, seed=5)

    async def test(server: SNACServer):
        silent = await connect(server.url, compression=None)
        late = await connect(server.url, compression=None)
        session = asyncio.ensure_future(ws_client.roundtrip(server.url, audio, chunk_samples=2000, realtime=True,
                                                            sample_format="float32"))
        while not server.active_sessions:
            await asyncio.sleep(0.01)
        summary = asyncio.ensure_future(server.drain(10))
        await asyncio.sleep(0.05)
        await late.send(json.dumps({"type": "hello", "kind": "encode"}))
        refused = json.loads(await asyncio.wait_for(late.recv(), 5))
        result = await session
        summary = await summary
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(silent.recv(), 5)
        return summary, refused, late.close_code, silent.close_code, result

    summary, refused, late_code, silent_code, result = serve(model, test)
    assert summary["sessions_ended_at_timeout"] == 0 and summary["seconds"] < 3
    assert refused["code"] == "draining" and late_code == 1013
    assert silent_code == 1001
    assert result.done["output_samples"] == audio.size


def test_serve_process_drains_on_sigterm_and_exits_0(tmp_path) -> None:
    """``snac-stream serve`` sent SIGTERM: /readyz says draining, a session flushed during the drain completes
    exactly, one left open gets going_away (1001) at --drain-timeout, and the process exits 0 soon after."""
    ckpt = save_checkpoint(tmp_path / "ckpt")
    model = load_model(str(ckpt), torch.device("cpu")).eval()
    port = free_port()
    server = ServeProcess(ckpt, port, drain_timeout=2.0, log=tmp_path / "serve.log")
    audio = _audio(12000, seed=9)
    _, expected = offline(model, audio)
    try:
        server.wait_ready()

        async def run() -> Tuple[Any, ...]:
            url = f"ws://127.0.0.1:{port}"
            finishing = await ws_client.Session.open(url, "roundtrip", sample_format="float32")
            held = await ws_client.Session.open(url, "encode")
            await held.send_audio(audio[:2000])
            await finishing.send_audio(audio[:5000])
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            readyz = await aget(port, "/readyz")
            await finishing.send_audio(audio[5000:])
            await finishing.flush()
            out: List[np.ndarray] = []
            while True:
                item = await asyncio.wait_for(finishing.receive(), 10)
                if isinstance(item, dict):
                    if item["type"] == "done":
                        break
                    continue
                if item.payload_kind == PAYLOAD_AUDIO:
                    out.append(item.data)
            with pytest.raises(ws_client.ServerError) as ended:
                while True:
                    await asyncio.wait_for(held.receive(), 10)
            code = await asyncio.to_thread(server.proc.wait, 15)
            return readyz, np.concatenate(out), ended.value, code, time.monotonic() - t0

        readyz, decoded, ended, code, elapsed = asyncio.run(asyncio.wait_for(run(), 60))
    finally:
        server.stop()
    assert readyz[0] == 503 and json.loads(readyz[2])["reason"] == "draining"
    assert np.abs(decoded[: audio.size] - expected[: audio.size]).max() <= 1e-5 and decoded.size >= audio.size
    assert ended.code == "going_away" and ended.close_code == 1001
    assert code == 0 and elapsed < 2.0 + 5, server.output()
    assert "drained in" in server.output()
