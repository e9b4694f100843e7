"""A server with front-end processes (``serve --frontends N``, :class:`MultiProcessServer`): the websockets of
each session served by one of N processes, the engines by this one. Every kind of session exact across the
process boundary, errors of both sides, slots and /readyz for the whole server, /metrics adding up every
process, drain, and what happens when a front end or the engine process dies.

Small random-weight models as in test_server.py. Which front end takes a connection is the kernel's choice
(SO_REUSEPORT hashes each connection): tests that need both front ends open enough connections that all of
them landing on one is a 1-in-30000 event, and check from the session numbers (front end k of N numbers its
sessions k+1, k+1+N, ...) that both served.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import re
import signal
import time
from typing import Any, Awaitable, Callable, List

import numpy as np
import psutil
import pytest
import torch

from snac_stream import client as ws_client
from snac_stream.protocol import PAYLOAD_TOKENS
from snac_stream.server import ServerOptions
from snac_stream.server.frontends import MultiProcessServer, pack_input, unpack_input
from snac_stream.tokens import get_layout
from test_ops import ServeProcess, aget, free_port, metric_values, save_checkpoint
from test_server import AUDIO_TOL, _as_received, assert_session_exact, model_for, random_chunks, signal as _audio

FRONTENDS = 2


def serve_split(test: Callable[[MultiProcessServer], Awaitable[Any]], frontends: int = FRONTENDS,
                **options: Any) -> Any:
    """Run ``test(server)`` against a server with ``frontends`` front-end processes on an ephemeral port."""
    async def run() -> Any:
        async with MultiProcessServer(model_for("24k"), ServerOptions(port=0, threads=1, **options),
                                      frontends=frontends) as server:
            return await asyncio.wait_for(test(server), 120)
    return asyncio.run(run())


def _front_end_of(session_number: int) -> int:
    return (session_number - 1) % FRONTENDS


def test_every_kind_of_session_equals_offline_through_either_front_end() -> None:
    """16 concurrent sessions (roundtrip pcm16 and float32, encode, decode of Orpheus tokens) with random
    chunkings, each exact against offline, served by both front ends; the session numbers are unique."""
    model = model_for("24k")
    rng = np.random.default_rng(21)
    interleaved = get_layout("interleaved", model.config)
    orpheus = get_layout("orpheus", model.config, token_offset=10)

    async def one(server: MultiProcessServer, k: int):
        kind = ("roundtrip", "encode", "decode", "roundtrip")[k % 4]
        if kind == "decode":
            frames = int(rng.integers(4, 20))
            codes = [torch.from_numpy(rng.integers(0, 4096, (1, frames * r))) for r in (1, 2, 4)]
            tokens = orpheus.to_flat(codes)[0].numpy()
            result = await ws_client.decode(server.url, tokens, chunk_tokens=random_chunks(rng, 6, 40),
                                            token_layout="orpheus", token_offset=10)
            return kind, codes, result, orpheus, 1 / 32768 + AUDIO_TOL  # pcm16 out
        audio = _audio(int(rng.integers(6000, 16000)), seed=k)
        fmt = "float32" if k % 8 == 0 else "pcm16"
        audio = _as_received(audio, fmt)
        chunks = random_chunks(rng, 8, 3000)
        if kind == "encode":
            result = await ws_client.encode(server.url, audio, chunk_samples=chunks, sample_format=fmt)
        else:
            result = await ws_client.roundtrip(server.url, audio, chunk_samples=chunks, sample_format=fmt)
        return kind, audio, result, interleaved, AUDIO_TOL if fmt == "float32" else 1 / 32768 + AUDIO_TOL

    async def test(server: MultiProcessServer):
        return await asyncio.gather(*(one(server, k) for k in range(16)))

    results = serve_split(test, max_sessions=16)
    numbers = [result.ready.session for _, _, result, _, _ in results]
    assert len(set(numbers)) == len(numbers)
    assert {_front_end_of(n) for n in numbers} == set(range(FRONTENDS))  # both front ends served
    for kind, given, result, layout, tol in results:
        assert_session_exact(model, kind, given, result, layout, tol)


def test_slots_readyz_and_server_full_count_the_whole_server() -> None:
    """2 slots for the whole server, whichever front end a hello reaches: a third session is refused with
    server_full while every front end's /readyz says full; a slot freed on one is taken through any."""

    async def test(server: MultiProcessServer):
        held = [await ws_client.Session.open(server.url, "roundtrip") for _ in range(2)]
        refusals = []
        for _ in range(6):  # several connections: both front ends get some, with near certainty
            with pytest.raises(ws_client.ServerError) as refused:
                await ws_client.Session.open(server.url, "encode")
            refusals.append(refused.value.code)
        full = [await aget(server.port, "/readyz") for _ in range(6)]
        await held.pop().close()
        while server.active_sessions > 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(2 * 0.5)  # every front end has heard the engine's status since
        ready = [await aget(server.port, "/readyz") for _ in range(6)]
        again = await ws_client.Session.open(server.url, "encode")
        numbers = [s.ready.session for s in (*held, again)]
        for s in (*held, again):
            await s.close()
        return refusals, full, ready, numbers

    refusals, full, ready, numbers = serve_split(test, max_sessions=2)
    assert refusals == ["server_full"] * 6
    for status, _, body in full:
        assert status == 503 and json.loads(body)["reason"] == "full" and json.loads(body)["slots_free"] == 0
    for status, _, body in ready:
        assert status == 200 and json.loads(body)["slots_free"] == 1


