"""The websocket server: one model, a decode and an encode engine per device, many sessions.

:class:`SNACServer` wires the parts together: the engines of each device and the thread that runs them
(:class:`ModelEngines`; :mod:`.worker`, :mod:`.lanes`), and the client-facing side (:class:`FrontServer`): the
connection side on the event loop (:mod:`.connection`), the HTTP endpoints and the browser page on the same
port (:mod:`.web`). :mod:`.frontends` runs the same two halves in separate processes. Dependencies go one way:
frontends -> this module -> connection, web -> worker -> lanes -> session; every part reads :mod:`.options`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

import torch
from websockets.asyncio.server import Server, ServerConnection, serve

from ..model.snac import SNACModel
from ..streaming.latency import algorithmic_latency
from . import web
from .connection import Gateway
from .heap import freeze_heap, thaw_heap
from .metrics import (CONTENT_TYPE as METRICS_CONTENT_TYPE, ServerMetrics, engine_snapshot, front_snapshot,
                      merge_snapshots)
from .options import ServedModel, ServerOptions, default_engine_threads, handshake_origins
from .stats import new_stats
from .worker import EngineSet, Worker, Workers

log = logging.getLogger("snac_stream.server")
# Operational endpoints, answered with or without the page (--no-web) and without the token.
OPS_PATHS = ("/healthz", "/readyz", "/metrics")


def _device(spec: Union[str, torch.device]) -> torch.device:
    """``spec`` as a device with its index where CUDA has one (``cuda`` is the current CUDA device)."""
    device = torch.device(spec)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def readiness(draining: bool, slots_free: Sequence[int], health: Callable[[], Tuple[bool, str]]) -> Tuple[bool, str]:
    """(ready, reason) of a started server: ``draining``, ``full`` (no device has a free slot), ``unhealthy``
    (``health()`` says so) or ``ready``, in that order."""
    if draining:
        return False, "draining"
    if not any(slots_free):
        return False, "full"
    if not health()[0]:
        return False, "unhealthy"
    return True, "ready"


class ServerLifecycle:
    """What every server shares around its own ``start``/``stop``: ``async with`` and its websocket URL."""

    options: ServerOptions
    port: Optional[int]

    async def start(self) -> Any:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Any:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """The websocket address (``ws://host:port``) once started."""
        host = self.options.host
        return f"ws://{'[' + host + ']' if ':' in host else host}:{self.port}"


class ModelEngines:
    """One model's engines on the devices a server runs on: an engine set and worker thread per device
    (:class:`~.worker.Workers`), and what clients are told about the model (``served``). Built by the
    in-process :class:`SNACServer` and by the engine process of a server with front-end processes
    (:mod:`.frontends`).

    ``devices`` (default: the model's device) lists the devices to run on, ``options.max_sessions`` slots
    each; ``cpu`` may repeat. The first device uses ``model`` if it is on it, every other one a copy.
    """

    def __init__(self, model: SNACModel, options: ServerOptions, stats: Dict[str, Any], *, model_name: Optional[str],
                 random_weights: bool, devices: Optional[Sequence[Union[str, torch.device]]]):
        self.model = model.eval()
        self.model_name = model_name or getattr(model, "name", None) or "snac"
        if devices is not None and not devices:
            raise ValueError("devices must list at least one device")
        places = [_device(d) for d in devices] if devices else [model.device]
        models = [self.model if i == 0 and place == model.device else copy.deepcopy(self.model).to(place).eval()
                  for i, place in enumerate(places)]
        self.engine_sets: List[EngineSet] = [
            EngineSet(m, options.max_sessions, stats, backend=options.backend,
                      behind_warning_s=options.behind_warning_s) for m in models]
        first = self.engine_sets[0]
        self.step_frames, self.step_samples = first.step_frames, first.step_samples
        self.latency = {kind: algorithmic_latency(model, kind, self.step_frames)
                        for kind in ("encode", "decode", "roundtrip")}
        self.devices: List[str] = [str(place) for place in places]
        self.served = ServedModel(self.model_name, model.config, self.step_frames, self.step_samples, self.latency,
                                  tuple(self.devices), random_weights)
        self.threads = options.threads or default_engine_threads([engines.device for engines in self.engine_sets])
        self.workers = Workers([Worker(engines, self.threads, stats) for engines in self.engine_sets],
                               options.max_sessions)
        self.metrics = ServerMetrics(self.model_name, self.devices)
        for index, engines in enumerate(self.engine_sets):
            engines.on_step = self.metrics.step_observer(index)


class FrontServer(ServerLifecycle):
    """The side of a server that faces clients: the listening socket, one websocket session per connection
    (:class:`~.connection.Gateway`), the HTTP endpoints (``/healthz``, ``/readyz``, ``/metrics``, the browser
    page), drain and stop. Its engine work goes to ``workers``: the :class:`~.worker.Workers` of this process
    (:class:`SNACServer`), or a link to the engine process of a server with front-end processes
    (:mod:`.frontends`), which has the same methods.

    ``reuse_port``: listen with ``SO_REUSEPORT``, beside the other front ends on the same port (the kernel
    spreads connections over them). ``numbering``: (first, step) of the session numbers told in ``ready``, so
    that front ends of one server never give the same number.
    """

    def __init__(self, served: ServedModel, options: ServerOptions, workers: Any, stats: Dict[str, Any], *,
                 reuse_port: bool = False, numbering: Tuple[int, int] = (1, 1)):
        self.served = served
        self.options = options
        self.workers = workers
        self.stats = stats
        self.reuse_port = reuse_port
        self.gateway = Gateway(served, options, workers, stats, numbering=numbering)
        self._server: Optional[Server] = None
        self._stopped = False
        self._hurry: Optional[asyncio.Event] = None
        self.port: Optional[int] = None

    # ---- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> "SNACServer":
        """Start the engine workers and listen (on the running event loop)."""
        self.workers.start(self.gateway.take_events)
        self._server = await serve(
            self.gateway.handle, self.options.host, self.options.port, origins=handshake_origins(self.options),
            compression=None,
            # The library refuses (close 1009) anything far beyond our own limit, which we report in JSON.
            max_size=2 * self.options.max_frame_bytes + 1024, max_queue=4,
            process_request=self._process_request, reuse_port=self.reuse_port or None)
        self.port = self._server.sockets[0].getsockname()[1]
        self.gateway.server_id = self.options.server_id or f"{socket.gethostname()}:{self.port}"
        freeze_heap()  # what is alive now lives as long as the server: out of the collector's passes
        return self

    async def stop(self) -> None:
        """Stop listening, close the connections (close code 1001), stop the workers. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.workers.stop()
        thaw_heap()

    async def serve_forever(self) -> None:
        assert self._server is not None, "call start() first"
        await self._server.serve_forever()

    @property
    def active_sessions(self) -> int:
        """Sessions holding a slot now."""
        return len(self.gateway.sessions)

    async def wait_sessions(self, at_most: int) -> None:
        """Return once no more than ``at_most`` sessions hold a slot."""
        await self.gateway.wait_sessions(at_most)

    # ---- operations -----------------------------------------------------------------------------------
    def health(self) -> Tuple[bool, str]:
        """(healthy, why): every engine worker runs and none has a tick stuck (``stuck_tick_s``)."""
        return self.workers.health(self.options.stuck_tick_s)

    def readiness(self) -> Tuple[bool, str]:
        """(ready, reason): whether a new session would be taken now (some device has a free slot); reason
        ``ready``, ``starting``, ``draining``, ``full`` (every device's slots taken) or ``unhealthy`` (any
        worker). The server listens only once its engines are built (compiled and captured on CUDA), so
        ``starting`` is never seen over HTTP: the port refuses connections until then."""
        if self.port is None or self._stopped:
            return False, "starting" if self.port is None else "stopped"
        return readiness(self.gateway.draining, self.workers.slots_free(), self.health)

    @property
    def draining(self) -> bool:
        return self.gateway.draining

    async def drain(self, timeout: float) -> Dict[str, Any]:
        """Shut down gracefully: take no new session (``/readyz`` 503 ``draining``, new hellos refused with
        ``draining``), let the open sessions finish for up to ``timeout`` seconds (or until :meth:`hurry`), end
        what remains with ``going_away`` (close code 1001), then :meth:`stop`. Returns what happened."""
        t0 = time.monotonic()
        self.gateway.draining = True
        self._hurry = self._hurry or asyncio.Event()
        open_at_start = len(self.gateway.sessions)
        log.info("draining: %d sessions open, up to %g s", open_at_start, timeout)
        idle = asyncio.ensure_future(self.gateway.wait_idle())
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            await asyncio.wait([idle, hurry], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurry.cancel()
        ended = 0
        if not idle.done():
            ended = self.gateway.go_away()
            log.info("drain timeout: ending %d sessions (going away)", ended)
            try:
                await asyncio.wait_for(asyncio.shield(idle), 5.0)
            except asyncio.TimeoutError:
                pass
        idle.cancel()
        await self.stop()
        return {"sessions_open_at_start": open_at_start, "sessions_ended_at_timeout": ended,
                "seconds": round(time.monotonic() - t0, 3)}

    def hurry(self) -> None:
        """End a drain under way now (its remaining sessions get ``going_away``), e.g. on a second signal."""
        self._hurry = self._hurry or asyncio.Event()
        self._hurry.set()

    async def metrics_text(self) -> bytes:
        """The ``/metrics`` exposition text of the whole server."""
        raise NotImplementedError

    async def _ops_response(self, connection: ServerConnection, path: str) -> Any:
        if path == "/metrics":
            return web.response(connection, 200, await self.metrics_text(), METRICS_CONTENT_TYPE)
        if path == "/healthz":
            ok, reason = self.health()
            body: Dict[str, Any] = {"healthy": ok, "reason": reason}
        else:
            ok, reason = self.readiness()
            free = self.workers.slots_free()
            body = {"ready": ok, "reason": reason, "sessions_open": len(self.gateway.sessions), "slots_free": sum(free)}
            if len(self.workers) > 1:
                per_device = zip(self.served.devices, self.workers.sessions_open(), free)
                body["devices"] = [{"engine_set": i, "device": device, "sessions_open": n, "slots_free": f}
                                   for i, (device, n, f) in enumerate(per_device)]
        return web.response(connection, 200 if ok else 503, json.dumps(body).encode() + b"\n", "application/json")

    async def _process_request(self, connection: ServerConnection, request: Any) -> Any:
        if not web.is_websocket_request(request):
            path = urlsplit(request.path).path
            if path in OPS_PATHS or self.options.web:
                if request.method != "GET":
                    return web.method_not_allowed(connection, request.method)
                if path in OPS_PATHS:
                    return await self._ops_response(connection, path)
                return web.respond(self.served, self.options, connection, request)
        return self.gateway.check_request(connection, request)


class SNACServer(FrontServer):
    """A websocket server streaming one model to many sessions, on one device or several, in one process.

    Use ``async with SNACServer(model, options) as server:`` (or :meth:`start` / :meth:`stop`); ``server.port``
    is the bound port (``options.port = 0`` picks a free one).

    ``devices`` (default: the model's device) lists the devices to run on, one engine set and worker thread
    each, with ``options.max_sessions`` slots each; ``cpu`` may repeat (:class:`ModelEngines`). A new session
    goes to the device with the most free slots (:class:`~.worker.Workers`). ``engines``, ``encoder``,
    ``decoder`` and ``worker`` are the first device's; ``engine_sets`` and ``workers`` hold them all. For more
    sessions than one event loop can carry, the same server runs with front-end processes:
    :class:`~.frontends.MultiProcessServer`.
    """

    def __init__(self, model: SNACModel, options: Optional[ServerOptions] = None, *, model_name: Optional[str] = None,
                 random_weights: bool = False, devices: Optional[Sequence[Union[str, torch.device]]] = None):
        options = options or ServerOptions()
        options.check()
        stats = new_stats()
        built = ModelEngines(model, options, stats, model_name=model_name, random_weights=random_weights,
                             devices=devices)
        super().__init__(built.served, options, built.workers, stats)
        self.model, self.model_name, self.random_weights = built.model, built.model_name, random_weights
        self.engine_sets, self.devices, self.threads = built.engine_sets, built.devices, built.threads
        self.engines = self.engine_sets[0]
        self.encoder, self.decoder = self.engines.encoder, self.engines.decoder
        self.step_frames, self.step_samples, self.latency = built.step_frames, built.step_samples, built.latency
        self.worker = self.workers[0]
        self.metrics = built.metrics

    async def metrics_text(self) -> bytes:
        snapshot = merge_snapshots([front_snapshot(self.gateway, self.stats),
                                    engine_snapshot(self.workers, self.stats, self.options.stuck_tick_s)])
        snapshot["ready"] = self.readiness()[0]
        return self.metrics.render(snapshot)
