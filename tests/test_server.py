"""The websocket server and client over real sockets on 127.0.0.1: exactness, limits, errors, security.

Small random-weight models keep this fast: the 24 kHz structure (step = one coarse frame) with narrow layers,
and the 44 kHz structure (attention, step = four coarse frames).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from typing import Any, Awaitable, Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from helpers import settled_outcomes
from snac_stream import PRESETS, SNAC
from snac_stream import client as ws_client
from snac_stream.cli import main
from snac_stream.protocol import ERRORS, HEADER_BYTES, OutputFrame, encode_audio, encode_tokens, pack_output_frame
from snac_stream.server import ServerOptions, SNACServer
from snac_stream.server.options import default_engine_threads, is_loopback
from snac_stream.tokens import get_layout

AUDIO_TOL = 1e-5
STRUCTURES = {
    "24k": {**PRESETS["24khz"].to_dict(), "encoder_dim": 8, "decoder_dim": 64},
    "44k": {**PRESETS["44khz"].to_dict(), "encoder_dim": 4, "decoder_dim": 64},
}
_MODELS: Dict[str, SNAC] = {}


def model_for(name: str) -> SNAC:
    if name not in _MODELS:
        torch.manual_seed(3)
        _MODELS[name] = SNAC(**STRUCTURES[name]).eval()
    return _MODELS[name]


def signal(samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 24000
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 1500) * t) + 0.05 * rng.standard_normal(samples)
    return np.clip(x, -0.9, 0.9).astype(np.float32)


def offline(model: SNAC, audio: np.ndarray):
    with torch.inference_mode():
        codes = model.encode(torch.from_numpy(audio).view(1, 1, -1))
        return codes, model.decode(codes)[0, 0].numpy()


def assert_session_exact(model, kind: str, given, result, layout, tol: float) -> None:
    """A session's output against offline: decode audio, encode tokens (in ``layout``), roundtrip both."""
    if kind == "decode":
        with torch.inference_mode():
            expected = model.decode(given)[0, 0].numpy()
        assert result.audio.shape == expected.shape
        assert np.abs(result.audio - expected).max() <= tol
        return
    codes, expected = offline(model, given)
    np.testing.assert_array_equal(result.tokens, layout.to_flat(codes)[0].numpy())
    if kind == "roundtrip":
        assert result.audio.shape == given.shape
        assert np.abs(result.audio - expected[: given.size]).max() <= tol


def serve(model: SNAC, test: Callable[[SNACServer], Awaitable[Any]], **options: Any) -> Any:
    """Run ``test(server)`` against a server on an ephemeral loopback port."""
    async def run() -> Any:
        async with SNACServer(model, ServerOptions(port=0, **options)) as server:
            return await asyncio.wait_for(test(server), 120)
    return asyncio.run(run())


def random_chunks(rng: np.random.Generator, n: int, top: int) -> List[int]:
    return [int(c) for c in rng.integers(1, top, size=n)]


# ---- exactness ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU; on the CPU: test_tick_overlap's PCM16 test")
def test_sessions_on_a_gpu_server_equal_offline_in_either_sample_format() -> None:
    """A GPU server (CUDA graphs, outputs copied behind the step, PCM16 converted on the device): decode and
    roundtrip sessions in float32 and PCM16 equal offline coding on the same GPU."""
    model = copy.deepcopy(model_for("24k")).to("cuda")
    rng = np.random.default_rng(21)
    codes = [torch.from_numpy(rng.integers(0, 4096, (1, 12 * r))) for r in (1, 2, 4)]
    tokens = get_layout("interleaved", model.config).to_flat(codes)[0].numpy()
    audio = signal(30000, seed=22)
    audio16 = np.frombuffer(encode_audio(audio, "pcm16"), "<i2").astype(np.float32) / 32768
    with torch.inference_mode():
        decoded = model.decode([c.cuda() for c in codes])[0, 0].cpu().numpy()
        roundtrips = {}
        for name, x in (("float32", audio), ("pcm16", audio16)):
            got = model.encode(torch.from_numpy(x).view(1, 1, -1).cuda())
            roundtrips[name] = model.decode(got)[0, 0].cpu().numpy()

    async def test(server: SNACServer):
        return await asyncio.gather(*(
            [ws_client.decode(server.url, tokens, chunk_tokens=7 * 3, sample_format=f) for f in ("float32", "pcm16")]
            + [ws_client.roundtrip(server.url, audio if f == "float32" else audio16, chunk_samples=480,
                                   sample_format=f) for f in ("float32", "pcm16")]))

    results = serve(model, test, max_sessions=4)
    for result, fmt in zip(results[:2], ("float32", "pcm16")):
        tol = AUDIO_TOL if fmt == "float32" else 1 / 32768 + AUDIO_TOL
        assert result.audio.shape == decoded.shape and np.abs(result.audio - decoded).max() <= tol
    for result, fmt in zip(results[2:], ("float32", "pcm16")):
        tol = AUDIO_TOL if fmt == "float32" else 1 / 32768 + AUDIO_TOL
        assert result.audio.shape == audio.shape
        assert np.abs(result.audio - roundtrips[fmt][: audio.size]).max() <= tol