def test_metrics_of_any_front_end_add_up_every_process() -> None:
    """Sessions completed through both front ends and one refused hello: a scrape of either front end counts
    them all, with the engine process's ticks and step histogram."""
    audio = _audio(5000, seed=3)

    async def test(server: MultiProcessServer):
        results = await asyncio.gather(*(ws_client.roundtrip(server.url, audio, chunk_samples=700)
                                         for _ in range(16)))
        with pytest.raises(ws_client.ServerError):
            await ws_client.Session.open(server.url, "encode", token_layout="no-such-layout")
        while server.active_sessions:
            await asyncio.sleep(0.01)
        scrapes = [metric_values((await aget(server.port, "/metrics"))[2].decode()) for _ in range(4)]
        return results, scrapes

    results, scrapes = serve_split(test, max_sessions=16)
    assert {_front_end_of(r.ready.session) for r in results} == set(range(FRONTENDS))
    for values in scrapes:
        assert values["snac_sessions_total", (("kind", "roundtrip"), ("outcome", "completed"))] == 16
        assert values["snac_refusals_total", (("reason", "bad_hello"),)] == 1
        assert values["snac_engine_ticks_total", ()] > 0
        assert values["snac_engine_step_seconds_count", (("lane", "encode"),)] > 0
        assert values["snac_received_bytes_total", ()] >= 16 * audio.size * 2
        assert values["snac_sessions_open", (("kind", "roundtrip"),)] == 0
        assert values["snac_ready", ()] == 1 and values["snac_healthy", ()] == 1


def test_errors_from_either_side_end_their_session_alone() -> None:
    """An error found by a front end (an unknown message) and one found in the engine process (the encoder
    refuses a session's input: its internal_error crosses the link) end those sessions alone, with their
    codes, while the roundtrips beside them stay exact."""
    model = model_for("24k")
    audio = [_audio(12000 + 1000 * i, seed=40 + i) for i in range(2)]
    layout = get_layout("interleaved", model.config)

    async def test(server: MultiProcessServer):
        encoder = server.engine_sets[0].encoder  # this process runs the engines: patch them as test_server does
        submit_arrays = encoder.submit_arrays
        victim: List[int] = []

        def refuse(sids, pieces):  # a call with the victim's input, or the victim's own retry
            if victim and victim[0] in sids:
                raise ValueError("refused")
            return submit_arrays(sids, pieces)

        encoder.submit_arrays = refuse

        async def victim_session() -> Any:
            await asyncio.sleep(0.1)
            victim.append(encoder._free[0])  # the slot this session will take
            return await ws_client.roundtrip(server.url, audio[0], chunk_samples=700, realtime=True)

        async def unknown_message() -> Any:
            session = await ws_client.Session.open(server.url, "encode")
            await session.ws.send(json.dumps({"type": "rewind"}))
            while True:
                await session.receive()  # raises the server's error

        healthy = [ws_client.roundtrip(server.url, a, chunk_samples=480, realtime=True) for a in audio]
        return await asyncio.gather(*healthy, victim_session(), unknown_message(), return_exceptions=True)

    *good, refused, unknown = serve_split(test)
    assert isinstance(refused, ws_client.ServerError) and refused.code == "internal_error"
    assert "ValueError" in refused.message
    assert isinstance(unknown, ws_client.ServerError) and unknown.code == "unknown_message"
    for given, result in zip(audio, good):
        assert_session_exact(model, "roundtrip", given, result, layout, 1 / 32768 + AUDIO_TOL)


