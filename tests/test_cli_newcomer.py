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
    import sounddevice  # noqa: F401  (test extra: a missing install fails, never skips)
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
    import sounddevice  # noqa: F401  (test extra: a missing install fails, never skips)
    from snac_stream import audio_io

    monkeypatch.setattr(audio_io, "sounddevice", lambda: _FakeSoundDevice([]))
    rc, err = run_cli(["live", "--model", "24khz", "--device", "cpu"], capsys)  # devices are checked first
    assert rc == 2 and "no input sound devices found" in single_error(err) and "virtual_audio.py" in err


# ---- play-tokens --llm -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    import dataclasses

    from snac_stream import PRESETS

    torch.manual_seed(0)
    return SNAC.from_config(dataclasses.replace(PRESETS["24khz"], encoder_dim=16, decoder_dim=64)).save_pretrained(
        tmp_path_factory.mktemp("tiny24"))


def _llm_run(script, argv, capsys):
    """Serve ``script`` from a local SSE server (vLLM's wire format) while ``snac-stream`` runs ``argv`` (with
    ``--llm URL`` appended) in a worker thread: (exit status, stderr, the server's request records)."""
    import asyncio

    from sse_server import SSEServer

    from snac_stream.cli import main

    async def scenario():
        async with SSEServer(script) as server:
            rc = await asyncio.to_thread(main, argv + ["--llm", server.url])
            return rc, server.records

    rc, records = asyncio.run(scenario())
    return rc, capsys.readouterr().err, records


def _served_codes(seed: int, frames: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 4096, (1, frames * r), generator=gen) for r in (1, 2, 4)]


def test_play_tokens_from_an_llm_server_equals_offline_decode(tiny_ckpt, tmp_path, capsys) -> None:
    from sse_server import Script

    from snac_stream.tokens import OrpheusLayout, format_custom_tokens

    codes = _served_codes(3, frames=6)
    text = "<custom_token_1>" + format_custom_tokens(OrpheusLayout().to_flat(codes)[0].tolist()) + "<|eot_id|>"
    pieces = [text[i : i + 13] for i in range(0, len(text), 13)]  # split inside tokens
    out = tmp_path / "llm.wav"
    rc, err, records = _llm_run(
        Script(pieces, pause_s=0.002, first_pause_s=0.05),
        ["play-tokens", "--model", str(tiny_ckpt), "--output", str(out), "--llm-model", "orpheus-test",
         "--prompt", "Hello there.", "--voice", "leo", "--temperature", "0.4", "--top-p", "0.9",
         "--max-tokens", "321", "--device", "cpu"], capsys)
    assert rc == 0, err
    got, rate = sf.read(out, dtype="float32")
    with torch.inference_mode():
        expected = SNAC.from_pretrained(tiny_ckpt).decode(codes)[0, 0].numpy()
    assert rate == RATE and got.shape == expected.shape and np.abs(got - expected).max() < 1e-5
    first = re.search(r"time to first token (\d+) ms, to first audio (\d+) ms", err)
    assert first and 50 <= int(first.group(1)) <= int(first.group(2)), err
    assert re.search(r"summary 42 audio tokens -> \d+ samples .*time to first token \d+ ms, time to first audio "
                     r"\d+ ms", err), err
    body = records[0].body
    assert body["model"] == "orpheus-test" and body["prompt"].startswith("<custom_token_3><|begin_of_text|>leo: Hello")
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.4, 0.9, 321)


def test_play_tokens_llm_errors_keep_the_audio(tiny_ckpt, tmp_path, capsys) -> None:
    from sse_server import Script

    from snac_stream.tokens import OrpheusLayout, format_custom_tokens

    argv = ["play-tokens", "--model", str(tiny_ckpt), "--llm-model", "m", "--prompt", "Hi.", "--device", "cpu"]
    # HTTP 500 at the start: one error line, nothing written.
    out = tmp_path / "none.wav"
    rc, err, _ = _llm_run(Script([], status=500, error_body='{"message": "model overloaded"}'),
                          argv + ["--output", str(out)], capsys)
    assert rc == 2 and "HTTP 500" in single_error(err) and "model overloaded" in err
    assert not out.exists()
    # The completion ends inside the fifth frame: the 4 whole frames' audio is written, then one error line.
    codes = _served_codes(4, frames=6)
    ids = OrpheusLayout().to_flat(codes)[0].tolist()
    pieces = [format_custom_tokens(ids[i : i + 7]) for i in range(0, 28, 7)] + [format_custom_tokens(ids[28:31])]
    out = tmp_path / "part.wav"
    rc, err, _ = _llm_run(Script(pieces), argv + ["--output", str(out)], capsys)
    assert rc == 2 and "ended inside a coarse frame: 3 of its 7 tokens" in single_error(err)
    got, _ = sf.read(out, dtype="float32")
    with torch.inference_mode():
        expected = SNAC.from_pretrained(tiny_ckpt).decode([c[:, : 4 * r] for c, r in zip(codes, (1, 2, 4))])
    assert np.abs(got - expected[0, 0].numpy()).max() < 1e-5
    assert "s of audio before the error" in err


