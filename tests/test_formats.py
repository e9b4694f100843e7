"""snac_stream.formats: client audio formats and rates, streamed both ways."""

from __future__ import annotations

import io
import shutil
import subprocess
import warnings

import numpy as np
import pytest
import soundfile as sf
import soxr

from snac_stream.audio import float_to_pcm16, load_audio, pcm16_to_float
from snac_stream.formats import (
    FORMATS,
    InputDecoder,
    OutputEncoder,
    _OggReader,
    _WebMReader,
    alaw_decode,
    alaw_encode,
    check_format,
    mulaw_decode,
    mulaw_encode,
    resampler_latency,
)

MODEL_RATE = 24000


def signal(n: int, rate: int = MODEL_RATE, seed: int = 0) -> np.ndarray:
    """Speech-like test signal: harmonics of a gliding 120-180 Hz pitch, a slow envelope, a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    f0 = 150 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(0.25 / k * np.sin(k * phase) for k in range(1, 12))
    x = x * (0.55 + 0.45 * np.sin(2 * np.pi * 2.5 * t)) + 0.01 * rng.standard_normal(n)
    return x.astype(np.float32)


def cuts(n: int, rng: np.random.Generator, most: int) -> list:
    """Random chunk boundaries over n items, chunks of 0..most items (empty chunks included)."""
    bounds, pos = [0], 0
    while pos < n:
        pos = min(n, pos + int(rng.integers(0, most + 1)))
        bounds.append(pos)
    return list(zip(bounds[:-1], bounds[1:]))


def decode_all(dec: InputDecoder, data: bytes, rng: np.random.Generator, most: int = 977) -> np.ndarray:
    out = [dec.push(data[a:b]) for a, b in cuts(len(data), rng, most)]
    return np.concatenate(out + [dec.flush()])


def encode_all(enc: OutputEncoder, x: np.ndarray, rng: np.random.Generator, most: int = 977) -> bytes:
    return b"".join([enc.push(x[a:b]) for a, b in cuts(len(x), rng, most)] + [enc.flush()])


# ---- the identity at the model's rate --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["pcm16", "float32", "mulaw", "alaw"])
def test_model_rate_is_identity(fmt):
    rng = np.random.default_rng(1)
    x = signal(5000)
    enc = OutputEncoder(fmt, MODEL_RATE, model_rate=MODEL_RATE)
    dec = InputDecoder(fmt, MODEL_RATE, model_rate=MODEL_RATE)
    assert enc.latency_samples == dec.latency_samples == 0 and enc.identity and dec.identity
    data = encode_all(enc, x, rng)
    assert len(data) == len(x) * FORMATS[fmt].bytes_per_sample
    y = decode_all(dec, data, rng)
    if fmt == "float32":
        assert data == x.astype("<f4").tobytes() and np.array_equal(y, x)  # bit-exact both ways
    elif fmt == "pcm16":
        assert data == float_to_pcm16(x) and np.array_equal(y, pcm16_to_float(data))
    else:
        table = mulaw_decode if fmt == "mulaw" else alaw_decode
        assert np.array_equal(y, table(data).astype(np.float32) / 32768)
        assert len(y) == len(x)


def test_sample_split_across_chunks_and_partial_sample_at_end():
    data = float_to_pcm16(signal(100))
    dec = InputDecoder("pcm16", model_rate=MODEL_RATE)
    parts = [dec.push(data[i:i + 1]) for i in range(len(data))]  # one byte at a time
    assert [len(p) for p in parts[:4]] == [0, 1, 0, 1]
    assert np.array_equal(np.concatenate(parts + [dec.flush()]), pcm16_to_float(data))
    dec = InputDecoder("float32", model_rate=MODEL_RATE)
    dec.push(b"\0" * 6)
    with pytest.raises(ValueError, match="ends inside a sample: 2 byte"):
        dec.flush()


# ---- resampling: streaming equals soxr's one-shot resample, for any chunking ---------------------------------------
@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
@pytest.mark.parametrize("quality", ["HQ", "VHQ"])
def test_resampled_paths_equal_whole_signal_soxr(rate, quality):
    rng = np.random.default_rng(rate)
    client = signal(rate // 2, rate, seed=2)
    pcm = float_to_pcm16(client)
    for trial in range(2):
        dec = InputDecoder("pcm16", rate, model_rate=MODEL_RATE, quality=quality)
        y = decode_all(dec, pcm, rng, most=2 * rate // 100)
        expected = soxr.resample(pcm16_to_float(pcm), rate, MODEL_RATE, quality=quality)
        assert y.dtype == np.float32 and np.array_equal(y, expected)
    x = signal(MODEL_RATE // 2, seed=3)
    enc = OutputEncoder("float32", rate, model_rate=MODEL_RATE, quality=quality)
    out = np.frombuffer(encode_all(enc, x, rng, most=700), "<f4")
    assert np.array_equal(out, soxr.resample(x, MODEL_RATE, rate, quality=quality))
    assert dec.latency_samples == resampler_latency(rate, MODEL_RATE, quality) > 0
    assert enc.latency_samples >= resampler_latency(MODEL_RATE, rate, quality) * MODEL_RATE / rate


@pytest.mark.parametrize("fmt,rate", [("pcm16", 16000), ("mulaw", 8000), ("alaw", 8000), ("float32", 48000),
                                      ("pcm16", 24000)])
def test_stated_latency_bounds_what_is_held_back(fmt, rate):
    """After any push, output covers the input up to at most latency_samples (model rate)."""
    x = signal(rate // 2, rate)
    data = OutputEncoder(fmt, rate, model_rate=rate).push(x)  # client bytes, no resampling
    width = FORMATS[fmt].bytes_per_sample
    dec = InputDecoder(fmt, rate, model_rate=MODEL_RATE)
    got = 0
    for a in range(0, len(data), 37 * width):
        got += dec.push(data[a:a + 37 * width]).shape[0]
        expected = min(len(data), a + 37 * width) // width * MODEL_RATE / rate
        assert got >= expected - dec.latency_samples - 1
    enc = OutputEncoder(fmt, rate, model_rate=MODEL_RATE)
    y = signal(MODEL_RATE // 2)
    got = 0
    for a in range(0, len(y), 29):
        got += len(enc.push(y[a:a + 29])) // width
        assert got * MODEL_RATE / rate >= min(len(y), a + 29) - enc.latency_samples - 1


# ---- G.711 -----------------------------------------------------------------------------------------------------
def test_g711_reference_values():
    # ITU-T G.711 / reference-code values: code bytes as on the wire.
    assert mulaw_encode(np.array([0, -1, 1, 32767, -32768, 8031 * 4], np.int16)).tolist() == \
        [0xFF, 0x7E, 0xFF, 0x80, 0x00, 0x80]
    # mu-law segment 0 has steps of 8, segment 1 starts at 132 with steps of 16 (16-bit scale).
    assert mulaw_decode(bytes([0x00, 0x7F, 0x80, 0xFF, 0xFE, 0xF0, 0xEF, 0xEE, 0x6F])).tolist() == \
        [-32124, 0, 32124, 0, 8, 120, 132, 148, -132]
    assert alaw_encode(np.array([0, -1, 1, 32767, -32768, -8], np.int16)).tolist() == \
        [0xD5, 0x55, 0xD5, 0xAA, 0x2A, 0x55]
    assert alaw_decode(bytes([0xD5, 0x55, 0xAA, 0x2A, 0xD4, 0x54])).tolist() == [8, -8, 32256, -32256, 24, -24]


def test_g711_round_trip_properties():
    codes = np.arange(256, dtype=np.uint8)
    # A-law: every code decodes to a distinct value that encodes back to it.
    assert np.array_equal(alaw_encode(alaw_decode(codes)), codes)
    assert len(set(alaw_decode(codes).tolist())) == 256
    # mu-law: likewise except negative zero (0x7F), which encodes as positive zero (0xFF).
    back = mulaw_encode(mulaw_decode(codes))
    assert np.array_equal(back[codes != 0x7F], codes[codes != 0x7F]) and back[0x7F] == 0xFF
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    for encode, decode in [(mulaw_encode, mulaw_decode), (alaw_encode, alaw_decode)]:
        y = decode(encode(pcm)).astype(np.int64)
        assert np.all(np.diff(y) >= 0)  # monotonic
        # Quantisation error: half a step; steps are at most 1/16 of the segment's start, 16 in the first ones.
        err = np.abs(y - pcm)
        assert np.all(err <= np.abs(pcm.astype(np.int64)) / 32 + 8)
        assert err.max() > 500  # the top segment's step is 1024 (and the ends clip)


def test_g711_equals_stdlib_audioop_where_available():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")  # removed in Python 3.13
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    raw = pcm.astype("<i2").tobytes()
    assert np.array_equal(np.frombuffer(audioop.lin2ulaw(raw, 2), np.uint8), mulaw_encode(pcm))
    assert np.array_equal(np.frombuffer(audioop.lin2alaw(raw, 2), np.uint8), alaw_encode(pcm))
    codes = bytes(range(256))
    assert np.array_equal(np.frombuffer(audioop.ulaw2lin(codes, 2), "<i2"), mulaw_decode(codes))
    assert np.array_equal(np.frombuffer(audioop.alaw2lin(codes, 2), "<i2"), alaw_decode(codes))


# ---- Opus ------------------------------------------------------------------------------------------------------
import av  # noqa: E402  (test extra: a missing install fails, never skips)


def metrics(x: np.ndarray, y: np.ndarray, edge: int = 2400):
    """(correlation, SNR dB, best lag) of y against x, ignoring the edges."""
    a, b = x[edge:-edge].astype(np.float64), y[edge:-edge].astype(np.float64)
    corr = float(np.corrcoef(a, b)[0, 1])
    snr = float(10 * np.log10(np.sum(a ** 2) / np.sum((a - b) ** 2)))
    spectrum = np.fft.rfft(b, 2 * len(a)) * np.conj(np.fft.rfft(a, 2 * len(a)))
    xcorr = np.fft.irfft(spectrum)  # xcorr[lag] = sum a[n] b[n + lag], negative lags at the end
    lags = np.r_[0:201, -200:0]
    best = int(lags[np.argmax(np.r_[xcorr[:201], xcorr[-200:]])])
    return corr, snr, best


def opus_round_trip(x: np.ndarray, rng: np.random.Generator, fmt: str = "opus", **kwargs) -> tuple:
    data = encode_all(OutputEncoder(fmt, model_rate=MODEL_RATE, **kwargs), x, rng)
    return data, decode_all(InputDecoder(fmt, model_rate=MODEL_RATE), data, rng)


def speech() -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        return signal(3 * MODEL_RATE, seed=5)
    import os
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "speech.wav")
        subprocess.run(["espeak-ng", "-w", path, "Streaming speech, one frame at a time."], check=True)
        return load_audio(path, MODEL_RATE)[0]


@pytest.mark.parametrize("source", ["harmonics", "speech"])
def test_opus_round_trip_quality_and_alignment(source):
    """24 kbps, 20 ms frames: output aligned at lag 0 and the same length; correlation >= 0.97, SNR >= 12 dB."""
    rng = np.random.default_rng(7)
    x = signal(2 * MODEL_RATE) if source == "harmonics" else speech()
    data, y = opus_round_trip(x, rng, serial=5)
    assert len(y) == len(x)  # pre-skip and end trimming applied
    corr, snr, lag = metrics(x, y)
    assert lag == 0 and corr >= 0.97 and snr >= 12.0, (corr, snr, lag)
    # libsndfile (another Ogg Opus reader) decodes the stream too, at the header's 24 kHz input rate (libopus
    # decimating internally, within a sample of our 48 kHz decode + soxr; 0.937 on the speech).
    other, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == MODEL_RATE and len(other) == len(x)
    corr, _, lag = metrics(x, other)
    assert corr >= 0.9 and abs(lag) <= 1
    # More bits, more fidelity.
    _, y64 = opus_round_trip(x, rng, bitrate=64000)
    assert metrics(x, y64)[1] >= snr + 5


def test_opus_chunking_invariance_and_page_structure():
    x = signal(MODEL_RATE)
    streams = [encode_all(OutputEncoder("opus", model_rate=MODEL_RATE, serial=9), x, np.random.default_rng(s),
                          most=m) for s, m in [(0, 1), (1, 500), (2, 5000)]]
    streams.append(encode_all(OutputEncoder("opus", model_rate=MODEL_RATE, serial=9), x, np.random.default_rng(3),
                              most=len(x)))
    assert all(s == streams[0] for s in streams[1:])  # libopus is deterministic: identical bytes
    decoded = [decode_all(InputDecoder("opus", model_rate=MODEL_RATE), streams[0], np.random.default_rng(s),
                          most=m) for s, m in [(0, 1), (1, 300), (2, 10 ** 6)]]
    assert all(np.array_equal(d, decoded[0]) for d in decoded[1:])
    packets = _OggReader().push(streams[0])
    assert packets[0][0][:8] == b"OpusHead" and packets[1][0][:8] == b"OpusTags"
    frames = len(packets) - 2
    assert frames == -(-len(x) // 480) + 1  # 20 ms frames plus the encoder's look-ahead frame
    assert packets[-1][2] and packets[-1][1] == 312 + 2 * len(x)  # EOS page: pre-skip + length at 48 kHz


def test_opus_output_latency_is_frame_plus_lookahead():
    enc = OutputEncoder("opus", model_rate=MODEL_RATE)
    assert enc.codec_rate == MODEL_RATE  # libopus codes 24 kHz directly: no resampler
    assert enc.latency_samples == 480 + 156  # one 20 ms frame + 6.5 ms look-ahead
    reader, x = _OggReader(), signal(MODEL_RATE)
    for a in range(0, len(x), 101):
        pages = reader.push(enc.push(x[a:a + 101]))
        if pages and a > 2000:
            decodable = (pages[-1][1] - 312) // 2  # granule (48 kHz, pre-skip included) -> 24 kHz samples
            assert decodable >= min(len(x), a + 101) - enc.latency_samples
    low = OutputEncoder("opus", model_rate=MODEL_RATE, application="lowdelay", frame_ms=10)
    assert low.latency_samples == 240 + 60
    assert OutputEncoder("opus", model_rate=44100).codec_rate == 48000  # not an Opus rate: resampled first
    assert InputDecoder("opus", model_rate=MODEL_RATE).latency_samples == resampler_latency(48000, MODEL_RATE)


def test_opus_input_errors():
    x = signal(4800)
    data = OutputEncoder("opus", model_rate=MODEL_RATE, serial=1).push(x)
    with pytest.raises(ValueError, match="does not start with 'OggS'"):
        InputDecoder("opus", model_rate=MODEL_RATE).push(b"RIFF" + bytes(40))
    bad = bytearray(data)
    bad[60] ^= 0xFF
    with pytest.raises(ValueError, match="CRC"):
        InputDecoder("opus", model_rate=MODEL_RATE).push(bytes(bad))
    dec = InputDecoder("opus", model_rate=MODEL_RATE)
    dec.push(data[:-5])
    with pytest.raises(ValueError, match="ends inside a page"):
        dec.flush()
    assert InputDecoder("opus", model_rate=MODEL_RATE).flush().shape == (0,)  # an empty stream is fine


def ffmpeg_webm(x48: np.ndarray) -> bytes:
    """Opus in WebM written by FFmpeg's muxer (through PyAV), as a browser or another tool would send it."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as out:
        stream = out.add_stream("libopus", rate=48000, layout="mono")
        stream.bit_rate = 32000
        for k in range(0, len(x48), 960):
            frame = av.AudioFrame.from_ndarray(x48[None, k:k + 960], format="flt", layout="mono")
            frame.sample_rate, frame.pts = 48000, k
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def test_webm_round_trip_and_ffmpeg_reads_it():
    rng = np.random.default_rng(11)
    x = speech()
    data, y = opus_round_trip(x, rng, "webm")
    assert len(y) == len(x)  # CodecDelay (pre-skip) and the last block's DiscardPadding applied
    corr, snr, lag = metrics(x, y)
    assert lag == 0 and corr >= 0.97 and snr >= 12.0, (corr, snr, lag)
    assert data[:4] == b"\x1a\x45\xdf\xa3" and len(data) < len(opus_round_trip(x, rng)[0])  # less framing
    # Same packets as Ogg Opus: the same decoded audio.
    assert np.array_equal(y, opus_round_trip(x, rng, serial=1)[1])
    # FFmpeg's demuxer and decoder read it: the exact length at 48 kHz, aligned.
    with av.open(io.BytesIO(data)) as inp:
        other = np.concatenate([f.to_ndarray().reshape(-1) for f in inp.decode(inp.streams.audio[0])])
    assert len(other) == 2 * len(x)
    corr, _, lag = metrics(soxr.resample(x, MODEL_RATE, 48000, quality="HQ"), other.astype(np.float32))
    assert corr >= 0.97 and lag == 0
    # Chunking invariance of the bytes.
    again = encode_all(OutputEncoder("webm", model_rate=MODEL_RATE), x, np.random.default_rng(12), most=5)
    assert again == data


