"""The browser client: static page, scripts and a small JSON config, served on the websocket port.

HTTP ``GET`` requests that are not websocket upgrades are answered here (``SNACServer`` calls
:func:`respond` from its ``process_request`` hook), so one port serves both the page and the protocol:

* ``/`` (``/index.html``), ``/app.js``, ``/opus.js``, ``/worklet.js``: the page (files in ``static/``, shipped
  as package data); it captures the microphone, streams a ``roundtrip`` session (PCM, or Opus coded by the
  browser's WebCodecs) and plays the decoded audio back;
* ``/config.json``: what the page needs before it opens the websocket: the model's sample rate (the page
  creates its ``AudioContext`` at that rate, so no resampling happens in JavaScript), the announced
  algorithmic latencies, the session slots (all devices' and per device), the client audio formats this server
  can code now (Opus needs PyAV), and whether a given page origin
  (``?origin=``) passes the server's Origin check, so a refused handshake can be explained (a browser does
  not see the HTTP 403 of a refused websocket).

Everything is same-origin and offline: no external assets.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, Optional, Protocol, Tuple
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from .. import __version__
from ..formats import available_formats
from .options import ServedModel, ServerOptions, origin_allowed

STATIC_DIR = Path(__file__).with_name("static")
# path -> (file in STATIC_DIR, content type)
FILES: Dict[str, Tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/opus.js": ("opus.js", "text/javascript; charset=utf-8"),
    "/worklet.js": ("worklet.js", "text/javascript; charset=utf-8"),
}
# The page only talks to its own origin (http and its websocket); no inline scripts, no third parties.
CSP = "default-src 'self'; connect-src 'self' ws: wss:; style-src 'self' 'unsafe-inline'; img-src 'self' data:"


def is_websocket_request(request: Request) -> bool:
    """Whether ``request`` asks for a websocket upgrade (then the websocket handshake handles it)."""
    return any("websocket" in value.lower() for value in request.headers.get_all("Upgrade"))


class _Listening(Protocol):
    """A started server (:class:`~snac_stream.server.SNACServer`): all the page address needs is its URL."""

    @property
    def url(self) -> str: ...


def page_url(server: _Listening) -> str:
    """The browser page's address: the (started) server's websocket URL with ``http``."""
    return "http" + server.url[2:] + "/"


def config(served: ServedModel, options: ServerOptions, origin: Optional[str]) -> Dict[str, object]:
    """The JSON the page reads before it connects."""
    cfg = served.config
    return {
        "server": f"snac-stream {__version__}", "protocol": 1, "model": served.name,
        "random_weights": served.random_weights, "sample_rate": cfg.sampling_rate,
        "step_samples": served.step_samples, "codebook_size": cfg.codebook_size,
        "algorithmic_latency_samples": dict(served.latency),
        "max_sessions": options.max_sessions * len(served.devices), "max_sessions_per_device": options.max_sessions,
        "devices": list(served.devices), "token_required": bool(options.token),
        "formats": available_formats(),
        # Whether a decode hello may name an LLM (serve --allow-llm); the allowed URLs stay private.
        "llm_sessions": bool(options.allow_llm),
        "origin": origin, "origin_allowed": None if origin is None else origin_allowed(options, origin),
    }


def respond(served: ServedModel, options: ServerOptions, connection: ServerConnection,
            request: Request) -> Response:
    """The HTTP response to a plain (non-websocket) ``GET``: a static file, the config, or 404."""
    url = urlsplit(request.path)
    if url.path == "/config.json":
        origin = parse_qs(url.query).get("origin", [None])[0]
        return response(connection, 200, json.dumps(config(served, options, origin)).encode(), "application/json")
    entry = FILES.get(url.path)
    if entry is None:
        return response(connection, 404, f"not found: {url.path}\n".encode(), "text/plain; charset=utf-8")
    name, content_type = entry
    return response(connection, 200, (STATIC_DIR / name).read_bytes(), content_type)


def method_not_allowed(connection: ServerConnection, method: str) -> Response:
    """405 for a method other than GET on a path this server answers over plain HTTP."""
    answer = response(connection, 405, f"method {method} not allowed; use GET\n".encode(), "text/plain; charset=utf-8")
    answer.headers["Allow"] = "GET"
    return answer


def response(connection: ServerConnection, status: int, body: bytes, content_type: str) -> Response:
    answer = connection.respond(status, "")  # websockets' own response: Date, Server, Connection: close
    headers = answer.headers
    for name in ("Content-Type", "Content-Length"):
        del headers[name]
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Cache-Control"] = "no-store"  # the page must match the server that serves it
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Content-Security-Policy"] = CSP
    return dataclasses.replace(answer, body=body)