def test_play_tokens_llm_through_a_server_writes_the_file(tiny_ckpt, tmp_path, capsys) -> None:
    """``play-tokens --llm URL --server WS_URL``: the server calls the LLM and decodes; the file equals offline
    decode; the key goes to the LLM through the server; refusals and mid-stream failures are one error line."""
    import asyncio

    from sse_server import Script, SSEServer

    from snac_stream.cli import main
    from snac_stream.server import ServerOptions, SNACServer
    from snac_stream.tokens import OrpheusLayout, format_custom_tokens

    codes = _served_codes(5, frames=6)
    ids = OrpheusLayout().to_flat(codes)[0].tolist()
    text = "<custom_token_1>" + format_custom_tokens(ids) + "<|eot_id|>"
    whole = Script([text[i : i + 11] for i in range(0, len(text), 11)], pause_s=0.002, first_pause_s=0.05)
    cut = Script([format_custom_tokens(ids[i : i + 7]) for i in range(0, 28, 7)] + [format_custom_tokens(ids[28:30])])
    model = SNAC.from_pretrained(tiny_ckpt)
    runs = []

    async def scenario():
        async with SSEServer(whole) as llm:
            options = ServerOptions(port=0, threads=1, web=False, allow_llm=[llm.url])
            async with SNACServer(model, options) as snac:
                for script, url, name, extra in ((whole, llm.url, "llm.wav", ["--llm-api-key", "sk-cli-key"]),
                                                 (whole, "http://127.0.0.1:9", "refused.wav", []),
                                                 (cut, llm.url, "cut.wav", [])):
                    llm.script = script
                    argv = ["play-tokens", "--llm", url, "--server", snac.url, "--llm-model", "orpheus-test",
                            "--prompt", "Hello there.", "--voice", "leo", "--output", str(tmp_path / name), *extra]
                    rc = await asyncio.to_thread(main, argv)
                    runs.append((rc, capsys.readouterr().err))
            return llm.records

    records = asyncio.run(scenario())
    with torch.inference_mode():
        expected = model.decode(codes)[0, 0].numpy()
        expected_cut = model.decode([c[:, : 4 * r] for c, r in zip(codes, (1, 2, 4))])[0, 0].numpy()
    (rc, err), (refused_rc, refused_err), (cut_rc, cut_err) = runs
    assert rc == 0, err
    got, rate = sf.read(tmp_path / "llm.wav", dtype="float32")
    assert rate == RATE and got.shape == expected.shape and np.abs(got - expected).max() < 1e-5
    first = re.search(r"time to first token (\d+) ms \(at the server, from its request\), to first audio (\d+) ms", err)
    assert first and 50 <= int(first.group(1)) <= int(first.group(2)), err
    assert re.search(r"summary 42 audio tokens -> 12288 samples .*time to first token \d+ ms", err), err
    assert records[0].body["prompt"].startswith("<custom_token_3><|begin_of_text|>leo: Hello")
    assert records[0].headers["Authorization"] == "Bearer sk-cli-key" and "sk-cli-key" not in err
    assert refused_rc == 2 and "llm_not_allowed" in single_error(refused_err)
    assert not (tmp_path / "refused.wav").exists() and len(records) == 2  # the refused one never reached the LLM
    assert cut_rc == 2 and "llm_error" in single_error(cut_err) and "2 of its 7 tokens" in cut_err
    got, _ = sf.read(tmp_path / "cut.wav", dtype="float32")
    assert np.abs(got - expected_cut).max() < 1e-5 and "s of audio before the error" in cut_err


def test_play_tokens_llm_usage_errors(tiny_ckpt, tmp_path, capsys) -> None:
    out = ["--output", str(tmp_path / "o.wav")]
    for argv, needle in [
        (["play-tokens", "t.txt", "--llm", "http://127.0.0.1:9", "--llm-model", "m", "--prompt", "x"],
         "drop the token source"),
        (["play-tokens", "--llm", "http://127.0.0.1:9", "--prompt", "x"], "needs --llm-model"),
        (["play-tokens", "--llm", "http://127.0.0.1:9", "--llm-model", "m"], "needs --prompt"),
        (["play-tokens", "--llm", "ftp://x", "--llm-model", "m", "--prompt", "x"], "must be an http(s):// URL"),
        (["play-tokens", "--llm", "http://127.0.0.1:9", "--llm-model", "m", "--prompt", "x", "--voice", "bob"],
         "unknown voice 'bob'"),
        (["play-tokens", "--llm", "http://127.0.0.1:9", "--llm-model", "m", "--prompt", "x", "--prompt-format",
          "nope"], "unknown prompt format"),
        (["play-tokens", "-", "--prompt", "x"], "--prompt goes with --llm URL"),
    ]:
        rc, err = run_cli(argv + out, capsys)
        assert rc == 2 and needle in single_error(err), (argv, err)
    # Unreachable endpoint: one line after the model loaded.
    rc, err = run_cli(["play-tokens", "--llm", "http://127.0.0.1:9", "--llm-model", "m", "--prompt", "x",
                       "--model", str(tiny_ckpt), "--device", "cpu"] + out, capsys)
    assert rc == 2 and "cannot connect" in single_error(err)


# ---- --model help ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["encode", "decode", "live", "play-tokens"])
def test_model_help_names_the_bundled_mini_model(command, capsys) -> None:
    from snac_stream.cli import main

    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "24khz, 32khz, 44khz" in text and "mini (the bundled small 24 kHz speech model" in text
