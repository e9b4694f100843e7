"""The browser client, as a user runs it: ``snac-stream serve``, then the page in (headless) Chromium.

Chromium's fake microphone plays a WAV file of espeak-ng speech; the page streams it through a roundtrip session
and plays the decoded audio (into Chromium's null output: no sound card needed). The page keeps its state in
``window.snac``, read here over the DevTools protocol (tests/chromium.py). The server runs the bundled speech
model ``mini``, so what the page plays is speech (checked for intelligibility, besides equality with the offline
codec); tests of failures run a small random-weight model in process. With ``format=opus`` the page codes Opus
itself (WebCodecs, WebM both ways); its audio is checked against libopus and the offline codec. Skipped only
when no Chromium is installed (CI installs it).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import queue
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from chromium import Chromium, find_chromium
from helpers import SMALL_CONFIGS, espeak_speech
from pystoi import stoi
from test_server_formats import OPUS_PARITY_DB, pyav_decode, snr_db
from websockets.sync.client import connect

from snac_stream import SNAC
from snac_stream.formats import InputDecoder, OutputEncoder
from snac_stream.server import ServerOptions, SNACServer, web

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed "
                                "(apt-get install -y chromium chromium-driver)")

RATE = 24000
MIC_RATE = 48000  # the usual device rate: the browser resamples the fake microphone to the model's rate
LOOP_SECONDS = 2  # the fake microphone loops its file
SENTENCE = "Every sample arrives in order."  # espeak-ng: 1.83 s
SECONDS = 3
PCM16_TOL = 1 / 32768 + 1e-5  # the page receives PCM16: one quantisation step plus float rounding
# STOI of what the page received against what it sent. mini's offline roundtrip of the sentence scores 0.82;
# random weights (the in-process model of the failure tests) about 0.4, checked below to fail the floor.
STOI_FLOOR = 0.75
# format=opus: WebM both ways at 48 kHz and OPUS_KBPS (the page's default). Measured over 6 runs: STOI 0.825-0.836
# of what the page played against what it captured, 0.826-0.841 for the offline (PCM) roundtrip of the same input;
# 3.2-3.5 kB of audio a second each way (24 kbps is 3 kB/s; WebM framing and Opus's variable rate add the rest).
OPUS_RATE = 48000
OPUS_KBPS = 24
OPUS_STOI_LOSS = 0.03  # STOI the Opus path may lose against the offline roundtrip of what the server decoded
OPUS_BYTES_PER_S = 4500  # audio bytes a second, each way (PCM16 at the model's rate: 48 000)
OPUS_CAPTURE_CHUNK = 1024  # samples a capture message holds at 48 kHz (whole render quanta of about 20 ms)


def speech_loop(directory: Path) -> np.ndarray:
    """``SENTENCE`` spoken by espeak-ng, padded with silence to LOOP_SECONDS, at MIC_RATE."""
    speech = espeak_speech(SENTENCE, MIC_RATE, directory)[: LOOP_SECONDS * MIC_RATE]
    return np.concatenate([speech, np.zeros(LOOP_SECONDS * MIC_RATE - speech.size, np.float32)])


def speech_clip(path: Path) -> Path:
    """The fake microphone's file: ``speech_loop`` as a 16-bit WAV."""
    sf.write(path, speech_loop(path.parent), MIC_RATE, subtype="PCM_16")
    return path


def ncc_peak(signal: np.ndarray, template: np.ndarray) -> float:
    """Peak of the normalised cross-correlation of ``template`` inside the longer ``signal`` (1.0: a copy)."""
    signal, template = signal.astype(np.float64), template.astype(np.float64)
    n = 1 << int(np.ceil(np.log2(signal.size + template.size)))
    corr = np.fft.irfft(np.fft.rfft(signal, n) * np.conj(np.fft.rfft(template, n)), n)[: signal.size - template.size + 1]
    energy = np.concatenate([[0.0], np.cumsum(signal**2)])
    window = np.sqrt(np.maximum(energy[template.size :] - energy[: -template.size], 1e-12))
    return float(np.max(corr / window / np.sqrt(template @ template)))