def test_drain_lets_open_sessions_finish_and_refuses_new_ones() -> None:
    """A drain (what SIGTERM starts) while sessions stream through the front ends: new hellos are refused with
    draining (or the port is closed once all front ends stopped), every open session completes exactly."""
    model = model_for("24k")
    audio = _audio(24000, seed=9)
    layout = get_layout("interleaved", model.config)

    async def test(server: MultiProcessServer):
        streams = [asyncio.ensure_future(ws_client.roundtrip(server.url, audio, chunk_samples=480, realtime=True))
                   for _ in range(6)]
        while sum((await server.front_stats()).get("open_by_kind", {}).values()) < 6:  # the front ends' count
            await asyncio.sleep(0.01)
        draining = asyncio.ensure_future(server.drain(30.0))
        await asyncio.sleep(0.3)
        refused = []
        for _ in range(4):
            try:
                await ws_client.Session.open(server.url, "encode")
                refused.append("accepted")
            except ws_client.ServerError as exc:
                refused.append(exc.code)
            except OSError:
                refused.append("closed")
        return await asyncio.gather(*streams), refused, await draining

    results, refused, summary = serve_split(test)
    assert set(refused) <= {"draining", "closed"} and "draining" in refused
    assert summary["sessions_open_at_start"] == 6 and summary["sessions_ended_at_timeout"] == 0
    for result in results:
        assert_session_exact(model, "roundtrip", audio, result, layout, 1 / 32768 + AUDIO_TOL)


def test_a_front_end_that_dies_drops_its_sessions_and_another_takes_its_place() -> None:
    """SIGKILL one front end: the engine process frees its sessions' slots, a session open on the other front
    end streams on exactly (its tokens equal offline encode), and a new process takes the dead one's place:
    it serves sessions again (numbered from a new block: no number given twice) and /healthz stays 200."""
    model = model_for("24k")
    audio = _audio(12000, seed=10)
    layout = get_layout("interleaved", model.config)

    async def test(server: MultiProcessServer):
        async def on_front_end(k: int, kind: str = "roundtrip") -> ws_client.Session:
            for _ in range(64):  # the kernel's hash decides: try until one lands there
                session = await ws_client.Session.open(server.url, kind, sample_format="float32")
                if _front_end_of(session.ready.session) == k:
                    return session
                await session.close()
            raise AssertionError(f"no session reached front end {k}")

        victim = await on_front_end(1)
        survivor = await on_front_end(0, "encode")
        old_pid = server.processes[1].pid
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while server.active_sessions > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        freed = server.active_sessions  # the survivor's session only
        for start in range(0, audio.size, 1000):  # the survivor streams after the kill
            await survivor.send_audio(audio[start:start + 1000])
        await survivor.flush()
        tokens = []
        while True:
            message = await survivor.receive()
            if isinstance(message, dict):
                if message["type"] == "done":
                    break
            elif message.payload_kind == PAYLOAD_TOKENS:
                tokens.append(message.data)
        health = [await aget(server.port, "/healthz")]
        deadline = time.monotonic() + 60
        while server.replaced < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        health.append(await aget(server.port, "/healthz"))
        again = await on_front_end(1)
        numbers = (victim.ready.session, again.ready.session)
        await again.close()
        return freed, health, old_pid, server.processes[1].pid, numbers, np.concatenate(tokens)

    freed, health, old_pid, new_pid, (before, after), tokens = serve_split(test, max_sessions=8)
    assert freed == 1
    assert all(status == 200 for status, _, _ in health), health
    assert new_pid != old_pid and before != after
    with torch.inference_mode():
        codes = model.encode(torch.from_numpy(audio).view(1, 1, -1))
    np.testing.assert_array_equal(tokens, layout.to_flat(codes)[0].numpy())


def test_serve_with_front_ends_drains_on_sigterm_and_its_front_ends_follow_a_killed_server(tmp_path) -> None:
    """``snac-stream serve --frontends 2``: a session through it is exact; SIGTERM drains and exits 0 with its
    front ends; a second server killed with SIGKILL leaves no front end behind (each sees its link close)."""
    model = model_for("24k")
    checkpoint = save_checkpoint(tmp_path / "ckpt")
    audio = _audio(9000, seed=11)
    for way in ("sigterm", "sigkill"):
        port = free_port()
        server = ServeProcess(checkpoint, port, "--frontends", "2", log=tmp_path / f"{way}.log")
        try:
            server.wait_ready()
            children = psutil.Process(server.proc.pid).children()
            assert len(children) >= 2
            if way == "sigterm":
                result = asyncio.run(ws_client.roundtrip(f"ws://127.0.0.1:{port}", audio, chunk_samples=900))
                assert_session_exact(model, "roundtrip", audio, result, get_layout("interleaved", model.config),
                                     1 / 32768 + AUDIO_TOL)
                server.proc.send_signal(signal.SIGTERM)
                assert server.proc.wait(30) == 0, server.output()
                assert "drained in" in server.output()
            else:
                server.proc.kill()
                server.proc.wait(10)
            gone, alive = psutil.wait_procs(children, timeout=15)
            assert not alive, f"front ends left running after {way}: {alive}"
        finally:
            server.stop()


