"""Client audio formats and rates on the websocket server: each session equals offline coding of the same
converted input, followed by the same conversion of the output (snac_stream.formats), for random chunkings.

Tolerances: tokens are exact wherever the input is (the server's decoders equal soxr's one-shot resampling and
the G.711 tables for any chunking). Audio carries the codec's float rounding (1e-5, as tests/test_server.py)
through the conversion: float32 after resampling within RESAMPLED_TOL; G.711 at most one quantization step
apart on at most 1 % of the samples. Opus is lossy and libopus's choices flip on differences far below 1e-5 (two
encodings of audio 4e-7 apart can be 8 dB apart in waveform), so its tolerance is on quality, not on the bytes:
decoded by PyAV's own demuxer, at the exact length, the server's stream is as close to the offline audio as the
same encoder's stream of the offline audio (SNR within OPUS_PARITY_DB), and, on the trained mini model's speech-
like output, at least OPUS_SNR_FLOOR_DB (15.9 dB measured at 32 kbps).
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from typing import Any, Dict, List

import numpy as np
import pytest
import soxr
import torch
from test_formats import signal as speech_like
from test_server import _expect_error, _send, model_for, offline, random_chunks, serve, signal

from snac_stream import SNAC
from snac_stream import client as ws_client
from snac_stream.formats import FORMATS, InputDecoder, OutputEncoder, alaw_decode, mulaw_decode
from snac_stream.protocol import (AUDIO_FORMATS, CONTAINER_FORMATS, HEADER, HEADER_BYTES, PAYLOAD_AUDIO,
                                  PAYLOAD_TOKENS, Hello, encode_audio)
from snac_stream.server import SNACServer
from snac_stream.server.conversion import SessionFormats
from snac_stream.tokens import get_layout

MODEL_RATE = 24000
RESAMPLED_TOL = 5e-5  # the codec's 1e-5, through a resampling filter whose gain on it stays under 5
OPUS_PARITY_DB = 1.0  # |SNR(server's Opus) - SNR(the same encoder on the offline audio)|, both vs the offline audio
OPUS_SNR_FLOOR_DB = 12.0  # the server's Opus vs the offline audio, mini model, 32 kbps
G711_STEP_SHARE = 0.01  # samples allowed one quantization step apart


def tokens_of(model: Any, audio: np.ndarray) -> np.ndarray:
    codes, _ = offline(model, audio)
    return get_layout("interleaved", model.config).to_flat(codes)[0].numpy()


def converted(fmt: str, rate: int, audio: np.ndarray, **options: Any) -> bytes:
    """The model-rate float ``audio`` as a client in (fmt, rate) gets it: one OutputEncoder, whole."""
    enc = OutputEncoder(fmt, rate, model_rate=MODEL_RATE, **options)
    return enc.push(audio) + enc.flush()


def g711_steps(fmt: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per sample: how many G.711 quantization levels apart two code streams are."""
    decode = mulaw_decode if fmt == "mulaw" else alaw_decode
    levels = np.unique(decode(np.arange(256, dtype=np.uint8)))
    rank = lambda codes: np.searchsorted(levels, decode(codes))  # noqa: E731
    return np.abs(rank(a).astype(np.int64) - rank(b))


def assert_g711_close(fmt: str, got: np.ndarray, expected: bytes) -> None:
    want = np.frombuffer(expected, np.uint8)
    assert got.shape == want.shape
    steps = g711_steps(fmt, got, want)
    assert steps.max() <= 1 and (steps > 0).mean() <= G711_STEP_SHARE, (steps.max(), (steps > 0).mean())


def pyav_decode(data: bytes) -> np.ndarray:
    """An Ogg/WebM Opus stream decoded by PyAV's demuxer and decoder (not ours): mono float32 at 48 kHz."""
    import av

    with av.open(io.BytesIO(data)) as container:
        chunks = [frame.to_ndarray().reshape(-1) for frame in container.decode(audio=0)]
    return np.concatenate(chunks).astype(np.float32)


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    assert reference.shape == test.shape
    noise = np.sum((reference.astype(np.float64) - test) ** 2)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / max(noise, 1e-20)))


