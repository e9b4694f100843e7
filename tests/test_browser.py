"""The browser client, as a user runs it: ``snac-stream serve``, then the page in (headless) Chromium.

Chromium's fake microphone plays a WAV file; the page streams it through a roundtrip session and plays the
decoded audio (into Chromium's null output: no sound card needed). The page keeps its state in
``window.snac``, read here over the DevTools protocol (tests/chromium.py). The model is a small random-weight
checkpoint, so a run takes seconds. Skipped only when no Chromium is installed (CI installs it).
"""

from __future__ import annotations

import asyncio
import base64
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
import torch
from chromium import Chromium, find_chromium
from helpers import SMALL_CONFIGS, make_reference, save_official
from websockets.sync.client import connect

from snac_stream import SNAC
from snac_stream.server import ServerOptions, SNACServer, web

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed "
                                "(apt-get install -y chromium chromium-driver)")

RATE = 24000
TONE_HZ = 440.0
SECONDS = 3
PCM16_TOL = 1 / 32768 + 1e-5  # the page receives PCM16: one quantisation step plus float rounding


def tone_clip(path: Path) -> Path:
    """A 48 kHz WAV (the usual device rate: the browser resamples it to the model's rate) that loops seamlessly."""
    t = np.arange(2 * 48000) / 48000
    sf.write(path, (0.3 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32), 48000, subtype="PCM_16")
    return path


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
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_official(make_reference(SMALL_CONFIGS["24k_like"], seed=11), tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def served(checkpoint: Path) -> Iterator[ServeProcess]:
    # One slot, so the server-full test can take it.
    server = ServeProcess("--model", str(checkpoint), "--max-sessions", "1")
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    with Chromium(tone_clip(tmp_path_factory.mktemp("audio") / "tone.wav")) as chromium:
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
                                                                         checkpoint: Path) -> None:
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
    # The fake mic played the clip, resampled by the browser to the model's rate: a 440 Hz tone.
    spectrum = np.abs(np.fft.rfft(sent[RATE // 2:]))
    assert abs(np.argmax(spectrum) * RATE / (sent.size - RATE // 2) - TONE_HZ) < 2
    assert np.sqrt(np.mean(sent[RATE // 2:] ** 2)) > 0.1
    # What the page received is the codec's offline roundtrip of what it sent.
    model = SNAC.from_pretrained(checkpoint)
    with torch.inference_mode():
        codes = model.encode(torch.from_numpy(sent).view(1, 1, -1))
        expected = model.decode(codes)[0, 0, :n].numpy()
    assert state["tokens"] == sum(c.numel() for c in codes)
    assert np.abs(received - expected).max() <= PCM16_TOL
    assert np.sqrt(np.mean(received ** 2)) > 1e-3  # not silence

    # Latency: the announced algorithmic delay is a floor; the rest (server, transport, jitter buffer) is bounded.
    announced = 1000 * ready["algorithmic_latency_samples"] / RATE
    assert latency["announced"] == pytest.approx(announced)
    assert latency["algorithmic"]["max"] >= announced - 1e-6  # chunking only adds to the worst case
    assert latency["total"]["n"] > 10 and latency["endToEnd"]["n"] > 10
    assert announced <= latency["total"]["median"] <= latency["total"]["max"] < announced + 1000
    assert latency["server"]["median"] >= 0 and latency["transport"]["median"] > -5
    assert announced <= latency["graph"]["median"] <= latency["endToEnd"]["median"] < announced + 1500
    assert re.fullmatch(r"\d+ ms", state["e2eText"]) and not state["errorShown"]


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
