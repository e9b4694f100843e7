"""The bundled ``mini`` model on real (espeak-ng) speech: it loads offline by name, it is intelligible after a
roundtrip (a floor that fails when a kernel or an op breaks the codec while staying consistent with itself),
and streaming equals offline for random chunkings on speech with silences, where near-ties between codebook
entries are likeliest."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from pystoi import stoi

from snac_stream import SNAC
from snac_stream.audio import load_audio, to_tensor

STOI_FLOOR = 0.80  # the held-out figure of docs/mini_model.md is 0.85; random weights give about 0.4


@pytest.fixture(scope="module")
def mini() -> SNAC:
    return SNAC.from_pretrained("mini")


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """Two sentences with a second of silence between them, at 24 kHz."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.fail("espeak-ng is not installed; install it with `apt-get install -y espeak-ng`")
    parts = []
    for i, (text, voice) in enumerate([("Streaming codecs keep every sample in order.", "en-us"),
                                       ("The quick brown fox jumps over the lazy dog.", "en+f3")]):
        path = tmp_path_factory.mktemp("speech") / f"s{i}.wav"
        subprocess.run([espeak, "-v", voice, "-w", str(path), text], check=True, capture_output=True, timeout=60)
        parts.append(load_audio(path, 24000)[0])
    silence = np.zeros(24000, np.float32)
    return np.concatenate([silence[:4000], parts[0], silence, parts[1], silence[:7000]])


def test_loads_by_name_without_the_hub(tmp_path):
    """In a fresh process with the hub switched off and an empty cache."""
    code = "from snac_stream import SNAC; m = SNAC.from_pretrained('mini'); print(m.name, m.sampling_rate)"
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["mini", "24000"]


def test_roundtrip_is_intelligible(mini, speech):
    with torch.inference_mode():
        out = mini.decode(mini.encode(to_tensor(speech)))[0, 0, : speech.shape[0]].numpy()
    score = stoi(speech, out, 24000)
    assert score >= STOI_FLOOR, f"roundtrip STOI {score:.3f} < {STOI_FLOOR}"


def test_streaming_equals_offline_on_speech(mini, speech):
    audio = to_tensor(speech)
    with torch.inference_mode():
        expected = mini.encode(audio)
        reference = mini.decode(expected)
    rng = np.random.default_rng(0)
    for trial in range(3):
        enc = mini.streaming_encoder()
        pieces, start = [], 0
        while start < audio.shape[-1]:
            n = int(rng.choice([1, 7, 480, 2048, int(rng.integers(1, 9000))]))
            pieces.append(enc.push(audio[..., start: start + n]))
            start += n
        pieces.append(enc.flush())
        codes = [torch.cat(level, dim=-1) for level in zip(*pieces)]
        for level, (a, b) in enumerate(zip(expected, codes)):
            assert torch.equal(a, b), f"trial {trial}: level {level} differs from offline encode"
        dec = mini.streaming_decoder()
        frames, out, k = codes[0].shape[-1], [], 0
        while k < frames:
            n = int(rng.integers(0, 5))
            out.append(dec.push([c[:, k * c.shape[-1] // frames: (k + n) * c.shape[-1] // frames] for c in codes]))
            k += n
        out.append(dec.flush())
        torch.testing.assert_close(torch.cat(out, dim=-1), reference, rtol=0, atol=1e-5)