def opus_snrs(fmt: str, stream: bytes, offline_audio: np.ndarray, **options: Any) -> tuple:
    """(SNR of the server's stream, SNR of the same encoder's stream of ``offline_audio``), both decoded by PyAV
    and measured against ``offline_audio`` resampled to 48 kHz; the lengths must be exact."""
    target = soxr.resample(offline_audio, MODEL_RATE, 48000, quality="HQ")
    got, reference = pyav_decode(stream), pyav_decode(converted(fmt, 48000, offline_audio, **options))
    assert got.size == reference.size == target.size == 2 * offline_audio.size  # coded at 24 kHz, decoded at 48
    return snr_db(target, got), snr_db(target, reference)


def client_audio(fmt: str, rate: int, seconds: float, seed: int) -> bytes:
    """A test signal as a client sends it in (fmt, rate), made without the server's input decoder."""
    x = signal(int(seconds * rate), seed)
    enc = OutputEncoder(fmt, rate, model_rate=rate, **({"serial": 5} if fmt in CONTAINER_FORMATS else {}))
    return enc.push(x) + enc.flush()


# ---- PCM at the model's rate ----------------------------------------------------------------------------
def test_plain_pcm_at_the_model_rate_is_announced_as_unconverted() -> None:
    """The hellos of before (no format fields, or sample_rate equal to the model's) run unconverted: the lanes'
    own PCM path, no converter, zero added latency, the algorithmic latency of before."""
    model = model_for("24k")

    async def test(server: SNACServer):
        out = []
        for hello in ({}, {"sample_rate": MODEL_RATE, "sample_format": "float32"}):
            session = await ws_client.Session.open(server.url, "roundtrip", **hello)
            (state,) = [s for s in server.gateway.sessions]
            out.append((session.ready, state.formats.converted, state.audio_format))
            await session.close()
            await server.wait_sessions(0)
        return out, server.latency["roundtrip"]

    (first, second), latency = serve(model, test)
    for (ready, converted, lane_format), fmt in zip((first, second), ("pcm16", "float32")):
        assert not converted and lane_format == fmt
        assert (ready.input_format, ready.input_rate, ready.input_latency_samples) == (fmt, MODEL_RATE, 0)
        assert (ready.output_format, ready.output_rate, ready.output_latency_samples) == (fmt, MODEL_RATE, 0)
        assert ready.algorithmic_latency_samples == latency and ready.opus_bitrate is None


# ---- G.711 -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["mulaw", "alaw"])
@pytest.mark.parametrize("kind", ["encode", "roundtrip", "decode"])
def test_g711_8k_sessions_equal_offline_coding_then_the_same_conversion(fmt: str, kind: str) -> None:
    model = model_for("24k")
    rng = np.random.default_rng(hash((fmt, kind)) % 2**32)
    data = client_audio(fmt, 8000, 1.3, seed=7)
    # What the model hears: the G.711 samples, soxr-resampled whole (the server streams the same, any chunking).
    samples = (mulaw_decode if fmt == "mulaw" else alaw_decode)(data).astype(np.float32) / 32768
    heard = soxr.resample(samples, 8000, MODEL_RATE, quality="HQ").astype(np.float32)
    chunks = random_chunks(rng, 15, 400) + [1, 2]
    codes = [torch.from_numpy(rng.integers(0, 4096, (1, 9 * r))) for r in (1, 2, 4)]
    tokens = get_layout("interleaved", model.config).to_flat(codes)[0].numpy()

    async def test(server: SNACServer):
        if kind == "decode":
            return await ws_client.decode(server.url, tokens, chunk_tokens=chunks, sample_format=fmt)
        stream = ws_client.encode if kind == "encode" else ws_client.roundtrip
        return await stream(server.url, data, chunk_samples=chunks, sample_format=fmt)

    result = serve(model, test)
    ready = result.ready
    if kind != "decode":
        assert (ready.input_format, ready.input_rate) == (fmt, 8000)
        assert ready.input_latency_samples > 0 and result.done["input_items"] == len(data)
        np.testing.assert_array_equal(result.tokens, tokens_of(model, heard))
    if kind == "encode":
        assert result.audio.size == 0 and ready.output_format is None
        return
    assert (ready.output_format, ready.output_rate) == (fmt, 8000) and ready.output_latency_samples > 0
    if kind == "roundtrip":
        expected = offline(model, heard)[1][: heard.size]  # trimmed to the samples the engine received
    else:
        with torch.inference_mode():
            expected = model.decode(codes)[0, 0].numpy()
    assert_g711_close(fmt, result.audio, converted(fmt, 8000, expected))
    assert result.done["output_samples"] == result.audio.size


