"""Headless Chromium driven over the DevTools protocol (a websocket): enough to test and screenshot the page.

The browser gets a fake microphone that plays a WAV file (``--use-file-for-fake-audio-capture``), grants
media permissions without a prompt, and starts audio without a user gesture. Run as a script to take the
README screenshot::

    python tests/chromium.py http://127.0.0.1:8765/?autostart=1 docs/browser.png --wait 6
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from websockets.sync.client import ClientConnection, connect

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> Optional[str]:
    """Path of an installed Chromium or Chrome, or None."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Page:
    """One tab: evaluate JavaScript, poll for a condition, take a screenshot."""

    def __init__(self, ws_url: str):
        self._stack = contextlib.ExitStack()
        self._ws: ClientConnection = self._stack.enter_context(connect(ws_url, max_size=None, open_timeout=10))
        self._ids = itertools.count(1)

    def call(self, method: str, timeout_s: float = 30.0, **params: Any) -> Dict[str, Any]:
        """Send one DevTools command and return its result (events in between are skipped)."""
        number = next(self._ids)
        self._ws.send(json.dumps({"id": number, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            message = json.loads(self._ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message.get("id") == number:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression (promises are awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float, poll_s: float = 0.1) -> Any:
        """Poll ``expression`` until it is truthy; return its value. Raises TimeoutError with the page state."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                state = self.evaluate("JSON.stringify({state: window.snac && snac.state, error: window.snac && "
                                      "snac.error, text: document.body && document.body.innerText})")
                raise TimeoutError(f"{expression!r} still false after {timeout_s} s; page: {state}")
            time.sleep(poll_s)

    def screenshot(self, path: Path | str) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self._stack.close()


class Chromium:
    """A headless Chromium process with a DevTools port; ``open(url)`` gives a :class:`Page`.

    ``audio_file``: WAV file the fake microphone plays (looped). ``extra_args``: more command-line flags.
    """

    def __init__(self, audio_file: Optional[Path] = None, extra_args: Sequence[str] = (),
                 executable: Optional[str] = None, window: str = "1000,760"):
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise FileNotFoundError("no chromium/chrome executable on PATH")
        # Chromium helper processes can still write the profile after the browser exits: its removal is best
        # effort (a leftover scratch folder under /tmp), never a test failure.
        self._profile = tempfile.TemporaryDirectory(prefix="snac-chromium-", ignore_cleanup_errors=True)
        args = [self.executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-dev-shm-usage",
                # Background tabs and timers must not be throttled while streaming.
                "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                "--autoplay-policy=no-user-gesture-required", f"--window-size={window}",
                f"--user-data-dir={self._profile.name}", "--remote-debugging-port=0"]
        if audio_file is not None:
            args.append(f"--use-file-for-fake-audio-capture={audio_file}")
        args += [*extra_args, "about:blank"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.port = self._wait_port(timeout_s=30.0)
        self._pages: List[Page] = []

    def _wait_port(self, timeout_s: float) -> int:
        # Chromium writes the port it bound to its profile directory.
        active = Path(self._profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}: "
                                   f"{self.process.stderr.read().decode(errors='replace')[-2000:]}")
            if active.exists():
                lines = active.read_text().split()
                if lines:
                    return int(lines[0])
            time.sleep(0.05)
        raise TimeoutError("chromium did not open its DevTools port")

    def open(self, url: str, init_script: Optional[str] = None) -> Page:
        """A new tab at ``url``; ``init_script`` (JavaScript) runs in it before the page's own scripts."""
        # A blank tab, then navigate: /json/new would take the URL's own query string apart.
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as response:
            target = json.load(response)
        page = Page(target["webSocketDebuggerUrl"])
        self._pages.append(page)
        if init_script is not None:
            page.call("Page.enable")  # without it the script is not run
            page.call("Page.addScriptToEvaluateOnNewDocument", source=init_script)
        page.call("Page.navigate", url=url)
        # Loaded: the page's scripts have run (window.snac exists from then on).
        page.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'", 30)
        return page

    def close(self) -> None:
        for page in self._pages:
            page.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stderr.close()
        self._profile.cleanup()

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Open a page in headless Chromium and save a screenshot.")
    parser.add_argument("url")
    parser.add_argument("png")
    parser.add_argument("--audio", type=Path, default=None, help="WAV file for the fake microphone")
    parser.add_argument("--wait", type=float, default=5.0, help="seconds of streaming before the screenshot")
    parser.add_argument("--window", default="1000,760", help="window size, WIDTH,HEIGHT")
    args = parser.parse_args(argv)
    with Chromium(args.audio, window=args.window) as browser:
        page = browser.open(args.url)
        page.wait_for("window.snac && snac.state === 'streaming'", 30)
        time.sleep(args.wait)  # the figures on the screenshot are after this much streaming
        page.screenshot(args.png)
        print(json.dumps(page.evaluate("JSON.stringify({state: snac.state, latency: snac.latency, "
                                       "underruns: snac.underruns, error: snac.error})")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
