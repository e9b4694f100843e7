"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own (several servers may share a
process, as in the tests).

Most figures are read when scraped, from counters the connection side and the worker keep anyway
(:mod:`.stats`) and from the loop-owned session set; the engine thread only adds observations to two
histograms (its steps' durations and batch sizes), each a short lock of ``prometheus_client``'s own, so a
scrape never waits for a tick and a tick never waits for a scrape. Nothing here names a session, a client or
the token.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator, Protocol, Tuple

import torch
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..protocol import ERRORS, KINDS


class Observed(Protocol):
    """What the metrics read of a server (:class:`~.app.SNACServer`); a protocol, so this module needs no
    import of the app that builds it."""

    model_name: str
    stats: Any
    gateway: Any
    options: Any

    def readiness(self) -> Tuple[bool, Any]: ...

    def health(self) -> Tuple[bool, Any]: ...


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OUTCOMES = ("completed", "closed", *ERRORS)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    """The registry of one :class:`~.app.SNACServer` and the histograms its engine thread feeds."""

    def __init__(self, server: Observed, device: str):
        self.registry = CollectorRegistry()
        self.step_seconds = Histogram("snac_engine_step_seconds", "Duration of one engine step, per lane",
                                      ["lane"], buckets=STEP_BUCKETS, registry=self.registry)
        self.batch_streams = Histogram("snac_engine_batch_streams", "Streams computed in one engine step, per lane",
                                       ["lane"], buckets=BATCH_BUCKETS, registry=self.registry)
        Gauge("snac_build_info", "Version, model and device of this server (always 1)",
              ["version", "model", "device"], registry=self.registry).labels(
            __version__, server.model_name, device).set(1)
        self.registry.register(_ServerCollector(server, device))

    def observe_step(self, lane: str, seconds: float, streams: int) -> None:
        """[engine thread] One lane's step."""
        self.step_seconds.labels(lane).observe(seconds)
        self.batch_streams.labels(lane).observe(streams)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ServerCollector(Collector):
    """The figures read at scrape time (on the event loop, which owns the session set)."""

    def __init__(self, server: Observed, device: str):
        self.server = server
        self.cuda = device.startswith("cuda")
        self.device = device

    def collect(self) -> Iterator[Metric]:
        server = self.server
        stats, gateway, options = server.stats, server.gateway, server.options
        sessions = list(gateway.sessions)

        open_by_kind = collections.Counter(s.kind for s in sessions)
        g = GaugeMetricFamily("snac_sessions_open", "Sessions holding a slot", labels=["kind"])
        for kind in KINDS:
            g.add_metric([kind], open_by_kind[kind])
        yield g
        yield GaugeMetricFamily("snac_session_slots", "Session slots (--max-sessions)", value=options.max_sessions)
        yield GaugeMetricFamily("snac_session_slots_free", "Session slots free",
                                value=max(0, options.max_sessions - len(sessions)))
        ready, _ = server.readiness()
        yield GaugeMetricFamily("snac_ready", "1 while the server takes new sessions (GET /readyz answers 200)",
                                value=int(ready))
        yield GaugeMetricFamily("snac_draining", "1 while the server drains (shutting down)",
                                value=int(gateway.draining))
        healthy, _ = server.health()
        yield GaugeMetricFamily("snac_healthy", "1 while the engine worker is healthy (GET /healthz answers 200)",
                                value=int(healthy))

        c = CounterMetricFamily("snac_sessions", "Sessions that held a slot, by kind and outcome (completed, "
                                                 "closed by the client, or the error code that ended them)",
                                labels=["kind", "outcome"])
        outcomes = stats["outcomes"]
        for kind in KINDS:
            for outcome in OUTCOMES:
                c.add_metric([kind, outcome], outcomes[kind, outcome])
        yield c
        c = CounterMetricFamily("snac_refusals", "Connections refused before they held a slot, by error code",
                                labels=["reason"])
        refusals = stats["refusals"]
        for reason in sorted({"server_full", "draining", "unauthorized", *refusals}):
            c.add_metric([reason], refusals[reason])
        yield c
        yield CounterMetricFamily("snac_behind_warnings", "'behind' warnings sent", value=stats["behind_warnings"])
        yield CounterMetricFamily("snac_received_bytes", "Message bytes received from clients",
                                  value=stats["bytes_in"])
        yield CounterMetricFamily("snac_sent_bytes", "Message bytes queued for clients", value=stats["bytes_out"])
        yield CounterMetricFamily("snac_engine_ticks", "Engine worker ticks", value=stats["ticks"])

        backlog = GaugeMetricFamily("snac_input_backlog_items", "Client input received but not yet stepped through "
                                                                "the engine (samples, or tokens for decode), by kind",
                                    labels=["kind"])
        items = collections.Counter()
        for s in sessions:
            items[s.kind] += max(0, s.loop.received - s.consumed)
        for kind in KINDS:
            backlog.add_metric([kind], items[kind])
        yield backlog
        yield GaugeMetricFamily("snac_output_queue_bytes", "Output queued for clients, not yet sent",
                                value=sum(s.loop.out_bytes for s in sessions))

        if self.cuda and torch.cuda.is_available():
            device = torch.device(self.device)
            yield GaugeMetricFamily("snac_gpu_memory_allocated_bytes", "CUDA memory allocated by tensors",
                                    value=torch.cuda.memory_allocated(device))
            yield GaugeMetricFamily("snac_gpu_memory_reserved_bytes", "CUDA memory reserved by the caching allocator",
                                    value=torch.cuda.memory_reserved(device))