# ---- resampled PCM ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [16000, 44100])
@pytest.mark.parametrize("fmt", ["pcm16", "float32"])
def test_resampled_encode_sessions_give_the_codes_of_offline_encode_of_the_soxr_resampled_input(
        rate: int, fmt: str) -> None:
    model = model_for("24k")
    rng = np.random.default_rng(rate + len(fmt))
    x = signal(int(1.2 * rate), seed=9)
    sent = np.frombuffer(encode_audio(x, fmt), "<i2" if fmt == "pcm16" else "<f4")
    received = sent.astype(np.float32) / (32768 if fmt == "pcm16" else 1)
    heard = soxr.resample(received, rate, MODEL_RATE, quality="HQ").astype(np.float32)

    async def test(server: SNACServer):
        return await ws_client.encode(server.url, received, chunk_samples=random_chunks(rng, 13, 3000) + [1],
                                      sample_format=fmt, sample_rate=rate)

    result = serve(model, test)
    np.testing.assert_array_equal(result.tokens, tokens_of(model, heard))
    assert (result.ready.input_format, result.ready.input_rate) == (fmt, rate)
    assert result.done["input_items"] == x.size


def test_resampled_roundtrip_audio_equals_offline_then_the_same_resampling() -> None:
    """float32 in at 16 kHz, out at 44.1 kHz: tokens exact, audio within RESAMPLED_TOL of offline decode
    (trimmed to the samples the engine received) resampled by one OutputEncoder."""
    model = model_for("24k")
    rng = np.random.default_rng(12)
    x = signal(20000, seed=12)
    heard = soxr.resample(x, 16000, MODEL_RATE, quality="HQ").astype(np.float32)

    async def test(server: SNACServer):
        return await ws_client.roundtrip(server.url, x, chunk_samples=random_chunks(rng, 17, 2500),
                                         sample_format="float32", input_rate=16000, output_rate=44100)

    result = serve(model, test)
    codes, decoded = offline(model, heard)
    np.testing.assert_array_equal(result.tokens, get_layout("interleaved", model.config).to_flat(codes)[0].numpy())
    expected = np.frombuffer(converted("float32", 44100, decoded[: heard.size]), "<f4")
    assert result.audio.shape == expected.shape and result.done["output_samples"] == expected.size
    assert np.abs(result.audio - expected).max() <= RESAMPLED_TOL
    assert (result.ready.input_rate, result.ready.output_rate) == (16000, 44100)