def libopus_decode(stream: bytes) -> np.ndarray:
    """A WebM Opus stream demuxed by FFmpeg and decoded by libopus (both through PyAV), float at 48 kHz, pre-skip
    and DiscardPadding trimmed. libopus is what Chromium's WebCodecs decodes with; FFmpeg's own Opus decoder
    (``pyav_decode``) differs from it by far more than rounding (18 dB SNR and 2 samples of delay on this speech)."""
    import av

    with av.open(io.BytesIO(stream)) as container:
        audio = container.streams.audio[0]
        decoder = av.CodecContext.create("libopus", "r")
        decoder.extradata = audio.codec_context.extradata
        decoder.open()
        frames = [frame for packet in container.demux(audio) if packet.size for frame in decoder.decode(packet)]
        frames += decoder.decode(None)
    pcm = np.concatenate([frame.to_ndarray().reshape(-1) for frame in frames])
    assert pcm.dtype == np.int16  # libopus through PyAV: 16-bit samples
    return pcm.astype(np.float32) / 32768


class ServeProcess:
    """``snac-stream serve`` in a subprocess on a free port; ``page`` is the URL it prints."""

    def __init__(self, *args: str):
        code = "import sys; from snac_stream.cli import main; sys.exit(main(sys.argv[1:]))"
        self.process = subprocess.Popen([sys.executable, "-c", code, "serve", "--port", "0", "--device", "cpu", *args],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.log: list = []
        # Drain stderr (the server logs each session) so the pipe never fills.
        threading.Thread(target=self._read, daemon=True).start()
        self.page = self._wait_url(timeout_s=120)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put("")

    def _wait_url(self, timeout_s: float) -> str:
        while True:
            try:
                line = self.lines.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"serve printed no page URL; output: {''.join(self.log)}") from None
            if not line:
                raise RuntimeError(f"serve exited: {''.join(self.log)}")
            match = re.search(r"browser client .*: (http://\S+)", line)
            if match:
                return match.group(1)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


@pytest.fixture(scope="module")
def served() -> Iterator[ServeProcess]:
    # One slot, so the server-full test can take it.
    server = ServeProcess("--model", "mini", "--max-sessions", "1")
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    with Chromium(speech_clip(tmp_path_factory.mktemp("audio") / "speech.wav")) as chromium:
        yield chromium


def page_state(page: Any) -> Dict[str, Any]:
    return json.loads(page.evaluate(
        "JSON.stringify({state: snac.state, error: snac.error, ready: snac.ready, latency: snac.latency, "
        "sent: snac.sentSamples, received: snac.receivedSamples, tokens: snac.receivedTokens, "
        "outOfOrder: snac.outOfOrder, finalFrames: snac.finalFrames, underruns: snac.underruns, done: snac.done, "
        "e2eText: document.getElementById('e2e').textContent, "
        "errorText: document.getElementById('error').innerText, "
        "errorShown: getComputedStyle(document.getElementById('error')).display !== 'none'})"))


def finished(page: Any, timeout_s: float = 60) -> Dict[str, Any]:
    page.wait_for("window.snac && (snac.state === 'done' || snac.state === 'error')", timeout_s)
    return page_state(page)


# ---- the page over HTTP ---------------------------------------------------------------------------------------
def get(url: str) -> tuple:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def test_serve_prints_the_page_url_and_serves_page_scripts_and_config(served: ServeProcess) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", served.page)
    status, headers, body = get(served.page)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'<script src="app.js"></script>' in body and b"https://" not in body  # no external assets
    for name in ("app.js", "worklet.js"):
        status, headers, body = get(served.page + name)
        assert status == 200 and headers["Content-Type"].startswith("text/javascript") and len(body) > 1000
        assert b"https://" not in body  # no external assets
    status, _, body = get(served.page + "config.json?origin=http%3A%2F%2Flocalhost%3A9")
    config = json.loads(body)
    assert status == 200 and config["sample_rate"] == RATE and config["origin_allowed"] is True
    assert config["algorithmic_latency_samples"]["roundtrip"] > 0 and config["max_sessions"] == 1
    _, _, body = get(served.page + "config.json?origin=https%3A%2F%2Fevil.example")
    assert json.loads(body)["origin_allowed"] is False
    assert get(served.page + "nope.js")[0] == 404