@pytest.mark.parametrize("output_format", ["float32", "mulaw"])
def test_an_llm_session_through_a_front_end_tells_its_llm_error_after_the_audio_of_whole_frames(
        output_format: str) -> None:
    """An llm session's LLM fails after 3 whole frames: through a front end the client gets what it gets from
    a one-process server, byte for byte: the frames' audio (its tail flagged final; float32: exact against
    offline decode of those frames; mu-law: the output converter's tail included), then llm_error in done's
    place. The error the front end set crosses the link and back and keeps its place after the audio."""
    from sse_server import Script, SSEServer, signal_codes, tiny_model
    from snac_stream.client import LLMSessionStats, ServerError, llm_speech
    from snac_stream.server import SNACServer
    from snac_stream.tokens import OrpheusLayout, format_custom_tokens

    model = tiny_model()
    codes = signal_codes(model)
    ids = OrpheusLayout().to_flat(codes)[0].tolist()
    pieces = [format_custom_tokens(ids[i:i + 7]) for i in range(0, 42, 7)]  # one frame a piece
    formats = {"sample_format": output_format, **({"sample_rate": 8000} if output_format == "mulaw" else {})}

    async def scenario(frontends: int):
        async with SSEServer(Script(pieces, error_event_at=3)) as llm:
            options = ServerOptions(port=0, threads=1, web=False, max_sessions=2, allow_llm=[llm.url])
            server = (MultiProcessServer(model, options, frontends=frontends) if frontends
                      else SNACServer(model, options))
            async with server:
                frames, error = [], None
                try:
                    async for frame in llm_speech(server.url, {"url": llm.url, "model": "m", "prompt": "Hi."},
                                                  stats=LLMSessionStats(), **formats):
                        frames.append(frame)
                except ServerError as exc:
                    error = exc
                return frames, error

    frames, error = asyncio.run(scenario(FRONTENDS))
    alone, alone_error = asyncio.run(scenario(0))
    assert error is not None and error.code == "llm_error" and error.fields["reason"] == "server"
    unported = [re.sub(r"127\.0\.0\.1:\d+", "LLM", e.message) for e in (error, alone_error)]  # each run's own LLM
    assert error.fields == alone_error.fields and unported[0] == unported[1]
    assert frames and frames[-1].final
    as_bytes = [bytes(np.asarray(f.data).tobytes()) if not isinstance(f.data, bytes) else f.data for f in frames]
    assert as_bytes == [bytes(np.asarray(f.data).tobytes()) if not isinstance(f.data, bytes) else f.data
                        for f in alone]
    if output_format == "float32":
        with torch.inference_mode():
            expected = model.decode([c[:, : 3 * r] for c, r in zip(codes, (1, 2, 4))])[0, 0].numpy()
        assert np.abs(np.concatenate([f.data for f in frames]) - expected).max() <= 1e-5


@pytest.mark.parametrize("item", [np.linspace(-1, 1, 2048, dtype=np.float32),  # a step of samples
                                  np.arange(3 * 7, dtype=np.int64),  # coarse frames, flattened
                                  np.frombuffer(np.arange(7, dtype=np.int64).tobytes(), np.int64),  # read-only
                                  np.arange(40, dtype=np.float32)[::2],  # not contiguous
                                  np.zeros(0, np.float32)])
def test_input_crosses_the_link_as_a_buffer_and_arrives_equal_and_writable(item: np.ndarray) -> None:
    """An ``input`` message carries its array as a pickled buffer and dtype (no numpy reduce per message):
    the engine side gets an equal array of the same dtype that it may hand to torch (writable)."""
    message = pickle.loads(pickle.dumps(("input", 1, *pack_input(item), 0, 0.0), protocol=pickle.HIGHEST_PROTOCOL))
    got = unpack_input(message[2], message[3])
    assert got.dtype == item.dtype and np.array_equal(got, item) and got.flags.writeable
    assert torch.from_numpy(got).numel() == item.size