def test_announced_latency_bounds_the_measured_one_with_resampling() -> None:
    """pcm16 at 16 kHz both ways, sent in 10 ms chunks: over the streamed output, the worst of input_end
    (16 kHz input samples) minus each output sample's own position is within what ready announces (at the
    model's rate, conversions included) plus one chunk, and above the codec's own latency."""
    model = model_for("24k")
    x = signal(16000 * 3, seed=13)
    chunk = 160

    async def test(server: SNACServer):
        result = await ws_client.roundtrip(server.url, x, chunk_samples=chunk, sample_rate=16000)
        return result, server.latency["roundtrip"]

    result, codec_latency = serve(model, test)
    ready = result.ready
    worst = max(frame.input_end / 16000 - (frame.start + 1) / 16000
                for _, frame in result.frames if frame.payload_kind == 1 and not frame.final)
    assert ready.algorithmic_latency_samples > codec_latency
    assert codec_latency / MODEL_RATE < worst <= ready.algorithmic_latency_samples / MODEL_RATE + chunk / 16000
    added = (ready.input_latency_samples + ready.output_latency_samples) / 16000
    assert ready.algorithmic_latency_samples / MODEL_RATE == pytest.approx(codec_latency / MODEL_RATE + added,
                                                                          abs=2 / 16000)


# ---- Opus ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["opus", "webm"])
def test_opus_output_decodes_close_to_offline_then_the_same_encoder(fmt: str) -> None:
    """The trained mini model decoding codes of a speech-like signal (a random model's output is noise, which
    Opus does not keep as a waveform): the session's Opus vs offline decode."""
    model = SNAC.from_pretrained("mini").eval()
    rng = np.random.default_rng(14)
    with torch.inference_mode():
        codes = model.encode(torch.from_numpy(speech_like(2 * MODEL_RATE, seed=3)).view(1, 1, -1))
    tokens = get_layout("interleaved", model.config).to_flat(codes)[0].numpy()

    async def test(server: SNACServer):
        return await ws_client.decode(server.url, tokens, chunk_tokens=random_chunks(rng, 9, 40),
                                      output_format=fmt, opus_bitrate=32000)

    result = serve(model, test)
    with torch.inference_mode():
        expected = model.decode(codes)[0, 0].numpy()
    got, reference = opus_snrs(fmt, result.audio.tobytes(), expected, bitrate=32000)
    assert got >= OPUS_SNR_FLOOR_DB and abs(got - reference) <= OPUS_PARITY_DB, (got, reference)
    ready = result.ready
    assert (ready.output_format, ready.output_rate, ready.opus_bitrate) == (fmt, 48000, 32000)
    assert ready.output_latency_samples == 2 * OutputEncoder(fmt, model_rate=MODEL_RATE).latency_samples
    assert result.done["output_samples"] is None and result.done["output_bytes"] == result.audio.size
    # Frames count bytes: contiguous, the first one starting with the container's header.
    starts = [frame.start for _, frame in result.frames if frame.payload_kind == 1]
    sizes = [frame.data.size for _, frame in result.frames if frame.payload_kind == 1]
    assert starts == list(np.cumsum([0] + sizes[:-1]))
    assert result.audio[:4].tobytes() == (b"OggS" if fmt == "opus" else b"\x1a\x45\xdf\xa3")


def test_opus_input_encode_session_gives_the_codes_of_its_decoded_input() -> None:
    """Ogg Opus in, cut anywhere (pages split across messages): the codes of offline encode of the same
    stream decoded (libopus is deterministic) and resampled 48 -> 24 kHz."""
    model = model_for("24k")
    rng = np.random.default_rng(15)
    data = client_audio("opus", 48000, 1.0, seed=15)
    dec = InputDecoder("opus", model_rate=MODEL_RATE)
    heard = np.concatenate([dec.push(data), dec.flush()])

    async def test(server: SNACServer):
        return await ws_client.encode(server.url, data, chunk_samples=random_chunks(rng, 11, 700) + [1],
                                      sample_format="opus")

    result = serve(model, test)
    np.testing.assert_array_equal(result.tokens, tokens_of(model, heard))
    assert result.done["input_items"] == len(data)  # Opus input is counted in bytes


