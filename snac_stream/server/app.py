"""The websocket server: one model, a decode and an encode engine, many sessions.

:class:`SNACServer` wires the parts together: the engines and the thread that runs them (:mod:`.worker`,
:mod:`.lanes`), the connection side on the event loop (:mod:`.connection`) and the browser page on the same
port (:mod:`.web`). Dependencies go one way: this module -> connection, web -> worker -> lanes -> session;
every part reads :mod:`.options`.
"""

from __future__ import annotations

import gc
from typing import Any, Dict, Optional

from websockets.asyncio.server import Server, ServerConnection, serve

from ..model.snac import SNACModel
from ..streaming.latency import algorithmic_latency
from . import web
from .connection import Gateway
from .options import ServedModel, ServerOptions, default_engine_threads, handshake_origins
from .stats import new_stats
from .worker import EngineSet, Worker


class SNACServer:
    """A websocket server streaming one model to many sessions.

    Use ``async with SNACServer(model, options) as server:`` (or :meth:`start` / :meth:`stop`); ``server.port``
    is the bound port (``options.port = 0`` picks a free one).
    """

    def __init__(self, model: SNACModel, options: Optional[ServerOptions] = None, *, model_name: Optional[str] = None,
                 random_weights: bool = False):
        self.options = options or ServerOptions()
        self.options.check()
        self.model = model.eval()
        self.model_name = model_name or getattr(model, "name", None) or "snac"
        self.random_weights = random_weights
        self.stats: Dict[str, Any] = new_stats()
        self.engines = EngineSet(model, self.options.max_sessions, self.stats, backend=self.options.backend,
                                 behind_warning_s=self.options.behind_warning_s)
        self.encoder, self.decoder = self.engines.encoder, self.engines.decoder
        self.step_frames = self.engines.step_frames
        self.step_samples = self.engines.step_samples
        self.latency = {kind: algorithmic_latency(model, kind, self.step_frames)
                        for kind in ("encode", "decode", "roundtrip")}
        self.served = ServedModel(self.model_name, model.config, self.step_frames, self.step_samples, self.latency,
                                  random_weights)
        self.threads = self.options.threads or default_engine_threads()
        self.worker = Worker(self.engines, self.threads, self.stats)
        self.gateway = Gateway(self.served, self.options, self.worker, self.stats)
        self._server: Optional[Server] = None
        self.port: Optional[int] = None

    # ---- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> "SNACServer":
        """Start the engine worker and listen (on the running event loop)."""
        self.worker.start(self.gateway.take_events)
        self._server = await serve(
            self.gateway.handle, self.options.host, self.options.port, origins=handshake_origins(self.options),
            compression=None,
            # The library refuses (close 1009) anything far beyond our own limit, which we report in JSON.
            max_size=2 * self.options.max_frame_bytes + 1024, max_queue=4,
            process_request=self._process_request)
        self.port = self._server.sockets[0].getsockname()[1]
        # What is alive now (model, engine states, modules) lives as long as the server: keep it out of the cyclic
        # garbage collector's full passes, which otherwise scan it all (long with a large engine), stalling
        # whichever tick they land in.
        gc.collect()
        gc.freeze()
        return self

    async def stop(self) -> None:
        """Stop listening, close the connections, stop the worker."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.worker.stop()
        gc.unfreeze()  # back to normal collection (and a clean interpreter exit) once the server is gone

    async def __aenter__(self) -> "SNACServer":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        assert self._server is not None, "call start() first"
        await self._server.serve_forever()

    @property
    def url(self) -> str:
        """The websocket address (``ws://host:port``) once started."""
        host = self.options.host
        return f"ws://{'[' + host + ']' if ':' in host else host}:{self.port}"

    @property
    def active_sessions(self) -> int:
        """Sessions holding a slot now."""
        return len(self.gateway.sessions)

    async def wait_sessions(self, at_most: int) -> None:
        """Return once no more than ``at_most`` sessions hold a slot."""
        await self.gateway.wait_sessions(at_most)

    def _process_request(self, connection: ServerConnection, request: Any) -> Any:
        if self.options.web and not web.is_websocket_request(request):
            return web.respond(self.served, self.options, connection, request)
        return self.gateway.check_request(connection, request)