def test_web_off_leaves_only_the_websocket() -> None:
    torch.manual_seed(0)
    model = SNAC(**SMALL_CONFIGS["24k_like"]).eval()

    async def run() -> int:
        async with SNACServer(model, ServerOptions(port=0, web=False)) as server:
            return await asyncio.to_thread(lambda: get(web.page_url(server))[0])

    assert asyncio.run(run()) == 426  # websockets' "Upgrade Required"


# ---- streaming ------------------------------------------------------------------------------------------------
def test_page_streams_the_mic_through_the_codec_and_reports_sane_latency(served: ServeProcess, browser: Chromium,
                                                                         tmp_path: Path) -> None:
    """The fake microphone's espeak-ng speech, through mini on the server: the page receives the offline
    roundtrip of what it sent, and it is intelligible: STOI >= STOI_FLOOR against what was sent, to which it is
    aligned (roundtrip output is trimmed to the input; measured: 0.83), while random weights score about 0.4."""
    page = browser.open(served.page + f"?autostart=1&seconds={SECONDS}&record=1")
    state = finished(page)
    assert state["state"] == "done", state
    ready, latency = state["ready"], state["latency"]
    n = SECONDS * RATE
    assert state["sent"] == n and state["received"] == n  # roundtrip output is trimmed to the input
    assert state["outOfOrder"] == 0 and state["finalFrames"] >= 1
    assert state["done"] == {"type": "done", "input_items": n, "output_samples": n, "output_tokens": state["tokens"]}

    sent = np.frombuffer(base64.b64decode(page.evaluate("snac.sentBase64()")), "<i2").astype(np.float32) / 32768
    received = np.frombuffer(base64.b64decode(page.evaluate("snac.receivedBase64()")), "<i2").astype(np.float32)
    received /= 32768
    assert sent.size == n and received.size == n
    # The fake mic played the looping speech, resampled by the browser to the model's rate.
    loop = espeak_speech(SENTENCE, RATE, tmp_path)[: LOOP_SECONDS * RATE]
    loop = np.concatenate([loop, np.zeros(LOOP_SECONDS * RATE - loop.size, np.float32)])
    # The fake microphone's loop is not seamless (its period read 2 s + 3 ms here), so the speech is looked for
    # in 1 s windows, 0.5 s apart: the loop's wraps are 2 s apart, so at least one window holds none.
    starts = range(RATE // 2, SECONDS * RATE - RATE + 1, RATE // 2)
    heard = max(ncc_peak(np.tile(loop, 3), sent[start : start + RATE]) for start in starts)
    assert heard > 0.95, f"the speech is not in what the page sent (correlation {heard:.4f})"
    assert np.sqrt(np.mean(sent[RATE // 2:] ** 2)) > 0.02
    # What the page received is the codec's offline roundtrip of what it sent.
    model = SNAC.from_pretrained("mini")
    with torch.inference_mode():
        codes = model.encode(torch.from_numpy(sent).view(1, 1, -1))
        expected = model.decode(codes)[0, 0, :n].numpy()
    assert state["tokens"] == sum(c.numel() for c in codes)
    assert np.abs(received - expected).max() <= PCM16_TOL
    assert np.sqrt(np.mean(received ** 2)) > 1e-3  # not silence
    # ... and it is speech.
    intelligibility = stoi(sent, received, RATE)
    assert intelligibility >= STOI_FLOOR, f"STOI {intelligibility:.3f} < {STOI_FLOOR}"
    torch.manual_seed(0)
    noise = SNAC(**SMALL_CONFIGS["24k_like"]).eval()
    with torch.inference_mode():
        random_roundtrip = noise.decode(noise.encode(torch.from_numpy(sent).view(1, 1, -1)))[0, 0, :n].numpy()
    random_stoi = stoi(sent, random_roundtrip, RATE)
    assert random_stoi < STOI_FLOOR, f"random weights reach STOI {random_stoi:.3f}"
    print(f"browser roundtrip: STOI {intelligibility:.3f} (random weights {random_stoi:.3f}), "
          f"speech found at correlation {heard:.4f}")

    # Latency: the announced algorithmic delay is a floor; the rest (server, transport, jitter buffer) is bounded.
    announced = 1000 * ready["algorithmic_latency_samples"] / RATE
    assert latency["announced"] == pytest.approx(announced)
    assert latency["algorithmic"]["max"] >= announced - 1e-6  # chunking only adds to the worst case
    assert latency["total"]["n"] > 10 and latency["endToEnd"]["n"] > 10
    assert announced <= latency["total"]["median"] <= latency["total"]["max"] < announced + 1000
    assert latency["server"]["median"] >= 0 and latency["transport"]["median"] > -5
    assert announced <= latency["graph"]["median"] <= latency["endToEnd"]["median"] < announced + 1500
    assert re.fullmatch(r"\d+ ms", state["e2eText"]) and not state["errorShown"]


def test_page_streams_opus_both_ways_and_reports_its_latency_and_the_bytes_saved(served: ServeProcess,
                                                                                 browser: Chromium) -> None:
    """format=opus: the page codes the mic with WebCodecs' AudioEncoder into WebM (the protocol's ``webm``) and
    decodes the server's WebM with AudioDecoder, at 48 kHz. The server decodes exactly what the page captured
    (its WebM trims the end to the sample); the page plays libopus's decode of the bytes it received (within
    one PCM16 step: PyAV's libopus gives 16-bit samples), as close to the offline roundtrip of the server's
    input as the server's encoder on that offline audio (SNR within OPUS_PARITY_DB), and as intelligible as
    the PCM path (STOI at least STOI_FLOOR and within OPUS_STOI_LOSS of the offline roundtrip's)."""
    status, _, script = get(served.page + "opus.js")
    assert status == 200 and b"https://" not in script  # no external assets
    page = browser.open(served.page + f"?autostart=1&seconds={SECONDS}&record=1&format=opus")
    state = finished(page)
    assert state["state"] == "done", state
    ready, latency = state["ready"], state["latency"]
    assert (ready["input_format"], ready["input_rate"], ready["output_format"], ready["output_rate"],
            ready["opus_bitrate"]) == ("webm", OPUS_RATE, "webm", OPUS_RATE, 1000 * OPUS_KBPS)
    n = SECONDS * OPUS_RATE
    assert state["sent"] == n and state["received"] == n  # captured, and decoded and played, at 48 kHz
    assert state["outOfOrder"] == 0 and state["finalFrames"] >= 1
    shown = json.loads(page.evaluate(
        "JSON.stringify({sentBytes: snac.sentBytes, audioBytes: snac.receivedAudioBytes, wire: snac.wire, "
        "conversion: document.getElementById('conversion').textContent, "
        "encoder: document.getElementById('encoder').textContent, "
        "saved: document.getElementById('saved').textContent})"))
    assert state["done"] == {"type": "done", "input_items": shown["sentBytes"], "output_samples": None,
                             "output_bytes": shown["audioBytes"], "output_tokens": state["tokens"]}

    recorded = {name: base64.b64decode(page.evaluate(f"snac.{name}Base64()"))
                for name in ("sent", "received", "captured", "decoded")}
    captured = np.frombuffer(recorded["captured"], "<f4")
    played = np.frombuffer(recorded["decoded"], "<f4")
    assert captured.size == played.size == n and np.sqrt(np.mean(captured[n // 4:] ** 2)) > 0.02
    # The page's WebM is read by FFmpeg's demuxer too, and holds exactly what was captured.
    assert pyav_decode(recorded["sent"]).size == n
    decoder = InputDecoder("webm", model_rate=RATE)  # the server's own conversion: what the engine got
    heard = np.concatenate([decoder.push(recorded["sent"]), decoder.flush()])
    assert heard.size == SECONDS * RATE
    model = SNAC.from_pretrained("mini")
    with torch.inference_mode():
        codes = model.encode(torch.from_numpy(heard).view(1, 1, -1))
        expected = model.decode(codes)[0, 0, : heard.size].numpy()
    assert state["tokens"] == sum(c.numel() for c in codes)
    # What the page played is libopus's decode of what it received ...
    assert np.abs(played - libopus_decode(recorded["received"])).max() <= PCM16_TOL
    # ... as close to the offline roundtrip as the same encoder's stream of the offline roundtrip ...
    encoder = OutputEncoder("webm", model_rate=RATE, bitrate=1000 * OPUS_KBPS)
    reference = libopus_decode(encoder.push(expected) + encoder.flush())
    target = soxr.resample(expected, RATE, OPUS_RATE, quality="HQ")
    got, same_encoder = snr_db(target, played), snr_db(target, reference)
    assert abs(got - same_encoder) <= OPUS_PARITY_DB, (got, same_encoder)
    # ... and as intelligible as the PCM path.
    opus_stoi, pcm_stoi = stoi(captured, played, OPUS_RATE), stoi(heard, expected, RATE)
    assert opus_stoi >= STOI_FLOOR and opus_stoi >= pcm_stoi - OPUS_STOI_LOSS, (opus_stoi, pcm_stoi)
    print(f"browser Opus roundtrip: STOI {opus_stoi:.3f} (offline PCM roundtrip {pcm_stoi:.3f}), SNR vs offline "
          f"{got:.2f} dB (same encoder {same_encoder:.2f} dB), audio bytes/s up {shown['wire']['up']:.0f} "
          f"down {shown['wire']['down']:.0f}")

    # Bytes: Opus's audio bytes a second each way, and what that saves against PCM16 at the model's rate.
    wire = shown["wire"]
    assert wire["up"] == pytest.approx(shown["sentBytes"] / SECONDS)
    assert wire["down"] == pytest.approx(shown["audioBytes"] / SECONDS)
    assert wire["up"] < OPUS_BYTES_PER_S and wire["down"] < OPUS_BYTES_PER_S and wire["pcm16"] == 2 * RATE
    assert wire["saved"] == pytest.approx(2 * wire["pcm16"] - wire["up"] - wire["down"])
    assert re.fullmatch(r"\d+\.\d kB/s \(9\d %\)", shown["saved"]), shown["saved"]

    # Latency: ready's announced delay includes the server's conversions (shown apart); the page's encoder adds
    # its frame and look-ahead, and a capture message's alignment, on top of the codec's delay.
    announced = 1000 * ready["algorithmic_latency_samples"] / RATE
    conversion = {"input": 1000 * ready["input_latency_samples"] / OPUS_RATE,
                  "output": 1000 * ready["output_latency_samples"] / OPUS_RATE}
    assert latency["announced"] == pytest.approx(announced) and latency["conversion"] == pytest.approx(conversion)
    assert 0 < sum(conversion.values()) < announced
    assert 20 < latency["encoder"] < 30  # a 20 ms frame and libopus's look-ahead (6.5 ms)
    assert re.fullmatch(r"\d+ ms in \+ \d+ ms out", shown["conversion"]) and shown["encoder"] == "27 ms"
    codec = announced - sum(conversion.values())  # the conversions' figures are worst cases; the codec's is reached
    bound = announced + latency["encoder"] + 1000 * OPUS_CAPTURE_CHUNK / OPUS_RATE
    assert codec <= latency["algorithmic"]["max"] <= bound
    assert latency["total"]["n"] > 10 and latency["endToEnd"]["n"] > 10
    assert codec <= latency["total"]["median"] <= latency["total"]["max"] < announced + 1000
    assert latency["server"]["median"] >= 0 and latency["transport"]["median"] > -5
    assert codec <= latency["graph"]["median"] <= latency["endToEnd"]["median"] < announced + 1500
    assert not state["errorShown"]


# ---- errors -----------------------------------------------------------------------------------------------------
def test_full_server_is_reported_in_the_page(served: ServeProcess, browser: Chromium) -> None:
    ws_url = "ws" + served.page[4:]
    with connect(ws_url) as holder:  # takes the only slot
        holder.send(json.dumps({"type": "hello", "kind": "encode"}))
        assert json.loads(holder.recv(timeout=30))["type"] == "ready"
        page = browser.open(served.page + "?autostart=1")
        state = finished(page)
    assert state["state"] == "error" and state["error"]["code"] == "server_full", state
    assert state["errorShown"] and "server_full" in state["errorText"] and "in use" in state["errorText"]


def test_page_from_a_disallowed_origin_explains_the_refusal(served: ServeProcess, browser: Chromium) -> None:
    # *.localhost resolves to this machine and is a secure context, but is not one of the loopback origins
    # the server accepts by default: the websocket handshake is refused with HTTP 403.
    port = served.page.rsplit(":", 1)[1].strip("/")
    page = browser.open(f"http://app.localhost:{port}/?autostart=1")
    state = finished(page)
    assert state["state"] == "error" and state["error"]["code"] == "bad_origin", state
    assert f"http://app.localhost:{port}" in state["errorText"] and "--allow-origin" in state["errorText"]


def test_server_going_away_mid_stream_is_reported(browser: Chromium) -> None:
    torch.manual_seed(0)
    model = SNAC(**SMALL_CONFIGS["24k_like"]).eval()
    box: Dict[str, Any] = {}
    up = threading.Event()

    async def run() -> None:
        async with SNACServer(model, ServerOptions(port=0)) as server:
            box["server"], box["loop"], box["stop"] = server, asyncio.get_running_loop(), asyncio.Event()
            up.set()
            await box["stop"].wait()

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    assert up.wait(60)
    try:
        page = browser.open(web.page_url(box["server"]) + "?autostart=1")
        page.wait_for("snac.state === 'streaming' && snac.receivedSamples > 0", 60)
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(60)
    state = finished(page)
    assert state["state"] == "error" and state["error"]["code"] == "disconnected", state
    assert state["errorShown"] and "closed unexpectedly" in state["errorText"]


def test_opus_option_is_off_with_a_note_where_the_browser_lacks_webcodecs(served: ServeProcess,
                                                                          browser: Chromium) -> None:
    no_webcodecs = "delete window.AudioEncoder; delete window.AudioDecoder;"
    page = browser.open(served.page, init_script=no_webcodecs)
    page.wait_for("snac.config !== null", 30)  # boot done: the options are set
    shown = json.loads(page.evaluate(
        "JSON.stringify({format: document.getElementById('format').value, "
        "off: document.querySelector('#format option[value=opus]').disabled, "
        "note: document.getElementById('format-note').textContent})"))
    assert shown["format"] == "pcm16" and shown["off"] is True  # PCM16 stays the default
    assert "Opus is off" in shown["note"] and "WebCodecs" in shown["note"], shown
    # Asked for in the address all the same: a clear error, not a silent fallback.
    state = finished(browser.open(served.page + "?format=opus&autostart=1", init_script=no_webcodecs))
    assert state["state"] == "error" and state["error"]["code"] == "opus_unavailable", state
    assert state["errorShown"] and "WebCodecs" in state["errorText"] and "PCM16" in state["errorText"]


def test_opus_option_is_off_where_the_server_cannot_code_opus(browser: Chromium,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = SNAC(**SMALL_CONFIGS["24k_like"]).eval()
    monkeypatch.setitem(sys.modules, "av", None)  # a server without PyAV

    def look(server: SNACServer) -> tuple:
        config = json.loads(get(web.page_url(server) + "config.json")[2])
        page = browser.open(web.page_url(server))
        page.wait_for("snac.config !== null", 30)  # boot done: the options are set
        return config, page.evaluate("document.getElementById('format-note').textContent")

    async def run() -> tuple:
        async with SNACServer(model, ServerOptions(port=0)) as server:
            return await asyncio.to_thread(look, server)

    config, note = asyncio.run(run())
    assert config["formats"] == ["pcm16", "float32", "mulaw", "alaw"]
    assert "server cannot code Opus" in note and "PyAV" in note, note
