"""The live demos through a websocket server (``live --server``, ``play-tokens --server``).

A real server on a loopback port runs in a background thread (its own event loop), as ``snac-stream serve``
would in another process; the demos run through the command line in this thread, in file mode, and their
output must equal the offline codec's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import socket
import threading
from typing import Any, Iterator

import numpy as np
import pytest
import soundfile as sf
import torch

from snac_stream import PRESETS, SNAC
from snac_stream.protocol import encode_audio
from snac_stream.remote import RemoteError, WebSocketCodec
from snac_stream.server import ServerOptions, SNACServer
from snac_stream.tokens import OrpheusLayout

from helpers import offline_codec, run_cli, single_error

RATE = 24000
SMALL_24KHZ = dataclasses.replace(PRESETS["24khz"], encoder_dim=8, decoder_dim=64)


@pytest.fixture(scope="module")
def model() -> SNAC:
    torch.manual_seed(5)
    return SNAC.from_config(SMALL_24KHZ).eval()


@contextlib.contextmanager
def running_server(model: SNAC, **options: Any) -> Iterator[SNACServer]:
    """A server on an ephemeral loopback port, served from its own thread until the block ends."""
    started = threading.Event()
    box: dict = {}

    async def serve() -> None:
        box["stop"] = asyncio.Event()
        try:
            async with SNACServer(model, ServerOptions(port=0, threads=1, **options)) as server:
                box["server"] = server
                started.set()
                await box["stop"].wait()
        finally:
            started.set()  # a failed start must not leave the test waiting

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(120) and "server" in box, "the server did not start"
    try:
        yield box["server"]
    finally:
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join(60)
        loop.close()


@pytest.fixture(scope="module")
def server(model: SNAC) -> Iterator[SNACServer]:
    with running_server(model, max_sessions=4) as server:
        yield server


def clip(seconds: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    return (0.2 * np.sin(2 * np.pi * (200 * t + 400 * t**2)) + 0.1 * rng.standard_normal(t.size)).astype(np.float32)





def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- exactness -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [480, 2049])
def test_live_file_mode_through_server_equals_offline(block, model, server, tmp_path, capsys) -> None:
    speech = clip(1.2, seed=block)
    sf.write(tmp_path / "in.wav", speech, RATE, subtype="FLOAT")
    rc, err = run_cli(["live", "--server", server.url, "--input", str(tmp_path / "in.wav"),
                       "--output", str(tmp_path / "out.wav"), "--block", str(block)], capsys)
    assert rc == 0, err
    out, rate = sf.read(tmp_path / "out.wav", dtype="float32")
    assert rate == RATE and out.shape == speech.shape
    assert np.abs(out - offline_codec(model, speech)).max() < 1e-5
    assert f"server  {server.url}" in err
    # 1.2 s pads to 15 coarse frames of 7 tokens: the server's token frames are counted.
    summary = re.search(r"summary 1\.20 s in, 28800 samples out; .* ([\d.]+) tokens/s", err)
    assert summary and float(summary.group(1)) == pytest.approx(105 / 1.2, abs=0.05), err


def test_codec_transport_pcm16_is_within_one_lsb(model, server) -> None:
    speech = clip(0.9, seed=7)
    heard = np.frombuffer(encode_audio(speech, "pcm16"), "<i2").astype(np.float32) / 32768  # what the server sees
    codec = WebSocketCodec(server.url, sample_format="pcm16")
    assert codec.sample_rate == RATE and codec.latency_samples == server.latency["roundtrip"]
    parts, tokens = [], 0
    for start in range(0, speech.size, 700):
        out, n = codec.push(speech[start : start + 700])
        parts.append(out)
        tokens += n
    out, n = codec.flush()
    got = np.concatenate(parts + [out])
    assert got.size == speech.size and tokens + n == 11 * 7  # 0.9 s pads to 11 coarse frames
    assert np.abs(got - offline_codec(model, heard)).max() <= 1 / 32768 + 1e-6


def test_play_tokens_through_server_equals_offline(model, server, tmp_path, capsys) -> None:
    gen = torch.Generator().manual_seed(3)
    codes = [torch.randint(0, 4096, (1, 6 * r), generator=gen) for r in (1, 2, 4)]
    path = tmp_path / "ids.txt"
    path.write_text(", ".join(map(str, OrpheusLayout().to_flat(codes)[0].tolist())))
    rc, err = run_cli(["play-tokens", str(path), "--server", server.url, "--output", str(tmp_path / "o.wav")],
                      capsys)
    assert rc == 0, err
    got, _ = sf.read(tmp_path / "o.wav", dtype="float32")
    with torch.inference_mode():
        expected = model.decode(codes)[0, 0].numpy()
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-5


# ---- errors ------------------------------------------------------------------------------------------------
def test_unreachable_server_is_one_error_line(tmp_path, capsys) -> None:
    url = f"ws://127.0.0.1:{free_port()}"
    sf.write(tmp_path / "in.wav", clip(0.2, 0), RATE, subtype="FLOAT")
    rc, err = run_cli(["live", "--server", url, "--input", str(tmp_path / "in.wav"),
                       "--output", str(tmp_path / "o.wav")], capsys)
    assert rc == 2 and f"cannot open a session on server {url}" in single_error(err)
    (tmp_path / "t.txt").write_text("1 2 3")
    rc, err = run_cli(["play-tokens", str(tmp_path / "t.txt"), "--server", url, "--output", str(tmp_path / "o.wav")],
                      capsys)
    assert rc == 2 and f"cannot open a session on server {url}" in single_error(err)
    assert not (tmp_path / "o.wav").exists()


def test_refusals_name_the_protocol_error(model, tmp_path, capsys) -> None:
    sf.write(tmp_path / "in.wav", clip(0.2, 0), RATE, subtype="FLOAT")
    argv = ["live", "--input", str(tmp_path / "in.wav"), "--output", str(tmp_path / "o.wav")]
    with running_server(model, max_sessions=1, token="sesame") as server:
        rc, err = run_cli(argv + ["--server", server.url, "--token", "wrong"], capsys)
        assert rc == 2 and "unauthorized" in single_error(err)
        holder = WebSocketCodec(server.url, token="sesame")  # takes the only session
        try:
            rc, err = run_cli(argv + ["--server", server.url, "--token", "sesame"], capsys)
            assert rc == 2 and "server_full" in single_error(err)
        finally:
            holder.close()
    with pytest.raises(RemoteError, match="server_full|unauthorized|cannot open"):
        WebSocketCodec(f"ws://127.0.0.1:{free_port()}")


def test_tokens_the_server_rejects_are_one_error_line(server, tmp_path, capsys) -> None:
    frame = "".join(f"<custom_token_{10 + p * 4096}>" for p in range(7))
    path = tmp_path / "bad.txt"
    path.write_text(frame + frame[:36])  # ends inside a coarse frame
    rc, err = run_cli(["play-tokens", str(path), "--server", server.url, "--output", str(tmp_path / "o.wav")],
                      capsys)
    assert rc == 2 and "inside a coarse frame" in single_error(err)
    rc, err = run_cli(["play-tokens", str(path), "--server", server.url, "--lookahead", "0"], capsys)
    assert rc == 2 and "--lookahead" in single_error(err)


# ---- pace of file mode -------------------------------------------------------------------------------------
def test_live_file_mode_through_server_is_paced_to_real_time(model, server, tmp_path, capsys) -> None:
    """By default a file goes in at its real pace, as a microphone's audio would: the run takes the file's
    duration, the delays are latency, and the output still equals the offline codec."""
    import time

    speech = clip(1.2, seed=11)
    sf.write(tmp_path / "in.wav", speech, RATE, subtype="FLOAT")
    start = time.monotonic()
    rc, err = run_cli(["live", "--server", server.url, "--input", str(tmp_path / "in.wav"),
                       "--output", str(tmp_path / "out.wav")], capsys)
    assert rc == 0, err
    assert time.monotonic() - start >= 0.8 * 1.2, err
    out, _ = sf.read(tmp_path / "out.wav", dtype="float32")
    assert np.abs(out - offline_codec(model, speech)).max() < 1e-5
    assert "real-time pace" in err and re.search(r"latency median \d+ ms", err) and "queueing" not in err, err


def test_live_file_mode_as_fast_as_possible_reports_queueing_not_alarms(model, tmp_path, capsys) -> None:
    """--as-fast-as-possible: the figures are labelled queueing, and the server's 'behind' warnings (certain
    here: any lag over 1 ms is reported) are a note, not an alarm."""
    speech = clip(1.2, seed=12)
    sf.write(tmp_path / "in.wav", speech, RATE, subtype="FLOAT")
    with running_server(model, max_sessions=2, behind_warning_s=0.001) as server:
        rc, err = run_cli(["live", "--server", server.url, "--input", str(tmp_path / "in.wav"),
                           "--output", str(tmp_path / "out.wav"), "--as-fast-as-possible"], capsys)
    assert rc == 0, err
    out, _ = sf.read(tmp_path / "out.wav", dtype="float32")
    assert np.abs(out - offline_codec(model, speech)).max() < 1e-5
    assert re.search(r"queueing median \d+ ms .*not latency", err), err
    assert "latency median" not in err and "behind" not in err and "warning" not in err, err
    assert "as expected for a file sent faster than real time" in err, err
    # The flag paces a file; the microphone is real time already.
    rc, err = run_cli(["live", "--server", server.url, "--output", str(tmp_path / "o.wav"),
                       "--as-fast-as-possible"], capsys)
    assert rc == 2 and "microphone is real time already" in single_error(err)