def test_webm_from_ffmpeg_read_incrementally():
    x48 = signal(48000, 48000)
    data = ffmpeg_webm(x48)
    with av.open(io.BytesIO(data)) as inp:
        reference = np.concatenate([f.to_ndarray().reshape(-1) for f in inp.decode(inp.streams.audio[0])])
    for most in (1, 100, 10 ** 6):
        y = decode_all(InputDecoder("webm", model_rate=48000), data, np.random.default_rng(most), most=most)
        assert len(y) == len(x48) == len(reference)
        assert np.abs(y - reference.astype(np.float32)).max() < 1e-3  # FFmpeg's own decode of the same packets
    with pytest.raises(ValueError, match="not a WebM stream"):
        InputDecoder("webm", model_rate=MODEL_RATE).push(b"OggS" + bytes(60))
    dec = InputDecoder("webm", model_rate=MODEL_RATE)
    dec.push(data[:-3])
    with pytest.raises(ValueError, match="ends inside an element"):
        dec.flush()


def test_webm_output_latency():
    enc = OutputEncoder("webm", model_rate=MODEL_RATE)
    assert enc.latency_samples == 480 + 156
    reader, x, packets = _WebMReader(), signal(MODEL_RATE), 0
    for a in range(0, len(x), 101):
        packets += len(reader.push(enc.push(x[a:a + 101])))
        decodable = (packets * 960 - 312) // 2  # 48 kHz packets, less the pre-skip, at 24 kHz
        assert decodable >= min(len(x), a + 101) - enc.latency_samples


