"""A new user's first hour: random-weight checkpoints, device listing without devices, paced file mode through
a server, and speech streamed from an LLM server (``play-tokens --llm``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import snac
import soundfile as sf
import torch

from snac_stream import SNAC

from helpers import decode_seeded, max_abs_diff, run_cli, single_error

RATE = 24000


# ---- random-checkpoint ---------------------------------------------------------------------------------
def test_random_checkpoint_loads_here_and_in_reference(tmp_path, capsys) -> None:
    out = tmp_path / "rand"
    rc, err = run_cli(["random-checkpoint", str(out), "--preset", "mini", "--seed", "3"], capsys)
    assert rc == 0, err
    config = json.loads((out / "config.json").read_text())
    state = torch.load(out / "pytorch_model.bin")
    assert any(k.endswith(".weight_g") for k in state) and any(k.endswith(".weight_v") for k in state)
    ref = snac.SNAC(**config).eval()
    ref.load_state_dict(state)  # strict: the reference's own key names
    ours = SNAC.from_pretrained(out, noise_mode="torch")
    gen = torch.Generator().manual_seed(1)
    codes = [torch.randint(0, config["codebook_size"], (1, 4 * s), generator=gen) for s in config["vq_strides"][::-1]]
    assert max_abs_diff(decode_seeded(ours, codes, 7), decode_seeded(ref, codes, 7)) < 1e-5

    # The same seed writes the same files; another seed does not.
    again = tmp_path / "again"
    assert run_cli(["random-checkpoint", str(again), "--preset", "mini", "--seed", "3"], capsys)[0] == 0
    for name in ("config.json", "pytorch_model.bin"):
        assert (out / name).read_bytes() == (again / name).read_bytes()
    other = tmp_path / "other"
    assert run_cli(["random-checkpoint", str(other), "--preset", "mini", "--seed", "4"], capsys)[0] == 0
    assert (other / "pytorch_model.bin").read_bytes() != (out / "pytorch_model.bin").read_bytes()


def test_random_checkpoint_says_noise_and_works_with_encode_decode(tmp_path, capsys) -> None:
    from snac_stream.cli import main

    ckpt = tmp_path / "rand"
    assert main(["random-checkpoint", str(ckpt), "--preset", "24khz"]) == 0
    said = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in said and "noise" in said and "--model mini" in said
    t = np.arange(RATE // 2) / RATE
    sf.write(tmp_path / "in.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), RATE)
    rc, err = run_cli(["encode", str(tmp_path / "in.wav"), str(tmp_path / "c.npz"), "--model", str(ckpt),
                       "--device", "cpu"], capsys)
    assert rc == 0, err
    rc, err = run_cli(["decode", str(tmp_path / "c.npz"), str(tmp_path / "out.wav"), "--device", "cpu"], capsys)
    assert rc == 0, err
    assert sf.info(tmp_path / "out.wav").frames == RATE // 2


def test_random_checkpoint_errors(tmp_path, capsys) -> None:
    rc, err = run_cli(["random-checkpoint", str(tmp_path / "x"), "--preset", "16khz"], capsys)
    assert rc == 2 and "unknown preset '16khz'; use one of 24khz, 32khz, 44khz, mini" in single_error(err)
    rc, err = run_cli(["random-checkpoint", str(tmp_path / "missing" / "x")], capsys)
    assert rc == 2 and "parent directory does not exist" in single_error(err)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    rc, err = run_cli(["random-checkpoint", str(full), "--preset", "mini"], capsys)
    assert rc == 2 and "is not empty; pass --force" in single_error(err)
    assert not (full / "config.json").exists()
    rc, err = run_cli(["random-checkpoint", str(full), "--preset", "mini", "--force"], capsys)
    assert rc == 0, err
    assert (full / "config.json").exists() and (full / "keep.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(["random-checkpoint", str(empty), "--preset", "mini"], capsys)[0] == 0


# ---- live --list-devices without devices ----------------------------------------------------------------
class _FakeSoundDevice:
    """Stands in for the sounddevice module on a machine with ``devices`` (dicts as PortAudio gives them)."""

    def __init__(self, devices) -> None:
        import sounddevice

        self._devices = sounddevice.DeviceList(devices)
        self.default = type("Default", (), {"device": [-1, -1]})()

    def query_devices(self, device=None):
        return self._devices if device is None else self._devices[device]


def _device(name: str, inputs: int, outputs: int) -> dict:
    return {"name": name, "index": 0, "hostapi": 0, "max_input_channels": inputs, "max_output_channels": outputs,
            "default_low_input_latency": 0.01, "default_low_output_latency": 0.01,
            "default_high_input_latency": 0.1, "default_high_output_latency": 0.1, "default_samplerate": 48000.0}


@pytest.mark.parametrize("command", ["live", "play-tokens"])
def test_list_devices_without_devices_says_how_to_get_virtual_ones(command, monkeypatch, capsys) -> None:
    pytest.importorskip("sounddevice")
    from snac_stream import audio_io
    from snac_stream.cli import main

    monkeypatch.setattr(audio_io, "sounddevice", lambda: _FakeSoundDevice([]))
    assert main([command, "--list-devices"]) == 0
    out = capsys.readouterr().out
    assert "no input or output sound devices found" in out
    assert "python tests/virtual_audio.py DIR" in out and "docs/live.md" in out
    # A machine with a speaker but no microphone lists the speaker and says what is missing.
    monkeypatch.setattr(audio_io, "sounddevice", lambda: _FakeSoundDevice([_device("speaker", 0, 2)]))
    assert main([command, "--list-devices"]) == 0
    out = capsys.readouterr().out
    assert "speaker" in out and "no input sound devices found" in out and "output sound" not in out


def test_live_without_devices_is_one_error_with_the_hint(monkeypatch, capsys) -> None:
    pytest.importorskip("sounddevice")
    from snac_stream import audio_io

    monkeypatch.setattr(audio_io, "sounddevice", lambda: _FakeSoundDevice([]))
    rc, err = run_cli(["live", "--model", "24khz", "--device", "cpu"], capsys)  # devices are checked first
    assert rc == 2 and "no input sound devices found" in single_error(err) and "virtual_audio.py" in err
