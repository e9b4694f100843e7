"""Files of any length through the codec in blocks (snac_stream.files, the CLI's encode/decode).

The block paths must give what the in-memory paths give: the same resampled samples as ``load_audio``, the
same codes as ``model.encode`` of the whole file, and ``model.decode``'s audio, for any block size.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import soundfile as sf
import torch

from snac_stream import PRESETS, SNAC
from snac_stream.audio import AudioReader, AudioWriter, load_audio, save_audio, to_tensor
from snac_stream.files import decode_file, encode_file

TINY = {
    "24khz": dataclasses.replace(PRESETS["24khz"], encoder_dim=16, decoder_dim=64),
    "44khz": dataclasses.replace(PRESETS["44khz"], encoder_dim=16, decoder_dim=64),
}


@pytest.fixture(scope="module", params=sorted(TINY))
def model(request) -> SNAC:
    torch.manual_seed(3)
    return SNAC.from_config(TINY[request.param]).eval()


def _noise_file(path, seconds: float, rate: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal((round(seconds * rate), channels)) * 0.2).astype(np.float32)
    data[: rate // 10] = 0.0  # a silent start, as recordings have
    sf.write(str(path), data, rate, subtype="FLOAT")
    return data


@pytest.mark.parametrize("rate,channels", [(44100, 2), (24000, 1), (16000, 1)])
def test_reader_blocks_equal_whole_file(tmp_path, rate, channels):
    _noise_file(tmp_path / "a.wav", 3.3, rate, channels, seed=rate)
    whole, source_rate = load_audio(tmp_path / "a.wav", 24000)
    assert source_rate == rate
    rng = np.random.default_rng(0)
    for block_frames in [1, 777, int(rng.integers(1000, 50000)), 10**7]:
        with AudioReader(tmp_path / "a.wav", 24000, block_frames=block_frames) as reader:
            blocks = list(reader.blocks())
        np.testing.assert_array_equal(np.concatenate(blocks), whole)


def test_writer_blocks_equal_one_write(tmp_path):
    audio = np.random.default_rng(1).uniform(-1.2, 1.2, 50_000).astype(np.float32)
    save_audio(tmp_path / "one.wav", audio, 24000)
    with AudioWriter(tmp_path / "blocks.wav", 24000) as writer:
        for piece in np.array_split(audio, 17):
            writer.write(piece)
    assert writer.samples_written == audio.shape[0]
    assert (tmp_path / "one.wav").read_bytes() == (tmp_path / "blocks.wav").read_bytes()


def test_encode_file_equals_offline_encode(tmp_path, model):
    _noise_file(tmp_path / "in.wav", 4.1, 44100, 2, seed=7)
    audio, _ = load_audio(tmp_path / "in.wav", model.sampling_rate)
    with torch.inference_mode():
        expected = model.encode(to_tensor(audio))
    rng = np.random.default_rng(2)
    for block_seconds in [0.05, float(rng.uniform(0.1, 1.5)), 100.0]:
        got = encode_file(model, tmp_path / "in.wav", block_seconds=block_seconds, progress=False)
        assert got.num_samples == audio.shape[0] and got.source_rate == 44100
        for level, (a, b) in enumerate(zip(expected, got.codes)):
            assert torch.equal(a, b), f"level {level} differs at block_seconds={block_seconds}"


def test_decode_file_equals_offline_decode(tmp_path, model):
    torch.manual_seed(5)
    cfg = model.config
    frames = 4 * 4  # whole attention windows of the 44 kHz structure
    codes = [torch.randint(0, cfg.codebook_size, (1, frames * cfg.vq_strides[0] // s)) for s in cfg.vq_strides]
    with torch.inference_mode():
        expected = model.decode(codes)[0, 0].numpy()
    trim = expected.shape[0] - 1234
    rng = np.random.default_rng(3)
    for block_seconds in [0.01, float(rng.uniform(0.1, 0.6)), 100.0]:
        n = decode_file(model, codes, tmp_path / "out.wav", num_samples=trim, subtype="FLOAT",
                        block_seconds=block_seconds, progress=False)
        got, rate = sf.read(str(tmp_path / "out.wav"), dtype="float32")
        assert n == trim and got.shape == (trim,) and rate == cfg.sampling_rate
        np.testing.assert_allclose(got, expected[:trim], atol=1e-5, rtol=0)
    # 16-bit output: the same quantisation of (nearly) the same samples
    decode_file(model, codes, tmp_path / "out16.wav", progress=False)
    save_audio(tmp_path / "ref16.wav", expected, cfg.sampling_rate)
    a = sf.read(str(tmp_path / "out16.wav"), dtype="int16")[0].astype(np.int32)
    b = sf.read(str(tmp_path / "ref16.wav"), dtype="int16")[0].astype(np.int32)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_decode_file_rejects_a_batch(tmp_path, model):
    cfg = model.config
    codes = [torch.zeros(2, 4 * cfg.vq_strides[0] // s, dtype=torch.int64) for s in cfg.vq_strides]
    with pytest.raises(ValueError, match="batch of 1"):
        decode_file(model, codes, tmp_path / "x.wav", progress=False)


# ---- the command line on a long file: memory does not grow with the length ------------------------------

_PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "print(proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.stderr.write(proc.stderr)\n"
)


def _cli_peak_rss_mib(*argv: str) -> float:
    """Run ``snac-stream ARGV`` in a fresh process; its peak resident memory in MiB (Linux: ru_maxrss in KiB)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-c", _PEAK_RSS, sys.executable, "-m", "snac_stream.cli", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    rc, peak_kib = proc.stdout.split()
    assert rc == "0", proc.stderr
    return int(peak_kib) / 1024


def test_cli_long_file_in_bounded_memory(tmp_path):
    """Encode and decode 4 minutes and 30 s of 22.05 kHz audio: the long file's peak memory is the short one's
    (plus a margin for the codes it holds), far below what whole-signal activations would need."""
    torch.manual_seed(0)
    ckpt = SNAC.from_config(TINY["24khz"]).save_pretrained(tmp_path / "ckpt")
    peaks = {}
    for name, seconds in (("short", 30.0), ("long", 240.0)):
        _noise_file(tmp_path / f"{name}.wav", seconds, 22050, 1, seed=11)
        enc = _cli_peak_rss_mib("encode", str(tmp_path / f"{name}.wav"), str(tmp_path / f"{name}.npz"),
                                "--model", str(ckpt), "--device", "cpu", "-q")
        dec = _cli_peak_rss_mib("decode", str(tmp_path / f"{name}.npz"), str(tmp_path / f"{name}_out.wav"),
                                "--device", "cpu", "-q")
        info = sf.info(str(tmp_path / f"{name}_out.wav"))
        assert info.frames == round(seconds * 24000) and info.samplerate == 24000
        peaks[name] = (enc, dec)
    for i, what in enumerate(("encode", "decode")):
        short, long = peaks["short"][i], peaks["long"][i]
        assert long < short + 100, f"{what}: peak RSS {long:.0f} MiB for 4 min vs {short:.0f} MiB for 30 s"
        assert long < 1536, f"{what}: peak RSS {long:.0f} MiB"


def test_unreadable_file_error_reads_cleanly(tmp_path):
    """libsndfile's reason ends with a period of its own: the message must not stutter ('..')."""
    (tmp_path / "text.wav").write_text("not audio at all")
    with pytest.raises(ValueError) as info:
        load_audio(tmp_path / "text.wav", 24000)
    message = str(info.value)
    assert "Supported formats: wav, flac, ogg" in message and ".." not in message, message
