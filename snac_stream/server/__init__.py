"""Websocket serving. The wire protocol is :mod:`snac_stream.protocol` (shared with :mod:`snac_stream.client`).

* :mod:`.app`: :class:`SNACServer`, wiring the parts below together (its engines, :class:`~.app.ModelEngines`;
  its client-facing side, :class:`~.app.FrontServer`);
* :mod:`.frontends`: ``serve --frontends N``, the client-facing side in N processes, the engines in one
  (:class:`~.frontends.MultiProcessServer`);
* :mod:`.connection`: the event loop side (handshake, hello, read loop, backpressure, output queues);
* :mod:`.worker`: the engine side (the engines of each device, the thread that ticks them, the placement of
  sessions on devices) over :mod:`.lanes` (one per engine: the sessions' streams on it);
* :mod:`.session`: one client's state, split by the thread that owns it;
* :mod:`.conversion`: a session's client audio formats; :mod:`.llm`: llm sessions (tokens from an LLM endpoint);
* :mod:`.options`: settings, auth and origin rules; :mod:`.stats`: the counters; :mod:`.metrics`: their
  Prometheus view (``GET /metrics``; ``/healthz`` and ``/readyz`` are answered in :mod:`.app`);
* :mod:`.web`: the browser client served on the same port (files in ``static/``);
* :mod:`.loadtest`: the ``bench-latency`` load test (clients in worker processes against a server started by
  the test, with or without front ends).
"""

from ..protocol import PROTOCOL_VERSION, ProtocolError
from .app import SNACServer
from .options import ServerOptions

__all__ = ["PROTOCOL_VERSION", "ProtocolError", "ServerOptions", "SNACServer"]