# ---- validation ----------------------------------------------------------------------------------------------
def test_bad_combinations_raise_value_errors():
    with pytest.raises(ValueError, match="unknown audio format 'mp3'"):
        InputDecoder("mp3", model_rate=MODEL_RATE)
    for rate in (7999, 48001, 0, 16000.0, True):
        with pytest.raises(ValueError, match="sample_rate"):
            OutputEncoder("pcm16", rate, model_rate=MODEL_RATE)
    for fmt in ("opus", "webm"):
        with pytest.raises(ValueError, match="48000 Hz by definition"):
            OutputEncoder(fmt, 24000, model_rate=MODEL_RATE)
    for bitrate in (5999, 510001, 24000.0):
        with pytest.raises(ValueError, match="bitrate"):
            OutputEncoder("opus", model_rate=MODEL_RATE, bitrate=bitrate)
    with pytest.raises(ValueError, match="frame_ms"):
        OutputEncoder("opus", model_rate=MODEL_RATE, frame_ms=25)
    with pytest.raises(ValueError, match="application"):
        OutputEncoder("opus", model_rate=MODEL_RATE, application="music")
    with pytest.raises(ValueError, match="quality"):
        InputDecoder("pcm16", 16000, model_rate=MODEL_RATE, quality="best")
    with pytest.raises(ValueError, match="NaN"):
        InputDecoder("float32", model_rate=MODEL_RATE).push(np.array([np.nan], "<f4").tobytes())
    with pytest.raises(ValueError, match="NaN"):
        OutputEncoder("pcm16", model_rate=MODEL_RATE).push(np.array([np.inf], np.float32))
    with pytest.raises(TypeError, match="takes bytes"):
        InputDecoder("pcm16", model_rate=MODEL_RATE).push(np.zeros(4, np.int16))
    dec = InputDecoder("pcm16", model_rate=MODEL_RATE)
    dec.flush()
    with pytest.raises(RuntimeError, match="flushed"):
        dec.push(b"\0\0")
    assert check_format("mulaw") == ("mulaw", 8000) and check_format("opus") == ("opus", 48000)
    assert check_format("pcm16", model_rate=MODEL_RATE) == ("pcm16", MODEL_RATE)
    assert set(FORMATS) == {"pcm16", "float32", "mulaw", "alaw", "opus", "webm"}
    assert all(isinstance(info.as_dict()["latency"], str) for info in FORMATS.values())
