"""Audio file I/O, resampling and PCM conversions (snac_stream.audio)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from snac_stream.audio import (
    float_to_pcm16,
    load_audio,
    pcm16_to_float,
    resample,
    save_audio,
    to_tensor,
)


def tone(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ---- reading ---------------------------------------------------------------------------------------------
def test_wav_pcm16_reads_as_float(tmp_path):
    pcm = np.array([0, 1, -1, 32767, -32768, 1000], dtype=np.int16)
    sf.write(tmp_path / "a.wav", pcm, 16000, subtype="PCM_16")
    audio, rate = load_audio(tmp_path / "a.wav")
    assert rate == 16000
    assert audio.dtype == np.float32 and audio.shape == (6,)
    np.testing.assert_array_equal(audio, pcm.astype(np.float32) / 32768)


def test_stereo_is_mixed_to_mono(tmp_path):
    left, right = tone(440, 16000, 0.25), tone(1000, 16000, 0.25, amp=0.3)
    sf.write(tmp_path / "st.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    audio, rate = load_audio(tmp_path / "st.wav")
    assert rate == 16000 and audio.shape == left.shape
    np.testing.assert_allclose(audio, (left + right) / 2, atol=1e-7)


def test_resampling_44k1_to_24k_is_band_limited(tmp_path):
    rate_in, rate_out, seconds = 44100, 24000, 1.0
    # A 1 kHz tone must survive; a 15 kHz tone lies above the new Nyquist (12 kHz) and must be removed,
    # not folded back to 9 kHz as naive interpolation would.
    sf.write(tmp_path / "in.wav", tone(1000, rate_in, seconds) + tone(15000, rate_in, seconds, amp=0.3),
             rate_in, subtype="FLOAT")
    audio, original = load_audio(tmp_path / "in.wav", rate_out)
    assert original == rate_in
    assert audio.dtype == np.float32
    assert abs(audio.shape[0] - rate_out * seconds) <= 1
    middle = slice(2000, 22000)  # away from the filter's edge transients
    np.testing.assert_allclose(audio[middle], tone(1000, rate_out, seconds)[middle], atol=2e-3)


def test_resample_same_rate_is_identity():
    x = tone(300, 8000, 0.1)
    np.testing.assert_array_equal(resample(x, 8000, 8000), x)


def test_target_rate_none_keeps_rate(tmp_path):
    sf.write(tmp_path / "a.wav", tone(200, 11025, 0.1), 11025)
    audio, rate = load_audio(tmp_path / "a.wav", None)
    assert rate == 11025 and audio.shape == (1102,)


def test_flac_reads_losslessly(tmp_path):
    x = tone(440, 22050, 0.2)
    pcm = np.frombuffer(float_to_pcm16(x), dtype="<i2")
    sf.write(tmp_path / "a.flac", pcm, 22050, subtype="PCM_16")
    audio, rate = load_audio(tmp_path / "a.flac")
    assert rate == 22050
    np.testing.assert_array_equal(audio, pcm16_to_float(pcm))


def test_ogg_vorbis_reads(tmp_path):
    x = np.stack([tone(440, 24000, 0.5), tone(440, 24000, 0.5)], axis=1)
    sf.write(tmp_path / "a.ogg", x, 24000, format="OGG", subtype="VORBIS")
    audio, rate = load_audio(tmp_path / "a.ogg", 16000)
    assert rate == 24000
    assert abs(audio.shape[0] - 8000) <= 1
    reference = tone(440, 16000, 0.5)
    n = min(len(reference), len(audio))
    assert np.corrcoef(audio[:n], reference[:n])[0, 1] > 0.95  # lossy, but the same tone


# ---- reading errors --------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.wav"):
        load_audio(tmp_path / "nothere.wav", 24000)


def test_unreadable_file_names_file_and_formats(tmp_path):
    (tmp_path / "fake.wav").write_text("this is not audio\n" * 10)
    with pytest.raises(ValueError, match=r"fake\.wav.*Supported formats: wav, flac, ogg"):
        load_audio(tmp_path / "fake.wav", 24000)


def test_directory_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        load_audio(tmp_path, 24000)


def test_empty_file_is_rejected(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match="no audio samples"):
        load_audio(tmp_path / "empty.wav", 24000)


def test_non_finite_samples_are_rejected(tmp_path):
    sf.write(tmp_path / "nan.wav", np.array([0.0, np.nan, 0.1], dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match="NaN"):
        load_audio(tmp_path / "nan.wav")


# ---- writing ---------------------------------------------------------------------------------------------
def test_save_wav_default_pcm16_round_trips_and_clips(tmp_path):
    x = np.concatenate([tone(300, 24000, 0.05), np.array([1.5, -1.5, 1.0, -1.0], dtype=np.float32)])
    save_audio(tmp_path / "o.wav", x, 24000)
    info = sf.info(tmp_path / "o.wav")
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("WAV", "PCM_16", 24000, 1)
    audio, _ = load_audio(tmp_path / "o.wav")
    np.testing.assert_array_equal(audio, pcm16_to_float(float_to_pcm16(x)))
    assert audio[-4:].tolist() == [32767 / 32768, -1.0, 32767 / 32768, -1.0]  # clipped, not wrapped
    assert np.abs(audio[:-4] - x[:-4]).max() <= 0.5 / 32768


def test_save_float_wav_is_exact(tmp_path):
    x = np.array([0.123456789, 1.5, -2.0], dtype=np.float32)
    save_audio(tmp_path / "f.wav", torch.from_numpy(x).view(1, 1, -1), 8000, subtype="FLOAT")
    assert sf.info(tmp_path / "f.wav").subtype == "FLOAT"
    np.testing.assert_array_equal(load_audio(tmp_path / "f.wav")[0], x)


@pytest.mark.parametrize("suffix, subtype", [(".flac", "PCM_16"), (".ogg", "VORBIS")])
def test_save_format_follows_suffix(tmp_path, suffix, subtype):
    save_audio(tmp_path / f"o{suffix}", tone(440, 24000, 0.2), 24000)
    assert sf.info(tmp_path / f"o{suffix}").subtype == subtype
    assert load_audio(tmp_path / f"o{suffix}")[0].shape == (4800,)


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="unsupported suffix '.mp4'"):
        save_audio(tmp_path / "o.mp4", np.zeros(10), 24000)
    with pytest.raises(ValueError, match="FLAC files do not support sample format FLOAT"):
        save_audio(tmp_path / "o.flac", np.zeros(10), 24000, subtype="FLOAT")
    with pytest.raises(ValueError, match="mono"):
        save_audio(tmp_path / "o.wav", np.zeros((2, 10)), 24000)
    with pytest.raises(ValueError, match="empty"):
        save_audio(tmp_path / "o.wav", np.zeros(0), 24000)
    with pytest.raises(OSError, match="o.wav"):
        save_audio(tmp_path / "missing-dir" / "o.wav", np.zeros(10), 24000)


def test_to_tensor_shape():
    t = to_tensor(np.arange(5, dtype=np.float64))
    assert t.shape == (1, 1, 5) and t.dtype == torch.float32
    with pytest.raises(ValueError):
        to_tensor(np.zeros((2, 5)))


# ---- PCM16 <-> float -------------------------------------------------------------------------------------
def test_pcm16_known_values():
    raw = np.array([0, 1, -1, 32767, -32768], dtype="<i2").tobytes()
    np.testing.assert_array_equal(pcm16_to_float(raw), [0, 1 / 32768, -1 / 32768, 32767 / 32768, -1.0])
    assert float_to_pcm16([0.0, 1.0, -1.0, 2.0, -2.0, np.nan]) == np.array(
        [0, 32767, -32768, 32767, -32768, 0], dtype="<i2").tobytes()
    assert float_to_pcm16([0.5]) == b"\x00\x40"  # little-endian
    with pytest.raises(ValueError, match="even number of bytes"):
        pcm16_to_float(b"\x00\x01\x02")
    np.testing.assert_array_equal(pcm16_to_float(np.array([16384], dtype=np.int16)), [0.5])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512).map(lambda b: b[: len(b) // 2 * 2]))
def test_pcm16_bytes_round_trip_exactly(raw):
    assert float_to_pcm16(pcm16_to_float(raw)) == raw


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1.0, 1.0, width=32), min_size=1, max_size=64))
def test_float_round_trip_error_is_half_a_step(values):
    x = np.array(values, dtype=np.float32)
    back = pcm16_to_float(float_to_pcm16(x))
    # 1.0 saturates to 32767/32768; everything else rounds to the nearest step.
    assert np.all(np.abs(back - x) <= np.where(x >= 32767.5 / 32768, 1 / 32768, 0.5 / 32768) + 1e-9)