def test_mixed_sessions_at_once_are_each_exact() -> None:
    """Plain PCM, mu-law and Opus sessions sharing the engine steps (Opus encoded in the thread pool): each
    equals its own offline result (the plain one within tests/test_server.py's PCM16 tolerance)."""
    model = model_for("24k")
    x = signal(24000, seed=16)
    pcm = np.frombuffer(encode_audio(x, "pcm16"), "<i2").astype(np.float32) / 32768
    mu = client_audio("mulaw", 8000, 1.0, seed=17)
    heard = soxr.resample(mulaw_decode(mu).astype(np.float32) / 32768, 8000, MODEL_RATE, quality="HQ")
    heard = heard.astype(np.float32)

    async def test(server: SNACServer):
        return await asyncio.gather(
            ws_client.roundtrip(server.url, pcm, chunk_samples=480, realtime=True),
            ws_client.roundtrip(server.url, mu, chunk_samples=160, realtime=True, sample_format="mulaw"),
            ws_client.roundtrip(server.url, pcm, chunk_samples=480, realtime=True, output_format="opus"))

    plain, telephony, opus = serve(model, test)
    codes, decoded = offline(model, pcm)
    flat = get_layout("interleaved", model.config).to_flat(codes)[0].numpy()
    np.testing.assert_array_equal(plain.tokens, flat)
    np.testing.assert_array_equal(opus.tokens, flat)
    assert np.abs(plain.audio - decoded[: pcm.size]).max() <= 1 / 32768 + 1e-5
    np.testing.assert_array_equal(telephony.tokens, tokens_of(model, heard))
    assert_g711_close("mulaw", telephony.audio, converted("mulaw", 8000, offline(model, heard)[1][: heard.size]))
    got, reference = opus_snrs("opus", opus.audio.tobytes(), decoded[: pcm.size])
    assert abs(got - reference) <= OPUS_PARITY_DB, (got, reference)


@pytest.mark.parametrize("rate", [8000, MODEL_RATE])
def test_input_positions_map_to_client_items_and_the_map_stays_bounded(rate: int) -> None:
    """A frame's input_end (model samples the engine had) becomes the client items received by then, for token
    and audio frames asking in their own order (audio lagging). At 8 kHz soxr hands samples over in blocks;
    at the model's rate every message counts, and over 15000 of them the map stays bounded."""
    formats = SessionFormats(Hello(kind="roundtrip", sample_format="mulaw", sample_rate=rate,
                                   output_format="float32"), MODEL_RATE)
    assert formats.input is not None and formats.output is None and formats.engine_format == "float32"
    rng = np.random.default_rng(19)
    received, marks = 0, []
    for _ in range(15000):
        samples = formats.decode(bytes(int(n) for n in rng.integers(0, 256, int(rng.integers(1, 40)))))
        if samples.size:
            received += samples.size
            formats.delivered(received)
            marks.append((received, formats.items_in))
    sent: List[bytes] = []
    for k in range(0, len(marks), 3):
        for kind, (end, items) in ((PAYLOAD_TOKENS, marks[k]), (PAYLOAD_AUDIO, marks[max(0, k - 900)])):
            formats.take(HEADER.pack(kind, 0, 0, end, 0, 0, 0), sent.append, pytest.fail)
            assert HEADER.unpack_from(sent[-1])[3] == items
    assert len(marks) == 15000 if rate == MODEL_RATE else len(marks) > 300
    assert len(formats._ends) < 4096 + 1000


