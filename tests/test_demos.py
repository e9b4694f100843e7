"""demos/stream_file.py end to end on a small random-weight checkpoint, and with its default (bundled) model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import soundfile as sf

from snac_stream import PRESETS, SNAC

DEMO = Path(__file__).resolve().parents[1] / "demos" / "stream_file.py"


def _load_demo():
    spec = importlib.util.spec_from_file_location("stream_file_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stream_file_demo(tmp_path: Path, capsys) -> None:
    config = {**PRESETS["24khz"].to_dict(), "encoder_dim": 8, "decoder_dim": 64}
    SNAC(**config).save_pretrained(tmp_path / "ckpt")
    t = np.arange(int(1.3 * 16000)) / 16000
    sf.write(tmp_path / "in.wav", 0.3 * np.sin(2 * np.pi * 220 * t), 16000)  # resampled to 24 kHz by the demo
    demo = _load_demo()
    rc = demo.main([str(tmp_path / "in.wav"), str(tmp_path / "out.wav"), "--model", str(tmp_path / "ckpt"),
                    "--chunk", "333"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "streamed codes equal offline encode" in out
    info = sf.info(tmp_path / "out.wav")
    assert info.samplerate == 24000 and info.frames == int(1.3 * 24000)
    assert demo.main([str(tmp_path / "missing.wav"), str(tmp_path / "o.wav"), "--model", str(tmp_path / "ckpt")]) == 2
    assert "error: " in capsys.readouterr().err


def test_stream_file_demo_defaults_to_the_bundled_model(tmp_path: Path, capsys, monkeypatch) -> None:
    """Without --model the demo runs the bundled ``mini`` model, with the hub switched off."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = np.arange(int(0.8 * 24000)) / 24000
    sf.write(tmp_path / "in.wav", 0.3 * np.sin(2 * np.pi * 220 * t), 24000)
    rc = _load_demo().main([str(tmp_path / "in.wav"), str(tmp_path / "out.wav")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "streamed codes equal offline encode" in out
    assert sf.info(tmp_path / "out.wav").frames == t.size