@pytest.mark.parametrize("name", ["24k", "44k"])
@pytest.mark.parametrize("sample_format", ["float32", "pcm16"])
def test_roundtrip_equals_offline_for_random_chunkings(name: str, sample_format: str) -> None:
    model = model_for(name)
    rng = np.random.default_rng(hash((name, sample_format)) % 2**32)
    audio = signal(int(rng.integers(20000, 40000)), seed=1)
    if sample_format == "pcm16":  # what the server sees
        audio = np.frombuffer(encode_audio(audio, "pcm16"), "<i2").astype(np.float32) / 32768
    codes, expected = offline(model, audio)
    chunks = random_chunks(rng, 16, 5000) + [1, 2, 3]

    handed: List[int] = [0]  # the input count after each hand-over to the engines
    step_samples: List[int] = []

    async def test(server: SNACServer):
        step_samples.append(server.step_samples)
        deliver = server.workers.deliver

        def recorded(session: Any, item: Any, now: float) -> None:
            handed.append(session.loop.received)
            deliver(session, item, now)

        server.workers.deliver = recorded  # type: ignore[method-assign]
        return await ws_client.roundtrip(server.url, audio, chunk_samples=chunks, sample_format=sample_format)

    result = serve(model, test)
    # Input goes to the engines whole steps at a time: each hand-over but the flush's completes a step.
    (step,) = step_samples
    assert handed[-1] == audio.size
    assert all(b // step > a // step for a, b in zip(handed[:-2], handed[1:-1])) and handed[-2] < handed[-1]
    assert len(handed) - 1 <= audio.size // step + 1  # not one per message
    flat = get_layout("interleaved", model.config).to_flat(codes)[0].numpy()
    np.testing.assert_array_equal(result.tokens, flat)
    assert result.audio.shape == audio.shape  # trimmed to what was sent
    tol = AUDIO_TOL if sample_format == "float32" else 1 / 32768 + AUDIO_TOL
    assert np.abs(result.audio - expected[: audio.size]).max() <= tol
    assert result.done == {"type": "done", "input_items": audio.size, "output_samples": audio.size,
                           "output_tokens": flat.size}


@pytest.mark.parametrize("name", ["24k", "44k"])
def test_encode_tokens_equal_offline(name: str) -> None:
    model = model_for(name)
    rng = np.random.default_rng(5)
    audio = signal(30001, seed=2)
    codes, _ = offline(model, audio)

    async def test(server: SNACServer):
        return await ws_client.encode(server.url, audio, chunk_samples=random_chunks(rng, 9, 7000),
                                      sample_format="float32", token_layout="interleaved-offsets", token_offset=7)

    result = serve(model, test)
    layout = get_layout("interleaved-offsets", model.config, token_offset=7)
    np.testing.assert_array_equal(result.tokens, layout.to_flat(codes)[0].numpy())
    assert result.audio.size == 0


def test_decode_orpheus_tokens_equal_offline() -> None:
    model = model_for("24k")
    rng = np.random.default_rng(6)
    frames = 23
    codes = [torch.from_numpy(rng.integers(0, 4096, (1, frames * r))) for r in (1, 2, 4)]
    layout = get_layout("orpheus", model.config, token_offset=128266)  # raw Orpheus LLM vocabulary ids
    tokens = layout.to_flat(codes)[0].numpy()
    with torch.inference_mode():
        expected = model.decode(codes)[0, 0].numpy()

    async def test(server: SNACServer):
        return await ws_client.decode(server.url, tokens, chunk_tokens=random_chunks(rng, 11, 20),
                                      sample_format="float32", token_layout="orpheus", token_offset=128266)

    result = serve(model, test)
    assert result.audio.shape == expected.shape
    assert np.abs(result.audio - expected).max() <= AUDIO_TOL


def test_decode_tokens_go_to_the_engines_whole_steps_at_a_time() -> None:
    """Tokens sent a few at a time (random chunks, partial frames included) reach the engines whole decoder
    steps at a time (4 coarse frames here), each hand-over but the flush's completing a step, and the audio
    still equals offline decoding."""
    model = model_for("44k")
    rng = np.random.default_rng(9)
    frames = 4 * 7
    codes = [torch.from_numpy(rng.integers(0, 4096, (1, frames * 8 // s))) for s in model.config.vq_strides]
    layout = get_layout("interleaved", model.config)
    tokens = layout.to_flat(codes)[0].numpy()
    with torch.inference_mode():
        expected = model.decode(codes)[0, 0].numpy()
    handed: List[int] = [0]  # coarse frames handed over so far, after each hand-over
    step_frames: List[int] = []
    width = sum(model.config.codes_per_frame)

    async def test(server: SNACServer):
        step_frames.append(server.step_frames)
        deliver = server.workers.deliver

        def recorded(session: Any, item: Any, now: float) -> None:
            assert item.ndim == 1 and item.size % width == 0  # coarse frames, flattened
            handed.append(handed[-1] + item.size // width)
            deliver(session, item, now)

        server.workers.deliver = recorded  # type: ignore[method-assign]
        return await ws_client.decode(server.url, tokens, chunk_tokens=random_chunks(rng, 40, 12),
                                      sample_format="float32")

    result = serve(model, test)
    (step,) = step_frames
    assert step == 4 and handed[-1] == frames
    assert all(b // step > a // step for a, b in zip(handed[:-1], handed[1:]))
    assert len(handed) - 1 <= frames // step + 1  # not one per message
    assert result.audio.shape == expected.shape
    assert np.abs(result.audio - expected).max() <= AUDIO_TOL


def test_a_decode_stream_ending_inside_a_decoder_step_is_refused_after_its_whole_steps() -> None:
    """A 44 kHz stream (4 coarse frames a decoder step) of 9 frames: its end says ``bad_tokens`` with the one
    frame the lane holds left over, not a crash; the server serves on, and the same stream's whole steps
    decode exactly."""
    model = model_for("44k")
    rng = np.random.default_rng(3)
    layout = get_layout("interleaved", model.config)
    codes = [torch.from_numpy(rng.integers(0, 4096, (1, 9 * 8 // s))) for s in model.config.vq_strides]
    whole = [c[:, : c.shape[-1] * 8 // 9] for c in codes]
    with torch.inference_mode():
        expected = model.decode(whole)[0, 0].numpy()

    async def test(server: SNACServer):
        with pytest.raises(ws_client.ServerError) as refused:
            await ws_client.decode(server.url, layout.to_flat(codes)[0].numpy(), chunk_tokens=15,
                                   sample_format="float32")
        after = await ws_client.decode(server.url, layout.to_flat(whole)[0].numpy(), chunk_tokens=15,
                                       sample_format="float32")
        return refused.value, after

    error, after = serve(model, test)
    assert error.code == "bad_tokens" and "1 coarse frames left over" in error.message
    assert "whole steps of 4 frames" in error.message
    assert after.audio.shape == expected.shape and np.abs(after.audio - expected).max() <= AUDIO_TOL


def test_decode_paced_in_real_time_sends_each_frame_when_its_audio_is_generated() -> None:
    """``decode(..., realtime=True)``: a message of whole coarse frames goes out when the audio its tokens
    describe would have been generated; the latency split counts ``input_end`` tokens as that audio, so the
    algorithmic part stays within the decode bound (reached: one frame a message is one step here)."""
    model = model_for("24k")
    rng = np.random.default_rng(8)
    frames, frame = 6, model.config.frame_samples
    codes = [torch.from_numpy(rng.integers(0, 4096, (1, frames * r))) for r in (1, 2, 4)]
    tokens = get_layout("interleaved", model.config).to_flat(codes)[0].numpy()

    async def test(server: SNACServer):
        result = await ws_client.decode(server.url, tokens, chunk_tokens=7, realtime=True, sample_format="float32")
        return result, server.latency["decode"]

    result, bound = serve(model, test)
    assert result.t0 is not None and len(result.send_times) == frames
    for k, (sent, at) in enumerate(result.send_times):
        assert sent == 7 * (k + 1) and at - result.t0 >= (k + 1) * frame / 24000 - 1e-3
    assert ws_client.input_samples(result.ready, 7) == frame
    parts = ws_client.latency_breakdown(result)
    assert parts["algorithmic"].size and parts["algorithmic"].max() == pytest.approx(bound / 24000, abs=1e-9)
    np.testing.assert_allclose(parts["total"], parts["algorithmic"] + parts["server"] + parts["transport"])


def _as_received(audio: np.ndarray, sample_format: str) -> np.ndarray:
    """The samples the server decodes from ``audio`` sent in ``sample_format``."""
    if sample_format == "float32":
        return audio
    return np.frombuffer(encode_audio(audio, "pcm16"), "<i2").astype(np.float32) / 32768


def test_concurrent_sessions_of_every_kind_layout_and_format_are_each_exact() -> None:
    """Each tick converts its sessions' outputs per batch (tokens once per layout, PCM once per sample format)
    and submits every session's audio in one call: a mix of kinds, layouts and formats running at once,
    started at different times (some warming up while others are in the batch), each equals its own offline
    result."""
    model = model_for("24k")
    rng = np.random.default_rng(11)
    specs = [("roundtrip", "pcm16", "interleaved", 0), ("roundtrip", "float32", "orpheus", 128266),
             ("encode", "float32", "interleaved-offsets", 7), ("roundtrip", "float32", "interleaved", 0),
             ("decode", "pcm16", "orpheus", 10), ("encode", "pcm16", "interleaved", 0),
             ("decode", "float32", "interleaved", 0), ("roundtrip", "pcm16", "orpheus", 0)]
    inputs = []
    for i, (kind, fmt, _, _) in enumerate(specs):
        if kind == "decode":
            inputs.append([torch.from_numpy(rng.integers(0, 4096, (1, 17 * r))) for r in (1, 2, 4)])
        else:
            inputs.append(_as_received(signal(int(rng.integers(9000, 30000)), seed=20 + i), fmt))
    chunkings = [random_chunks(rng, 12, 4000) for _ in specs]

    async def one(i: int) -> Any:
        kind, fmt, name, offset = specs[i]
        await asyncio.sleep(0.01 * i)
        hello = dict(sample_format=fmt, token_layout=name, token_offset=offset)
        if kind == "decode":
            tokens = get_layout(name, model.config, token_offset=offset).to_flat(inputs[i])[0].numpy()
            return await ws_client.decode(server_url, tokens, chunk_tokens=chunkings[i], **hello)
        stream = ws_client.encode if kind == "encode" else ws_client.roundtrip
        return await stream(server_url, inputs[i], chunk_samples=chunkings[i], realtime=True, **hello)

    async def test(server: SNACServer):
        nonlocal server_url
        server_url = server.url
        _slow_engines(server, 0.01)  # input of several sessions arrives during each step
        submit_arrays, emit = server.encoder.submit_arrays, server.engines.encode.emit
        server.encoder.submit_arrays = lambda sids, pieces: (  # type: ignore[method-assign]
            shared["submit"].append(len(sids)), submit_arrays(sids, pieces))[1]
        server.engines.encode.emit = lambda sessions, *args, **kw: (  # type: ignore[method-assign]
            shared["emit"].append(collections.Counter((s.layout.name, s.layout.token_offset) for s in sessions)),
            emit(sessions, *args, **kw))[1]
        return await asyncio.gather(*(one(i) for i in range(len(specs))))

    server_url = ""
    shared: Dict[str, List[Any]] = {"submit": [], "emit": []}
    results = serve(model, test)
    # The batched paths ran: one submit for several sessions; one step's codes going out in several layouts,
    # several sessions to a layout.
    assert max(shared["submit"]) >= 3
    assert max(len(layouts) for layouts in shared["emit"]) >= 2
    assert max(max(layouts.values()) for layouts in shared["emit"]) >= 2
    for (kind, fmt, name, offset), given, result in zip(specs, inputs, results):
        tol = AUDIO_TOL if fmt == "float32" else 1 / 32768 + AUDIO_TOL
        assert_session_exact(model, kind, given, result, get_layout(name, model.config, token_offset=offset), tol)
        if kind == "encode":
            assert result.audio.size == 0


def test_a_session_whose_input_the_engine_refuses_ends_alone() -> None:
    """All sessions' audio goes to the engine in one call; when the engine refuses one session's part, the
    call is retried one session at a time, so that session ends (internal_error) and the others, submitted in
    the same ticks, stay exact."""
    model = model_for("24k")
    audio = [signal(12000 + 1000 * i, seed=30 + i) for i in range(3)]

    async def test(server: SNACServer):
        submit_arrays = server.encoder.submit_arrays
        victim: List[int] = []

        def refuse(sids, pieces):
            if len(sids) > 1:
                time.sleep(0.1)  # a slow submit: the sessions' steps (85 ms each) pile up for the next one
            if victim and victim[0] in sids:
                shared.append(len(sids))
                raise ValueError("refused")
            return submit_arrays(sids, pieces)

        server.encoder.submit_arrays = refuse  # type: ignore[method-assign]

        async def victim_session() -> Any:
            await asyncio.sleep(0.1)  # the healthy sessions are streaming by then
            victim.append(server.encoder._free[0])  # the slot this session will take
            return await ws_client.roundtrip(server.url, audio[2], chunk_samples=700, sample_format="float32",
                                             realtime=True)

        healthy = [ws_client.roundtrip(server.url, a, chunk_samples=700, sample_format="float32", realtime=True)
                   for a in audio[:2]]
        return await asyncio.gather(*healthy, victim_session(), return_exceptions=True)

    shared: List[int] = []  # sessions in each refused call
    *good, failed = serve(model, test)
    assert max(shared) >= 2  # refused with a healthy session in the same call
    assert isinstance(failed, ws_client.ServerError) and failed.code == "internal_error"
    assert "ValueError" in failed.message
    for given, result in zip(audio, good):
        _, expected = offline(model, given)
        assert np.abs(result.audio - expected[: given.size]).max() <= AUDIO_TOL


def test_decode_sessions_go_to_the_engine_together_and_one_it_refuses_ends_alone() -> None:
    """Decode sessions' codes go to the engine in one call per tick (sessions with as many new frames); when
    the engine refuses such a call because of one session's part, each is retried alone: that session ends
    (internal_error), the others, submitted in the same calls, stay exact."""
    model = model_for("24k")
    rng = np.random.default_rng(12)
    layout = get_layout("interleaved", model.config)
    given = [[torch.from_numpy(rng.integers(0, 4096, (1, 24 * r))) for r in (1, 2, 4)] for _ in range(3)]

    async def test(server: SNACServer):
        submit_frames = server.decoder.submit_frames
        victim: List[int] = []

        def refuse(sids, frames):
            calls.append(len(sids))
            if victim and victim[0] in sids:
                raise ValueError("refused")
            return submit_frames(sids, frames)

        server.decoder.submit_frames = refuse  # type: ignore[method-assign]

        async def victim_session() -> Any:
            await asyncio.sleep(0.1)  # the healthy sessions are streaming by then
            victim.append(server.decoder._free[0])  # the slot this session will take
            return await ws_client.decode(server.url, layout.to_flat(given[2])[0].numpy(), chunk_tokens=7,
                                          realtime=True)

        healthy = [ws_client.decode(server.url, layout.to_flat(codes)[0].numpy(), chunk_tokens=7, realtime=True)
                   for codes in given[:2]]
        return await asyncio.gather(*healthy, victim_session(), return_exceptions=True)

    calls: List[int] = []  # sessions in each engine call
    *good, failed = serve(model, test)
    assert max(calls) >= 2  # sessions submitted together
    assert isinstance(failed, ws_client.ServerError) and failed.code == "internal_error"
    assert "ValueError" in failed.message
    for codes, result in zip(given, good):
        assert_session_exact(model, "decode", codes, result, layout, 1 / 32768 + AUDIO_TOL)


def test_a_stream_end_runs_its_backlog_through_the_batched_steps() -> None:
    """A client that sends faster than real time and flushes leaves whole steps queued; they go through the
    batched steps (shared with every other session), the padded remainder too, before the stream's end:
    each engine's close finds nothing queued and ends the stream in its batched flush. The result is exact."""
    model = model_for("24k")
    audio = signal(20 * 2048 + 777, seed=40)
    queued_at_close: List[int] = []
    alone: List[int] = []  # streams ended one at a time

    async def test(server: SNACServer):
        for engine in (server.encoder, server.decoder):
            close_many, close = engine.close_many, engine.close
            engine.close_many = lambda sids, engine=engine, close_many=close_many: (  # type: ignore[method-assign]
                queued_at_close.extend(engine.pending(sid) for sid in sids), close_many(sids))[1]
            engine.close = lambda sid, close=close: (alone.append(sid), close(sid))[1]  # type: ignore[method-assign]
        _slow_engines(server, 0.01)  # the input arrives well before the steps are done
        return await ws_client.roundtrip(server.url, audio, chunk_samples=4096, sample_format="float32")

    result = serve(model, test)
    assert queued_at_close == [0, 0] and alone == []
    _, expected = offline(model, audio)
    assert np.abs(result.audio - expected[: audio.size]).max() <= AUDIO_TOL


def test_announced_algorithmic_latency_is_the_measured_worst_case() -> None:
    """Sending whole steps, the largest input_end - (i + 1) over streamed (non-flush) samples is what ready says."""
    model = model_for("24k")
    audio = signal(2048 * 30, seed=3)

    async def test(server: SNACServer):
        return await ws_client.roundtrip(server.url, audio, chunk_samples=server.step_samples)

    result = serve(model, test)
    worst = 0
    for _, frame in result.frames:
        if frame.payload_kind == 1 and not frame.final:
            first = frame.start  # the earliest sample of a frame waited longest
            assert frame.input_end >= frame.start + frame.data.size  # causal
            worst = max(worst, frame.input_end - (first + 1))
    assert worst == result.ready.algorithmic_latency_samples
    assert result.ready.step_samples == 2048 and result.ready.header_bytes == HEADER_BYTES


# ---- errors, limits -------------------------------------------------------------------------------------
async def _expect_error(server: SNACServer, script: Callable[[Any], Awaitable[None]], code: str,
                        hello: Dict[str, Any] | None = None) -> None:
    """Open a raw connection, run ``script(ws)``, expect an ``error`` with ``code`` and its close code."""
    async with connect(server.url, compression=None, max_size=None) as ws:
        if hello is not None:
            await ws.send(json.dumps({"type": "hello", **hello}))
            ready = json.loads(await ws.recv())
            assert ready["type"] == "ready", ready
        await script(ws)
        message = None
        while True:  # skip output frames already on their way
            message = await asyncio.wait_for(ws.recv(), 30)
            if isinstance(message, str):
                break
        error = json.loads(message)
        assert error["type"] == "error" and error["code"] == code, error
        assert error["message"]
        await ws.wait_closed()
        assert ws.close_code == ERRORS[code]


def _send(*messages: Any) -> Callable[[Any], Awaitable[None]]:
    async def script(ws: Any) -> None:
        for m in messages:
            await ws.send(m)
    return script


AUDIO_HELLO = {"kind": "roundtrip", "sample_format": "pcm16"}
ORPHEUS_HELLO = {"kind": "decode", "token_layout": "orpheus"}
BAD_CASES = {
    "binary_before_hello": (None, _send(b"\x00\x01"), "bad_data_type"),
    "control_before_hello": (None, _send(json.dumps({"type": "flush"})), "bad_hello"),
    "non_json_hello": (None, _send("hello, server"), "bad_hello"),
    "unknown_kind": (None, _send(json.dumps({"type": "hello", "kind": "transcode"})), "bad_hello"),
    "wrong_version": (None, _send(json.dumps({"type": "hello", "kind": "encode", "protocol": 9})),
                      "unsupported_version"),
    "wrong_sample_rate": (None, _send(json.dumps({"type": "hello", "kind": "encode", "sample_rate": 96000})),
                          "bad_sample_rate"),
    "text_instead_of_audio": (AUDIO_HELLO, _send(encode_audio(np.zeros(100), "pcm16"), "0.1 0.2 0.3"),
                              "bad_data_type"),
    "odd_pcm16_bytes": (AUDIO_HELLO, _send(encode_audio(np.zeros(100), "pcm16"), b"\x00" * 7), "bad_audio"),
    "nan_float32": ({"kind": "encode", "sample_format": "float32"},
                    _send(np.array([0.1, np.nan], "<f4").tobytes()), "bad_audio"),
    "oversized_frame": (AUDIO_HELLO, _send(b"\x00" * 40000), "frame_too_big"),
    "unknown_message": (AUDIO_HELLO, _send(json.dumps({"type": "rewind"})), "unknown_message"),
    "token_out_of_range": ({"kind": "decode"}, _send(encode_tokens([1, 2, 5000])), "bad_tokens"),
    "misplaced_orpheus_token": (ORPHEUS_HELLO, _send(encode_tokens([5, 4096 + 5, 5])), "bad_tokens"),
    "ragged_token_bytes": ({"kind": "decode"}, _send(b"\x01\x00\x00"), "bad_tokens"),
    "flush_inside_a_frame": ({"kind": "decode"}, _send(encode_tokens([1, 2, 3]), json.dumps({"type": "flush"})),
                             "bad_tokens"),
}


def test_bad_clients_get_errors_and_free_their_slot_while_a_healthy_session_stays_exact() -> None:
    model = model_for("24k")
    audio = signal(2048 * 24, seed=4)
    codes, expected = offline(model, audio)
    pieces = np.array_split(audio, len(BAD_CASES) + 2)

    async def test(server: SNACServer):
        healthy = await ws_client.Session.open(server.url, "roundtrip", sample_format="float32")
        received: List[np.ndarray] = []
        done: Dict[str, Any] = {}

        async def reader() -> None:
            while True:
                item = await healthy.receive()
                if isinstance(item, dict):
                    done.update(item)
                    return
                if item.payload_kind == 1:
                    received.append(item.data)

        reading = asyncio.create_task(reader())
        await healthy.send_audio(pieces[0])
        for i, (hello, script, code) in enumerate(BAD_CASES.values()):
            # max_sessions=2: a bad session that kept its slot would make the next one fail with server_full.
            await _expect_error(server, script, code, hello)
            await server.wait_sessions(1)
            await healthy.send_audio(pieces[i + 1])
        # An abrupt disconnect mid-stream (no close handshake) frees the slot too.
        raw = await connect(server.url, compression=None)
        await raw.send(json.dumps({"type": "hello", **AUDIO_HELLO}))
        await raw.recv()
        await raw.send(encode_audio(audio[:5000], "pcm16"))
        raw.transport.abort()
        await server.wait_sessions(1)
        await healthy.send_audio(pieces[-1])
        await healthy.flush()
        await reading
        return np.concatenate(received), done, dict(server.stats["errors"])

    out, done, errors = serve(model, test, max_sessions=2, max_frame_bytes=32768)
    assert np.abs(out - expected[: audio.size]).max() <= AUDIO_TOL
    assert done["output_samples"] == audio.size
    assert sum(errors.values()) == len(BAD_CASES)


def test_idle_session_is_closed() -> None:
    async def test(server: SNACServer):
        await _expect_error(server, _send(encode_audio(np.zeros(3000), "pcm16")), "idle_timeout", AUDIO_HELLO)
        await _expect_error(server, _send(), "idle_timeout")  # no hello either
        await server.wait_sessions(0)

    serve(model_for("24k"), test, idle_timeout_s=0.5)


def test_full_server_refuses_then_accepts_once_a_slot_is_free() -> None:
    model = model_for("24k")

    async def test(server: SNACServer):
        first = await ws_client.Session.open(server.url, "encode")
        with pytest.raises(ws_client.ServerError) as refused:
            await ws_client.Session.open(server.url, "decode")
        await first.close()
        await server.wait_sessions(0)
        second = await ws_client.Session.open(server.url, "decode")
        await second.close()
        return refused.value

    refused = serve(model, test, max_sessions=1)
    assert refused.code == "server_full" and refused.close_code == 1013


def test_client_that_stops_reading_is_dropped_and_others_continue() -> None:
    model = model_for("24k")
    audio = signal(2048 * 12, seed=8)
    _, expected = offline(model, audio)

    async def test(server: SNACServer):
        # A tiny receive buffer and no library-side queue: the server's output backs up quickly.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        stalled = await ws_client.Session.open(server.url, "roundtrip", sample_format="float32", sock=sock,
                                               max_queue=1)
        chunk = encode_audio(signal(4096, seed=9), "float32")

        async def flood() -> None:
            try:
                while True:
                    await stalled.ws.send(chunk)  # waits while the server applies backpressure
            except ConnectionClosed:
                pass

        flooding = asyncio.create_task(flood())
        await server.wait_sessions(0)  # the stalled session is dropped (its slot freed) ...
        result = await ws_client.roundtrip(server.url, audio, chunk_samples=1000, sample_format="float32")
        flooding.cancel()
        stalled.ws.transport.abort()
        return result, dict(server.stats["errors"])

    result, errors = serve(model, test, max_sessions=1, max_output_bytes=64 * 1024, max_backlog_s=0.5,
                           idle_timeout_s=2.0)
    assert errors == {"slow_consumer": 1}  # ... for not reading, and the next session is exact
    assert np.abs(result.audio - expected[: audio.size]).max() <= AUDIO_TOL


async def _stalled_client(server: SNACServer) -> Tuple[ws_client.Session, Any]:
    """A roundtrip client that stops reading (a tiny receive buffer, no library-side queue) and has made the server
    stop reading it: it sends whole steps, one at a time, until its output queue on the server is past half of
    ``max_output_bytes``, then one more, which the server reads before it stops reading. Returns (the client, its
    server-side session) once all its input is stepped."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    client = await ws_client.Session.open(server.url, "roundtrip", sample_format="float32", sock=sock, max_queue=1)
    (session,) = [s for s in server.gateway.sessions if s.number == client.ready.session]
    # A small kernel send buffer on the server's side too (else it grows to megabytes): the queue fills at once.
    session.loop.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    chunk = encode_audio(signal(server.step_samples, seed=13), "float32")  # whole steps: all of it gets stepped
    sent, over = 0, False
    while not over:
        over = session.loop.out_bytes > server.options.max_output_bytes // 2
        await client.ws.send(chunk)
        sent += server.step_samples
        while session.loop.received < sent or session.consumed < sent:
            await asyncio.sleep(0.005)
    return client, session


async def _seconds_until_freed(server: SNACServer, session: Any, limit: float) -> float:
    """How long until ``session`` (server-side) gives up its slot; infinity past ``limit`` seconds."""
    async def freed() -> None:
        while session in server.gateway.sessions:
            await asyncio.sleep(0.01)

    t0 = time.monotonic()
    try:
        await asyncio.wait_for(freed(), limit)
    except asyncio.TimeoutError:
        return math.inf
    return time.monotonic() - t0


async def _busy_session(server: SNACServer, audio: np.ndarray) -> asyncio.Future:
    """A real-time roundtrip keeping the engine ticking, returned once it holds its slot."""
    busy = asyncio.ensure_future(ws_client.roundtrip(server.url, audio, chunk_samples=960, realtime=True,
                                                     sample_format="float32"))
    while not server.active_sessions:
        await asyncio.sleep(0.01)
    return busy


def test_a_stalled_client_is_dropped_after_the_idle_timeout_while_others_keep_the_engine_busy() -> None:
    """The slow-consumer timer runs on the stalled session's own output, not on engine ticks (which every
    session's input causes): it is dropped about ``idle_timeout_s`` after it stopped reading, while a real-time
    session keeps the engine stepping; that one finishes exact."""
    model = model_for("24k")
    audio = signal(24000 * 4, seed=14)
    _, expected = offline(model, audio)
    idle = 1.0

    async def test(server: SNACServer):
        busy = await _busy_session(server, audio)
        stalled, session = await _stalled_client(server)
        dropped = await _seconds_until_freed(server, session, 2.5 * idle)
        busy_done_at_drop = busy.done()
        result = await busy
        stalled.ws.transport.abort()
        return dropped, busy_done_at_drop, result, await settled_outcomes(server, 2)

    dropped, busy_done_at_drop, result, outcomes = serve(
        model, test, max_sessions=2, max_output_bytes=256 * 1024, max_backlog_s=0.2, idle_timeout_s=idle)
    assert idle - 0.3 <= dropped <= idle + 0.5 and not busy_done_at_drop
    assert outcomes == {("roundtrip", "slow_consumer"): 1, ("roundtrip", "completed"): 1}
    assert np.abs(result.audio - expected[: audio.size]).max() <= AUDIO_TOL


def test_a_client_gone_with_a_full_output_queue_frees_its_slot_at_once() -> None:
    """A client that drops its connection while its output queue is past half of ``max_output_bytes`` (so the
    server no longer reads it) ends its session as soon as the server's writer finds the socket closed, not at
    the idle timeout, while another session keeps the engine busy."""
    model = model_for("24k")
    audio = signal(24000 * 3, seed=15)
    _, expected = offline(model, audio)

    async def test(server: SNACServer):
        busy = await _busy_session(server, audio)
        stalled, session = await _stalled_client(server)
        stalled.ws.transport.abort()  # no close handshake: the TCP connection just goes
        freed = await _seconds_until_freed(server, session, 5.0)
        slots_free = sum(server.workers.slots_free())
        busy_done_at_free = busy.done()
        result = await busy
        return freed, slots_free, busy_done_at_free, result, await settled_outcomes(server, 2)

    freed, slots_free, busy_done_at_free, result, outcomes = serve(
        model, test, max_sessions=2, max_output_bytes=256 * 1024, max_backlog_s=0.2)  # idle timeout 30 s
    assert freed < 1.0 and slots_free == 1 and not busy_done_at_free
    assert outcomes == {("roundtrip", "closed"): 1, ("roundtrip", "completed"): 1}
    assert np.abs(result.audio - expected[: audio.size]).max() <= AUDIO_TOL


def test_text_messages_are_measured_in_utf8_bytes() -> None:
    """``max_frame_bytes`` and the received-bytes count measure a text message's UTF-8 encoding, not its
    characters: a hello of 640 characters but 1240 bytes is over a 1024-byte limit."""
    def hello(auth_chars: int) -> str:
        return json.dumps({"type": "hello", "kind": "encode", "auth": "\u00e9" * auth_chars}, ensure_ascii=False)

    async def test(server: SNACServer):
        fits = hello(100)
        async with connect(server.url, compression=None) as ws:
            await ws.send(fits)
            assert json.loads(await ws.recv())["type"] == "ready"
            received = server.stats["bytes_in"]
        too_big = hello(600)
        assert len(too_big) < 1024 < len(too_big.encode())
        await _expect_error(server, _send(too_big), "frame_too_big")
        return received, len(fits.encode())

    received, fits_bytes = serve(model_for("24k"), test, max_frame_bytes=1024)
    assert received == fits_bytes


def test_fast_sender_is_throttled_with_bounded_backlog() -> None:
    model = model_for("24k")
    audio = signal(24000 * 8, seed=10)
    _, expected = offline(model, audio)

    async def test(server: SNACServer):
        result = await ws_client.roundtrip(server.url, audio, chunk_samples=8000, sample_format="float32")
        return result, server.stats["max_backlog"]

    result, backlog = serve(model, test, max_backlog_s=0.2)
    limit = 3 * 2048  # 0.2 s rounded up to whole steps
    assert 0 < backlog <= limit + 8000  # never more than the limit plus one message
    assert np.abs(result.audio - expected[: audio.size]).max() <= AUDIO_TOL


# ---- security -------------------------------------------------------------------------------------------
def test_token_is_required_when_set_in_hello_or_header() -> None:
    model = model_for("24k")

    async def test(server: SNACServer):
        codes = []
        for auth in (None, "wrong"):
            with pytest.raises(ws_client.ServerError) as exc:
                await ws_client.Session.open(server.url, "encode", auth=auth)
            codes.append((exc.value.code, exc.value.close_code))
        ok = await ws_client.Session.open(server.url, "encode", auth="s3cret")
        await ok.close()
        ok = await ws_client.Session.open(server.url, "encode",
                                          additional_headers={"Authorization": "Bearer s3cret"})
        await ok.close()
        return codes

    assert serve(model, test, token="s3cret") == [("unauthorized", 1008)] * 2


def test_engine_workers_get_one_torch_thread_when_every_engine_is_on_a_gpu() -> None:
    """A GPU engine worker's CPU work is bookkeeping: one torch thread. Any CPU engine keeps torch's count less
    one core (the event loop's), at least 1."""
    cpu_default = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1))
    assert default_engine_threads([torch.device("cuda", 0)]) == 1
    assert default_engine_threads([torch.device("cuda", 0), torch.device("cuda", 1)]) == 1
    assert default_engine_threads([torch.device("cuda", 0), torch.device("cpu")]) == cpu_default
    assert default_engine_threads([torch.device("cpu")]) == default_engine_threads() == cpu_default


def test_non_loopback_bind_needs_a_token() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")
    with pytest.raises(ValueError, match="token"):
        ServerOptions(host="0.0.0.0").check()
    ServerOptions(host="0.0.0.0", token="t").check()
    assert main(["serve", "--host", "0.0.0.0", "--model", "24khz", "--random-weights"]) == 2


def test_browser_origins_are_checked() -> None:
    model = model_for("24k")

    async def test(server: SNACServer):
        outcome = {}
        for origin in ("http://localhost:3000", "http://127.0.0.1", "https://app.example", "https://evil.example"):
            try:
                async with connect(server.url, origin=origin):
                    outcome[origin] = "open"
            except InvalidStatus as exc:
                outcome[origin] = exc.response.status_code
        return outcome

    outcome = serve(model, test, allowed_origins=["https://app.example"])
    assert outcome == {"http://localhost:3000": "open", "http://127.0.0.1": "open", "https://app.example": "open",
                       "https://evil.example": 403}


def test_engine_threads_apply_to_the_worker_only() -> None:
    with pytest.raises(ValueError, match="threads"):
        ServerOptions(threads=0).check()
    caller = torch.get_num_threads()

    async def test(server: SNACServer):
        return server.threads, await server.worker.call(lambda events: torch.get_num_threads())

    assert serve(model_for("24k"), test, threads=1) == (1, 1)
    assert torch.get_num_threads() == caller  # the caller's (and the event loop's) threads are left alone
    assert main(["serve", "--threads", "0", "--model", "24khz", "--random-weights"]) == 2


def _slow_engines(server: SNACServer, seconds: float) -> None:
    """Make every engine step of ``server`` take ``seconds`` longer: a server slower than real time."""
    for engine in (server.encoder, server.decoder):
        step = engine.step_groups
        engine.step_groups = lambda step=step: (time.sleep(seconds), step())[1]  # type: ignore[method-assign]


def test_a_server_slower_than_real_time_warns_audio_sessions_and_keeps_serving() -> None:
    """A real-time roundtrip on a server whose steps take 0.25 s per 85 ms of audio falls behind: it gets a
    'behind' warning (at most one per 5 s) and still its complete output; a decode session, whose tokens may
    come faster than real time on purpose, and a server with the warning off get none."""
    model = model_for("24k")
    audio = (np.random.default_rng(3).standard_normal(36000) * 0.1).astype(np.float32)  # 1.5 s
    rng = np.random.default_rng(4)
    tokens = get_layout("orpheus", model.config).to_flat(
        [torch.from_numpy(rng.integers(0, 4096, (1, 8 * r))) for r in (1, 2, 4)])[0].numpy()

    async def test(server: SNACServer):
        _slow_engines(server, 0.25)
        talk = await ws_client.roundtrip(server.url, audio, realtime=True, sample_format="float32")
        play = await ws_client.decode(server.url, tokens, token_layout="orpheus")
        return talk, play, server.stats["behind_warnings"]

    talk, play, counted = serve(model, test, behind_warning_s=0.3)
    assert 1 <= len(talk.warnings) <= 2 and counted == len(talk.warnings)
    first = talk.warnings[0]
    assert first["type"] == "warning" and first["code"] == "behind" and first["lag_ms"] > 300
    assert "behind the input" in first["message"]
    assert talk.audio.shape == audio.shape and talk.done["output_samples"] == audio.size
    assert play.warnings == [] and play.audio.size

    async def quiet(server: SNACServer):
        _slow_engines(server, 0.25)
        return await ws_client.roundtrip(server.url, audio[:12000], realtime=True)

    assert serve(model, quiet, behind_warning_s=0).warnings == []
    with pytest.raises(ValueError, match="behind_warning_s"):
        ServerOptions(behind_warning_s=-1).check()


def test_a_failing_engine_step_ends_its_sessions_and_the_server_goes_on() -> None:
    """An engine step that fails as a whole (a device fault, say) ends the sessions on that engine with
    internal_error and frees their slots; the next session is served exactly."""
    model = model_for("24k")
    audio = (np.random.default_rng(5).standard_normal(9000) * 0.1).astype(np.float32)
    _, expected = offline(model, audio)

    async def test(server: SNACServer):
        step = server.encoder.step_groups

        def broken() -> Any:
            raise RuntimeError("device fault")

        server.encoder.step_groups = broken  # type: ignore[method-assign]
        with pytest.raises(ws_client.ServerError) as failed:  # paced: steps run before the end of the stream
            await ws_client.roundtrip(server.url, audio, sample_format="float32", realtime=True)
        server.encoder.step_groups = step  # type: ignore[method-assign]
        await server.wait_sessions(0)
        return failed.value, await ws_client.roundtrip(server.url, audio, sample_format="float32")

    error, result = serve(model, test, max_sessions=1)
    assert error.code == "internal_error" and error.close_code == 1011 and "RuntimeError" in error.message
    assert np.abs(result.audio - expected[: audio.size]).max() <= AUDIO_TOL


def test_a_failing_stream_end_ends_its_session_and_frees_its_slots() -> None:
    """A flush that fails in the engine (after the engine freed the streams' slots, as ``close_many`` does)
    ends that session with internal_error, frees its decoder slot too, and the next session is exact."""
    model = model_for("24k")
    audio = (np.random.default_rng(6).standard_normal(9000) * 0.1).astype(np.float32)
    _, expected = offline(model, audio)

    async def test(server: SNACServer):
        close_many = server.encoder.close_many

        def broken(sids: Any) -> Any:
            close_many(sids)
            raise RuntimeError("flush failed")

        server.encoder.close_many = broken  # type: ignore[method-assign]
        with pytest.raises(ws_client.ServerError) as failed:
            await ws_client.roundtrip(server.url, audio, sample_format="float32")
        server.encoder.close_many = close_many  # type: ignore[method-assign]
        await server.wait_sessions(0)
        active = server.encoder.active_streams, server.decoder.active_streams
        return failed.value, active, await ws_client.roundtrip(server.url, audio, sample_format="float32")

    error, active, result = serve(model, test, max_sessions=1)
    assert error.code == "internal_error" and "RuntimeError" in error.message
    assert active == (0, 0)
    assert np.abs(result.audio - expected[: audio.size]).max() <= AUDIO_TOL


def test_a_started_server_keeps_its_long_lived_objects_out_of_full_collections() -> None:
    """The model, engines and modules alive at start are frozen out of the cyclic collector's passes (a full
    pass over them stalls a tick) while the server runs: a full collection scans only what came after."""
    import gc

    gc.unfreeze()

    async def test(server: SNACServer):
        return gc.get_freeze_count(), len(gc.get_objects())

    frozen, tracked = serve(model_for("24k"), test)
    assert frozen > 10 * tracked  # e.g. 170,000 frozen against a few thousand still tracked
    assert gc.get_freeze_count() == 0  # a stopped server leaves collection as it was


# ---- protocol pieces, command line ----------------------------------------------------------------------
def test_output_frame_round_trips_through_its_header() -> None:
    frame = OutputFrame(1, 123, 4567, 89, 10, np.array([0.5, -0.25], np.float32), flags=1)
    back = OutputFrame.unpack(frame.pack(), "float32")
    assert (back.payload_kind, back.start, back.input_end, back.server_us, back.compute_us, back.final) == \
        (1, 123, 4567, 89, 10, True)
    np.testing.assert_array_equal(back.data, frame.data)
    assert len(frame.pack()) == HEADER_BYTES + 8
    # The microsecond fields saturate at 32 bits (a negative time at 0) and take whole microseconds.
    for given, packed in (((-5, 2**40), (0, 2**32 - 1)), ((2**32, 2**32 - 1), (2**32 - 1, 2**32 - 1)),
                          ((3.7, 7.2), (3, 7)), ((0, 2**32 - 1), (0, 2**32 - 1))):
        back = OutputFrame.unpack(pack_output_frame(1, 0, 0, *given, frame.data), "float32")
        assert (back.server_us, back.compute_us) == packed


def test_the_client_imports_neither_the_server_nor_the_engines() -> None:
    """The wire protocol lives at the package level: a client process loads no serving code."""
    check = ("import snac_stream.client, sys; "
             "assert 'snac_stream.server' not in sys.modules and 'snac_stream.engine' not in sys.modules")
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_a_connection_closed_from_the_client_side_says_why() -> None:
    from websockets.exceptions import ConnectionClosedError
    from websockets.frames import Close

    class Closed:  # a connection whose keepalive ping went unanswered, as websockets reports it
        async def recv(self) -> None:
            raise ConnectionClosedError(None, Close(1011, "keepalive ping timeout"))

    with pytest.raises(ws_client.ServerError, match=r"no close frame; closed here with 1011: keepalive ping timeout"):
        asyncio.run(ws_client._recv_or_error(Closed()))  # type: ignore[arg-type]


def test_bench_latency_command_writes_a_complete_report(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    ckpt = SNAC(**STRUCTURES["24k"]).save_pretrained(tmp_path / "tiny")
    out = tmp_path / "bench.json"
    status = main(["bench-latency", "--model", str(ckpt), "--clients", "2", "--duration", "1.5", "--device", "cpu",
                   "--threads", "1", "--json", str(out)])
    printed = capsys.readouterr().err
    report = json.loads(out.read_text())
    assert status == 0 and report["errors"] == 0 and report["clients"] == 2 and report["engine_threads"] == 1
    for part in ("total", "algorithmic", "server", "transport"):
        assert set(report["latency_ms"][part]) == {"p50", "p95", "p99", "max"}
        assert report["latency_ms"][part]["p50"] >= 0 or part == "transport"
    assert report["latency_ms"]["algorithmic"]["max"] <= 1e3 * (report["algorithmic_latency_samples"]
                                                                 + report["chunk_samples"]) / 24000
    assert report["rss_mib"] and report["machine"]["cpu_count"]
    # The server's start (engines built, their warm-up run) is timed apart from the streams.
    started = re.search(r"; started in ([0-9.]+) s", printed)
    assert started and report["server_start_s"] > 0
    assert abs(float(started.group(1)) - report["server_start_s"]) <= 0.051  # printed to 0.1 s, written to 0.01
    # The clients ran in a worker process; the server's ticks were timed, each holding its engine steps.
    assert report["client_processes"] == 1 and report["ticks"] > 0
    assert 0 < report["engine_step_ms"]["p50"] <= report["tick_ms"]["p50"] <= report["tick_ms"]["max"]
    # Where the engine thread's ticks went: on the CPU it never blocks waiting for a step (it computes them).
    parts = report["tick_parts_ms"]
    assert parts["blocked"]["max"] == 0 and 0 < parts["cpu"]["p50"] <= report["tick_ms"]["max"]
    assert 0 <= parts["rest"]["p50"] <= report["tick_ms"]["max"]
    assert 0 <= parts["gc"]["p50"] <= parts["gc"]["max"]
    assert len(report["gc"]["collections"]) == 3 and report["gc"]["seconds"] >= 0  # the process's collections
    # What the ticks did, by band of duration: the two sessions' streams warmed up (two passes at least) early in
    # the run, and both sessions ended.
    work = report["tick_work"]
    bands = work["by_duration"]
    assert list(bands) == ["p0-p50", "p50-p95", "p95-p99", "p99-p100"]
    assert 0 < sum(band["ticks"] for band in bands.values()) <= report["ticks"]  # the ticks that sent anything
    assert work["sessions_ended"] == 2
    assert all(0 <= band["sessions_ended"] <= 2 for band in bands.values() if band["ticks"])
    assert work["warmup_passes"] >= 2 and 0 <= work["last_warmup_s"] < 1.5 + 1
    assert "ticks by duration" in printed and f"passes of streams warming up: {work['warmup_passes']}" in printed
    # Two verdicts: the rate (no drift of a step, no warning, nothing missing) and the tail within one step.
    step_ms = 1e3 * report["step_samples"] / 24000
    assert report["keeps_up"] == (report["behind_warnings"] == 0 and report["drift_ms_max"] < step_ms)
    assert report["p99_within_step"] == (report["server_plus_transport_p99_ms"] < step_ms)
    # The same tail once the streams are under way (their first quarter left out): a part of the same samples.
    latency = report["latency_ms"]
    assert 0 < report["server_plus_transport_p99_steady_ms"] <= latency["server"]["max"] + latency["transport"]["max"]
    # The client worker's own CPU over its streams: a figure per process, so a saturated load generator shows.
    clients_cpu = report["client_cpu"]
    assert clients_cpu["processes"] == report["client_processes"] == len(clients_cpu["per_process"]) == 1
    assert all(0 <= rate < 4 for rate in clients_cpu["per_process"])
    assert clients_cpu["max_process_cpu_per_wall_s"] == max(clients_cpu["per_process"])
    assert clients_cpu["cpu_per_wall_s"] == pytest.approx(sum(clients_cpu["per_process"]), abs=1e-3)
    assert clients_cpu["window_s"] >= 1.5 and not report["server_cpu"]["clients_included"]
    line = next(line for line in printed.splitlines() if line.startswith("cpu     clients:"))
    assert line.startswith("cpu     clients: 1 process, ") and "s of CPU per s of wall in all, the busiest" in line


def test_bench_latency_decode_clients_report_the_decode_latency(tmp_path, capsys) -> None:
    """``--kind decode``: real-time TTS-like clients (random tokens, one coarse frame a message, each sent when its
    audio would have been generated); the same report, its algorithmic part the decode sessions' bound."""
    from snac_stream.streaming.latency import algorithmic_latency

    torch.manual_seed(0)
    model = SNAC(**STRUCTURES["24k"])
    ckpt = model.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "bench.json"
    status = main(["bench-latency", "--model", str(ckpt), "--kind", "decode", "--clients", "2", "--duration", "1.5",
                   "--device", "cpu", "--threads", "1", "--client-processes", "1", "--json", str(out)])
    printed = capsys.readouterr().err
    report = json.loads(out.read_text())
    assert status == 0 and report["kind"] == "decode" and report["clients"] == 2
    assert report["errors"] == 0 and report["incomplete_streams"] == 0 and not report["server_errors"]
    # Whole decoder steps (one coarse frame here) of at least the duration; one frame's tokens a message.
    frame = model.config.frame_samples
    step_frames = report["step_samples"] // frame
    assert report["chunk_samples"] == frame and report["chunk_tokens"] == 7 and report["token_layout"] == "interleaved"
    assert 1.5 <= report["stream_s"] < 1.5 + report["step_samples"] / 24000
    assert report["input_latency_samples"] is None and report["added_latency_ms"]["input"] is None
    # The algorithmic latency is the decode sessions' (as ready announces it), and with input in whole steps
    # the bound is reached: the worst output sample waits exactly that long.
    decode_latency = algorithmic_latency(model.eval(), "decode", step_frames)
    assert report["algorithmic_latency_samples"] == decode_latency
    for part in ("total", "algorithmic", "server", "transport"):
        assert set(report["latency_ms"][part]) == {"p50", "p95", "p99", "max"}
    latency = report["latency_ms"]
    assert latency["algorithmic"]["max"] == pytest.approx(1e3 * decode_latency / 24000, abs=1e-3)
    assert 0 <= latency["server"]["p50"] <= latency["server"]["max"] < 5000
    assert latency["algorithmic"]["p50"] < latency["total"]["p50"]
    # The verdicts' fields, as for roundtrip clients (decode sessions get no 'behind' warnings).
    step_ms = 1e3 * report["step_samples"] / 24000
    assert report["behind_warnings"] == 0 and report["drift_ms_max"] is not None
    assert report["keeps_up"] == (report["drift_ms_max"] < step_ms)
    assert report["p99_within_step"] == (report["server_plus_transport_p99_ms"] < step_ms)
    assert report["ticks"] > 0 and report["client_cpu"]["processes"] == report["client_processes"] == 1
    assert "real-time decode, " in printed and "decode algorithmic latency" in printed


def test_bench_latency_decode_messages_are_whole_coarse_frames() -> None:
    """A decode client's message: ``--chunk-ms`` worth of whole coarse frames, rounded up, at least one; by
    default one. A roundtrip client's: ``chunk_ms`` of audio (20 ms by default)."""
    from snac_stream.server.loadtest import client_format

    frame = 2048  # 85.3 ms at 24 kHz
    assert client_format("pcm16", None, None, 24000, kind="decode", frame_samples=frame) == ("pcm16", 24000, frame)
    assert client_format("pcm16", None, 20, 24000, kind="decode", frame_samples=frame)[2] == frame
    assert client_format("pcm16", None, 100, 24000, kind="decode", frame_samples=frame)[2] == 2 * frame
    assert client_format("pcm16", None, 1e3 * 2 * frame / 24000, 24000, kind="decode",
                         frame_samples=frame)[2] == 2 * frame
    assert client_format("mulaw", None, None, 24000, kind="decode", frame_samples=frame) == ("mulaw", 8000, frame)
    assert client_format("pcm16", None, None, 24000) == ("pcm16", 24000, 480)
    with pytest.raises(ValueError, match="kind must be one of roundtrip, decode"):
        client_format("pcm16", None, None, 24000, kind="encode")


def test_bench_latency_with_clients_in_the_server_process_gives_no_separate_client_cpu(tmp_path, capsys) -> None:
    """``--client-processes 0``: the clients' CPU is the server process's; the report says so, with no figure."""
    torch.manual_seed(0)
    ckpt = SNAC(**STRUCTURES["24k"]).save_pretrained(tmp_path / "tiny")
    out = tmp_path / "bench.json"
    status = main(["bench-latency", "--model", str(ckpt), "--clients", "1", "--duration", "1", "--device", "cpu",
                   "--threads", "1", "--client-processes", "0", "--json", str(out)])
    printed = capsys.readouterr().err
    report = json.loads(out.read_text())
    assert status == 0 and report["errors"] == 0 and report["client_processes"] == 0
    assert report["client_cpu"] is None and report["server_cpu"]["clients_included"]
    assert "cpu     clients: in the server's process, their CPU is included in the server's above" in printed


def test_sessions_that_do_not_fit_the_device_memory_are_a_clear_error_at_start(monkeypatch, capsys) -> None:
    """A device whose memory cannot hold the engines for --max-sessions fails at start, before any client,
    with the cause and the remedy; the server command exits 2 with them on one line. (On a GPU the engines'
    full-size steps are captured at start, so that is where a too-large --max-sessions runs out of memory.)"""
    import snac_stream.server.worker as worker
    from helpers import run_cli, single_error

    def too_big(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB. GPU 0 has a total "
                                     "capacity of 79.19 GiB of which 1.20 GiB is free.")

    monkeypatch.setattr(worker, "EncodeEngine", too_big)
    with pytest.raises(worker.EnginesDoNotFit, match="^3 sessions do not fit the memory of cpu") as caught:
        worker.EngineSet(model_for("24k"), 3, {})
    assert isinstance(caught.value, ValueError) and isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    rc, err = run_cli(["serve", "--model", "24khz", "--random-weights", "--device", "cpu", "--max-sessions", "5",
                       "--port", "0"], capsys)
    line = single_error(err)
    assert rc == 2 and line.startswith("error: 5 sessions do not fit the memory of cpu")
    assert "ran out: CUDA out of memory. Tried to allocate 6.00 GiB. GPU 0 has" in line
    assert "is free. Lower --max-sessions" in line
