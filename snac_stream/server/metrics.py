"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own (several servers may share a
process, as in the tests).

Most figures are read when scraped, as a *snapshot* of counters the connection side and the workers keep
anyway (:mod:`.stats`) and of the loop-owned session set; the engine threads only add observations to two
histograms (their steps' durations and batch sizes), each a short lock of ``prometheus_client``'s own, so a
scrape never waits for a tick and a tick never waits for a scrape. A server with front-end processes
(:mod:`.frontends`) renders in its engine process, from its own snapshot and those its front ends send when
asked, added up: one scrape of any front end shows the whole server. Nothing here names a session, a client
or the token.

On several devices, the per-device series (engine steps, ticks, slots, GPU memory) carry the labels
``engine_set`` (its index in ``--device``) and ``device`` (``cpu,cpu`` repeats a device, the index tells them
apart); on one device they have no such labels.
"""

from __future__ import annotations

import collections
import copy
from typing import Any, Callable, Counter, Dict, Iterator, List, Sequence, Tuple

import torch
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..protocol import ERRORS, KINDS


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OUTCOMES = ("completed", "closed", *ERRORS)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DEVICE_LABELS = ["engine_set", "device"]  # of the per-device series, on several devices
# The figures of one scrape, as plain data: one process's parts (:func:`front_snapshot`, :func:`engine_snapshot`)
# travel between a server's processes and add up (:func:`merge_snapshots`).
Snapshot = Dict[str, Any]


def device_labels(devices: Sequence[str]) -> List[Tuple[str, ...]]:
    """The per-device label values of each engine set: (index, device) on several devices, none on one."""
    return [(str(i), device) for i, device in enumerate(devices)] if len(devices) > 1 else [()] * len(devices)


class ServerMetrics:
    """The registry of one :class:`~.app.SNACServer` (engine sets on ``devices``) and the histograms its engine
    threads feed."""

    def __init__(self, model_name: str, devices: Sequence[str]):
        self.registry = CollectorRegistry()
        self.labels = device_labels(devices)
        per_device = DEVICE_LABELS if len(devices) > 1 else []
        self.step_seconds = Histogram("snac_engine_step_seconds", "Duration of one engine step, per lane",
                                      [*per_device, "lane"], buckets=STEP_BUCKETS, registry=self.registry)
        self.batch_streams = Histogram("snac_engine_batch_streams", "Streams computed in one engine step, per lane",
                                       [*per_device, "lane"], buckets=BATCH_BUCKETS, registry=self.registry)
        Gauge("snac_build_info", "Version, model and devices (comma-separated, in engine set order) of this server "
                                 "(always 1)",
              ["version", "model", "device"], registry=self.registry).labels(
            __version__, model_name, ",".join(devices)).set(1)
        self._collector = _ServerCollector(devices, per_device, self.labels)
        self.registry.register(self._collector)

    def step_observer(self, engine_set: int) -> Callable[[str, float, int], None]:
        """What engine set ``engine_set``'s thread calls after each lane's step: (lane, seconds, streams)."""
        labels = self.labels[engine_set]
        step_seconds, batch_streams = self.step_seconds, self.batch_streams

        def observe(lane: str, seconds: float, streams: int) -> None:
            step_seconds.labels(*labels, lane).observe(seconds)
            batch_streams.labels(*labels, lane).observe(streams)

        return observe

    def render(self, snapshot: Snapshot) -> bytes:
        """The exposition text of ``snapshot`` (:func:`front_snapshot` and :func:`engine_snapshot` merged,
        plus ``ready``) and of the step histograms."""
        self._collector.snapshot = snapshot
        try:
            return generate_latest(self.registry)
        finally:
            self._collector.snapshot = {}


def front_snapshot(gateway: Any, stats: Dict[str, Any]) -> Snapshot:
    """What one connection side (:class:`~.connection.Gateway` and its counters) adds to the metrics; on its
    event loop, which owns the session set."""
    sessions = list(gateway.sessions)
    backlog: Counter = collections.Counter()
    for s in sessions:
        backlog[s.kind] += max(0, s.loop.received - s.consumed)
    return {"open_by_kind": collections.Counter(s.kind for s in sessions), "backlog_by_kind": backlog,
            "output_queue_bytes": sum(s.loop.out_bytes for s in sessions),
            "outcomes": collections.Counter(stats["outcomes"]), "refusals": collections.Counter(stats["refusals"]),
            "errors": collections.Counter(stats["errors"]),
            "bytes_in": stats["bytes_in"], "bytes_out": stats["bytes_out"], "draining": gateway.draining}


def engine_snapshot(workers: Any, stats: Dict[str, Any], stuck_after_s: float) -> Snapshot:
    """What the engine side (:class:`~.worker.Workers` and its counters) adds to the metrics."""
    return {"slots": workers.slots, "slots_free": workers.slots_free(), "sessions_open": workers.sessions_open(),
            "ticks": [worker.ticks for worker in workers], "behind_warnings": stats["behind_warnings"],
            "healthy": workers.health(stuck_after_s)[0]}


def merge_snapshots(parts: Sequence[Snapshot]) -> Snapshot:
    """One snapshot of several processes' parts: counts add up, ``draining`` if any part drains, the engine
    side's own fields taken as they are."""
    merged: Snapshot = {}
    for part in parts:
        for key, value in part.items():
            if key not in merged:
                merged[key] = copy.copy(value)
            elif key == "draining":
                merged[key] = merged[key] or value
            elif isinstance(value, (collections.Counter, int)) and not isinstance(value, bool):
                merged[key] += value
            else:
                raise ValueError(f"metrics field {key!r} given twice")
    return merged


class _ServerCollector(Collector):
    """The figures of the snapshot taken for the scrape under way (:meth:`ServerMetrics.render`)."""

    def __init__(self, devices: Sequence[str], per_device: List[str], labels: List[Tuple[str, ...]]):
        self.devices = devices
        self.per_device = per_device  # label names of the per-device series
        self.labels = labels  # their values, per engine set
        self.snapshot: Snapshot = {}

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if not snap:  # a registry walk outside a scrape (e.g. at registration)
            return
        g = GaugeMetricFamily("snac_sessions_open", "Sessions holding a slot", labels=["kind"])
        for kind in KINDS:
            g.add_metric([kind], snap["open_by_kind"][kind])
        yield g
        free = snap["slots_free"]
        yield GaugeMetricFamily("snac_session_slots", "Session slots (--max-sessions on each device)",
                                value=snap["slots"])
        yield GaugeMetricFamily("snac_session_slots_free", "Session slots free", value=sum(free))
        if self.per_device:
            g = GaugeMetricFamily("snac_device_sessions_open", "Sessions holding a slot, per engine set",
                                  labels=self.per_device)
            for labels, n in zip(self.labels, snap["sessions_open"]):
                g.add_metric(labels, n)
            yield g
            g = GaugeMetricFamily("snac_device_slots_free", "Session slots free, per engine set",
                                  labels=self.per_device)
            for labels, n in zip(self.labels, free):
                g.add_metric(labels, n)
            yield g
        yield GaugeMetricFamily("snac_ready", "1 while the server takes new sessions (GET /readyz answers 200)",
                                value=int(snap["ready"]))
        yield GaugeMetricFamily("snac_draining", "1 while the server drains (shutting down)",
                                value=int(snap["draining"]))
        yield GaugeMetricFamily("snac_healthy", "1 while the engine worker is healthy (GET /healthz answers 200)",
                                value=int(snap["healthy"]))

        c = CounterMetricFamily("snac_sessions", "Sessions that held a slot, by kind and outcome (completed, "
                                                 "closed by the client, or the error code that ended them)",
                                labels=["kind", "outcome"])
        outcomes = snap["outcomes"]
        for kind in KINDS:
            for outcome in OUTCOMES:
                c.add_metric([kind, outcome], outcomes[kind, outcome])
        yield c
        c = CounterMetricFamily("snac_refusals", "Connections refused before they held a slot, by error code",
                                labels=["reason"])
        refusals = snap["refusals"]
        for reason in sorted({"server_full", "draining", "unauthorized", *refusals}):
            c.add_metric([reason], refusals[reason])
        yield c
        yield CounterMetricFamily("snac_behind_warnings", "'behind' warnings sent", value=snap["behind_warnings"])
        yield CounterMetricFamily("snac_received_bytes", "Message bytes received from clients",
                                  value=snap["bytes_in"])
        yield CounterMetricFamily("snac_sent_bytes", "Message bytes queued for clients", value=snap["bytes_out"])
        c = CounterMetricFamily("snac_engine_ticks", "Engine worker ticks", labels=self.per_device)
        for labels, ticks in zip(self.labels, snap["ticks"]):
            c.add_metric(labels, ticks)
        yield c

        backlog = GaugeMetricFamily("snac_input_backlog_items", "Client input received but not yet stepped through "
                                                                "the engine (samples, or tokens for decode), by kind",
                                    labels=["kind"])
        for kind in KINDS:
            backlog.add_metric([kind], snap["backlog_by_kind"][kind])
        yield backlog
        yield GaugeMetricFamily("snac_output_queue_bytes", "Output queued for clients, not yet sent",
                                value=snap["output_queue_bytes"])

        cuda = [(labels, torch.device(device)) for labels, device in zip(self.labels, self.devices)
                if device.startswith("cuda")]
        if cuda and torch.cuda.is_available():
            for name, doc, read in (
                    ("snac_gpu_memory_allocated_bytes", "CUDA memory allocated by tensors",
                     torch.cuda.memory_allocated),
                    ("snac_gpu_memory_reserved_bytes", "CUDA memory reserved by the caching allocator",
                     torch.cuda.memory_reserved)):
                g = GaugeMetricFamily(name, doc, labels=self.per_device)
                for labels, device in cuda:
                    g.add_metric(labels, read(device))
                yield g