# ---- errors ----------------------------------------------------------------------------------------------
BAD_HELLOS: Dict[str, Any] = {
    "unknown_format": ({"kind": "encode", "sample_format": "mp3"}, "bad_hello"),
    "unknown_output_format": ({"kind": "decode", "output_format": "aac"}, "bad_hello"),
    "rate_below_range": ({"kind": "encode", "sample_rate": 7999}, "bad_sample_rate"),
    "rate_above_range": ({"kind": "roundtrip", "output_rate": 48001}, "bad_sample_rate"),
    "opus_not_at_48k": ({"kind": "decode", "output_format": "opus", "output_rate": 16000}, "bad_sample_rate"),
    "opus_everywhere_at_8k": ({"kind": "roundtrip", "sample_format": "webm", "sample_rate": 8000},
                              "bad_sample_rate"),
    "bitrate_out_of_range": ({"kind": "decode", "output_format": "opus", "opus_bitrate": 1000}, "bad_hello"),
    "bitrate_without_opus": ({"kind": "decode", "sample_format": "mulaw", "opus_bitrate": 24000}, "bad_hello"),
    "output_format_for_encode": ({"kind": "encode", "output_format": "mulaw"}, "bad_hello"),
    "input_rate_for_decode": ({"kind": "decode", "input_rate": 16000}, "bad_hello"),
    "rate_not_an_integer": ({"kind": "encode", "input_rate": 16000.5}, "bad_hello"),
}
BAD_AUDIO = {
    "odd_pcm16_bytes_at_16k": ({"kind": "encode", "sample_rate": 16000}, [b"\x00" * 7]),
    "not_ogg": ({"kind": "encode", "sample_format": "opus"}, [b"RIFF" + bytes(60)]),
    "flush_inside_an_ogg_page": ({"kind": "encode", "sample_format": "opus"},
                                 [client_audio("opus", 48000, 0.2, seed=1)[:100], json.dumps({"type": "flush"})]),
    "nan_float32_at_8k": ({"kind": "roundtrip", "sample_format": "float32", "sample_rate": 8000},
                          [np.array([0.1, np.nan], "<f4").tobytes()]),
}


def test_bad_format_hellos_and_audio_get_clear_errors_and_the_server_keeps_serving(monkeypatch) -> None:
    model = model_for("24k")
    x = signal(12000, seed=18)
    _, expected = offline(model, x)

    async def test(server: SNACServer):
        for hello, code in BAD_HELLOS.values():
            await _expect_error(server, _send(json.dumps({"type": "hello", **hello})), code)
        for hello, messages in BAD_AUDIO.values():
            await _expect_error(server, _send(*messages), "bad_audio", hello)
        await server.wait_sessions(0)
        with monkeypatch.context() as patch:  # a server without PyAV refuses Opus at the hello
            patch.setitem(sys.modules, "av", None)
            for hello in ({"kind": "decode", "output_format": "opus"}, {"kind": "encode", "sample_format": "webm"}):
                await _expect_error(server, _send(json.dumps({"type": "hello", **hello})), "bad_hello")
        result = await ws_client.roundtrip(server.url, x, sample_format="float32")
        return result, dict(server.stats["refusals"])

    result, refusals = serve(model, test, max_sessions=1)  # a slot kept by a failed session would show here
    assert np.abs(result.audio - expected[: x.size]).max() <= 1e-5
    assert refusals["bad_hello"] == 2 + sum(code == "bad_hello" for _, code in BAD_HELLOS.values())


def test_refusal_messages_name_the_problem() -> None:
    async def test(server: SNACServer):
        messages = {}
        for name, hello in (("rate", {"kind": "encode", "input_rate": 96000}),
                            ("opus", {"kind": "decode", "sample_format": "opus", "sample_rate": 16000}),
                            ("format", {"kind": "encode", "sample_format": "gsm"})):
            with pytest.raises(ws_client.ServerError) as refused:
                await ws_client.Session.open(server.url, **hello)
            messages[name] = refused.value.message
        return messages

    messages = serve(model_for("24k"), test)
    assert "input_rate" in messages["rate"] and "8000..48000" in messages["rate"]
    assert "48000" in messages["opus"] and "sample_rate" in messages["opus"]
    assert all(name in messages["format"] for name in FORMATS)


def test_wire_names_match_the_formats_module() -> None:
    """protocol.py keeps the formats' wire view (it may not import snac_stream.formats, which brings torch)."""
    assert list(AUDIO_FORMATS) == list(FORMATS)
    for name, info in FORMATS.items():
        assert AUDIO_FORMATS[name] == (info.bytes_per_sample or 1)
        assert (name in CONTAINER_FORMATS) == (info.bytes_per_sample is None)
    assert HEADER_BYTES == 32
