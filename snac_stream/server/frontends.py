"""Front-end processes: one server's websocket sessions spread over several processes, its engines in one.

One event loop carries the socket work of a few hundred real-time sessions at most (every 20 ms message is
parsed, converted and queued in Python; bench/RESULTS.md), while one GPU's engines compute thousands of
streams. ``serve --frontends N`` (:class:`MultiProcessServer`) therefore starts N front-end processes that
listen on the same port (``SO_REUSEPORT``: the kernel spreads new connections over them) and each run the
client-facing side of a server (:class:`~.app.FrontServer`: handshake, hello, reading, format conversion,
backpressure, output queues, the HTTP endpoints and the browser page), while this process keeps the model
and its engines (:class:`~.app.ModelEngines`) and serves the front ends (:class:`EngineHost`).

A front end's :class:`EngineLink` has the methods of :class:`~.worker.Workers`, so the connection side is
the same code whether its engines are in its own process or not. Each link is a Unix socket pair carrying
batches of pickled messages (:class:`Channel`: every message one loop iteration queues goes out in one
write), so the engine process handles a few batches per tick, not one message per client message:

* front end -> engine: ``place``, ``open``, ``input`` (samples or coarse frames as one buffer and its dtype,
  :func:`pack_input`, with the input count and receive time), ``end`` (a flush), ``abort``, ``release``, and
  ``metrics`` (a scrape of any front end is rendered by the engine process from every process's counters,
  :mod:`.metrics`);
* engine -> front end: ``events`` (a tick's output frames and errors for that front end's sessions, and how
  much of each session's input the engines consumed, for backpressure), ``status`` (free slots and health,
  on every change and twice a second, for ``/readyz`` and ``/healthz``), replies, and the server's own
  requests (``snapshot`` of a front end's counters, ``drain``, ``hurry``, ``stop``).

Slots are counted in the engine process alone, so ``--max-sessions`` holds for the whole server. Times
cross processes as they are: ``time.perf_counter`` is the system's monotonic clock on Linux.

If the engine process dies, every front end ends its sessions and exits; if a front end dies, its sessions
are dropped from the engines (their clients see the connection close) and another process takes its place
(one that dies before it listens is not started again: ``/healthz`` then answers 503 on the others).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..model.snac import SNACModel
from ..protocol import ProtocolError
from ..tokens import get_layout
from .app import FrontServer, ModelEngines, ServerLifecycle, readiness
from .heap import freeze_heap, thaw_heap
from .metrics import engine_snapshot, front_snapshot, merge_snapshots
from .options import ServedModel, ServerOptions
from .session import Events, Session
from .stats import new_stats

log = logging.getLogger("snac_stream.server")

_HEADER = struct.Struct("<Q")  # a batch's length in bytes
END_ERROR = "end_error"  # stands for the session's own end_error in an event (the loop tests it by identity)
STATUS_EVERY_S = 0.5  # the engine process tells every front end its slots and health at least this often
# A front end's messages to the engine process wait this long for others to share their write: a write is a
# system call, which at one message a batch cost a front end more than all its websocket parsing (py-spy,
# bench/RESULTS.md); a step is 85 ms, so the input is as timely. The engine's side writes once a tick anyway.
INPUT_COALESCE_S = 0.002
START_TIMEOUT_S = 300.0  # a front end must be listening within this (it imports torch: seconds)


def pack_input(item: np.ndarray) -> Tuple[pickle.PickleBuffer, str]:
    """A piece of input (samples, or coarse frames flattened: one 1-D array) as an ``input`` message carries it:
    its buffer, pickled as it is, and its dtype. A numpy array pickles through its reduce protocol at some
    microseconds each, which for thousands of sessions' steps a tick cost the engine process's event loop
    (and so its engine thread, under one interpreter lock) more than the rest of the link (bench/link_cost.py);
    a buffer is one memory copy each way."""
    if not (item.flags.c_contiguous and item.flags.writeable):  # a read-only buffer would arrive read-only
        item = item.copy()
    return pickle.PickleBuffer(item), item.dtype.str


_DTYPES: Dict[str, np.dtype] = {}


def unpack_input(data: bytearray, dtype: str) -> np.ndarray:
    """:func:`pack_input`'s message back to the array (writable: it owns the unpickled buffer)."""
    kind = _DTYPES.get(dtype)
    if kind is None:
        kind = _DTYPES[dtype] = np.dtype(dtype)
    return np.frombuffer(data, kind)


class Channel(asyncio.Protocol):
    """Length-prefixed pickled batches over a stream socket, both ways. :meth:`send` queues a message; the
    messages queued during one loop iteration (or within ``coalesce_s`` of the first) go out together as one
    batch, one write. Each batch that arrives goes to ``on_batch`` (a list of messages, in order);
    ``on_close`` is called once the other side has gone. A protocol rather than stream reader: no future or
    task per batch, which counts at thousands a second."""

    def __init__(self, on_batch: Callable[[List[Tuple[Any, ...]]], None], on_close: Callable[[], None],
                 coalesce_s: float = 0.0):
        self.on_batch, self.on_close = on_batch, on_close
        self.coalesce_s = coalesce_s
        self._transport: Optional[asyncio.Transport] = None
        self._out: List[Any] = []
        self._in = bytearray()
        self._gone = asyncio.get_running_loop().create_future()  # done once the connection is lost

    @classmethod
    async def connect(cls, sock: socket.socket, on_batch: Callable[[List[Tuple[Any, ...]]], None],
                      on_close: Callable[[], None], coalesce_s: float = 0.0) -> "Channel":
        _, channel = await asyncio.get_running_loop().connect_accepted_socket(
            lambda: cls(on_batch, on_close, coalesce_s), sock)
        return channel

    # ---- asyncio.Protocol ----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._in
        buffer += data
        start = 0
        while len(buffer) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer, start)
            end = start + _HEADER.size + size
            if len(buffer) < end:
                break
            batch = pickle.loads(memoryview(buffer)[start + _HEADER.size:end])
            start = end
            self.on_batch(batch)
        del buffer[:start]

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if not self._gone.done():
            self._gone.set_result(None)
            self.on_close()

    # ---- sending ------------------------------------------------------------------------------------------
    def send(self, message: Tuple[Any, ...]) -> None:
        if not self._out:
            loop = asyncio.get_running_loop()
            if self.coalesce_s:
                loop.call_later(self.coalesce_s, self.flush)
            else:
                loop.call_soon(self.flush)
        self._out.append(message)

    def flush(self) -> None:
        """Write what is queued now (rather than at the end of this loop iteration)."""
        batch, self._out = self._out, []
        if batch and self._transport is not None and not self._transport.is_closing():
            data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
            self._transport.writelines((_HEADER.pack(len(data)), data))

    def eof_received(self) -> None:
        """The other side has closed its end: close ours (``connection_lost`` follows)."""

    def close(self) -> None:
        """Close after writing what is queued; the link is gone (:meth:`wait_closed`) once the other side has
        closed too. A half close, not a close: closing a Unix socket with unread data in it resets the
        connection, and the other side could lose the last messages written to it (a drain's reply)."""
        self.flush()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write_eof()

    async def wait_closed(self) -> None:
        await self._gone


class _Requests:
    """Requests with replies over a :class:`Channel`: ``(op, request id, *args)`` out, ``("reply", request id,
    value)`` back."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self._ids = itertools.count()
        self._waiting: Dict[int, asyncio.Future] = {}

    async def request(self, op: str, *args: Any) -> Any:
        rid = next(self._ids)
        future = self._waiting[rid] = asyncio.get_running_loop().create_future()
        self.channel.send((op, rid, *args))
        try:
            return await future
        finally:
            self._waiting.pop(rid, None)

    def reply(self, rid: int, value: Any) -> None:
        self.channel.send(("reply", rid, value))

    def replied(self, rid: int, value: Any) -> None:
        future = self._waiting.get(rid)
        if future is not None and not future.done():
            future.set_result(value)

    def fail_all(self, exc: BaseException) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(exc)


def _as_protocol_error(exc: BaseException) -> ProtocolError:
    if isinstance(exc, ProtocolError):
        return exc
    log.error("engine process: a session's request failed", exc_info=exc)
    return ProtocolError("internal_error", f"internal error: {type(exc).__name__}")


# ---- the front end's side ---------------------------------------------------------------------------------
class EngineLink:
    """A front end's way to the engines in the engine process, with the methods of :class:`~.worker.Workers`
    (place, open, deliver, end_stream, abort, release, slots, health...), so :class:`~.connection.Gateway`
    and :class:`~.app.FrontServer` use it as they use the workers of their own process.

    ``on_request(op, rid, args)`` answers the server's requests (``snapshot``, ``drain``, ``hurry``,
    ``stop``); ``on_lost()`` is called once if the engine process goes away.
    """

    def __init__(self, slots_per_device: int, devices: int):
        self.channel: Channel = None  # type: ignore[assignment]  # set by connect()
        self.requests: _Requests = None  # type: ignore[assignment]
        self.slots_per_device = slots_per_device
        self.devices = devices
        self._slots_free = [slots_per_device] * devices
        self._sessions_open = [0] * devices
        self._health: Tuple[bool, str] = (False, "engine process not heard from yet")
        self._status_at = time.monotonic()
        self._sessions: Dict[int, Session] = {}
        self._sink: Callable[[Events], None] = lambda events: None
        self.lost = False
        self.on_request: Callable[[str, int, Tuple[Any, ...]], None] = lambda op, rid, args: None
        self.on_lost: Callable[[], None] = lambda: None

    # ---- what the server reads ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.devices

    @property
    def slots(self) -> int:
        return self.slots_per_device * self.devices

    def slots_free(self) -> List[int]:
        return list(self._slots_free)

    def sessions_open(self) -> List[int]:
        return list(self._sessions_open)

    def health(self, stuck_after_s: float) -> Tuple[bool, str]:
        """The engine process's health as it last told it (:meth:`~.worker.Workers.health`), if it did recently."""
        if self.lost:
            return False, "engine process gone"
        if time.monotonic() - self._status_at > max(stuck_after_s, 2 * STATUS_EVERY_S):
            return False, f"engine process silent for {time.monotonic() - self._status_at:.1f} s"
        return self._health

    # ---- a session's work -------------------------------------------------------------------------------
    async def place(self, session: Session) -> bool:
        self._sessions[session.number] = session
        placed = await self.requests.request("place", session.number)
        if placed is None:
            self._sessions.pop(session.number, None)
            return False
        session.placement = placed
        return True

    def release(self, session: Session) -> None:
        if self._sessions.pop(session.number, None) is not None:
            self.channel.send(("release", session.number))

    async def open(self, session: Session) -> None:
        error = await self.requests.request("open", session.number, session.hello, session.audio_format)
        if error is not None:
            raise error

    def abort(self, session: Session) -> None:
        self.channel.send(("abort", session.number))

    def deliver(self, session: Session, item: Any, now: float) -> None:
        self.channel.send(("input", session.number, *pack_input(item), session.loop.received, now))

    async def end_stream(self, session: Session) -> None:
        await self.requests.request("end", session.number, session.flush_at, session.end_error)

    # ---- the link ---------------------------------------------------------------------------------------
    async def connect(self, sock: socket.socket) -> None:
        """Take ``sock`` (this front end's end of the socket pair) as the link."""
        self.channel = await Channel.connect(sock, self._take_batch, self._lost, coalesce_s=INPUT_COALESCE_S)
        self.requests = _Requests(self.channel)

    def start(self, sink: Callable[[Events], None]) -> None:
        self._sink = sink

    async def stop(self) -> None:
        """Nothing to stop: the front end's process closes the link when it ends (after its last reply)."""

    def _lost(self) -> None:
        self.lost = True
        self.requests.fail_all(ProtocolError("going_away", "the server's engine process ended"))
        self.on_lost()

    def _take_batch(self, batch: List[Tuple[Any, ...]]) -> None:
        for message in batch:
            try:
                self._dispatch(message)
            except Exception:  # a bug: logged; the link and the other messages go on
                log.exception("front end: a message from the engine process failed (%s)", message[0])

    def _dispatch(self, message: Tuple[Any, ...]) -> None:
        op = message[0]
        if op == "events":
            _, events, consumed = message
            sessions = self._sessions
            for number, count in consumed:
                session = sessions.get(number)
                if session is not None:
                    session.consumed = count
            batch: Events = []
            for number, item in events:
                session = sessions.get(number)
                if session is not None:
                    batch.append((session, session.end_error if item == END_ERROR else item))
            self._sink(batch)
        elif op == "reply":
            self.requests.replied(message[1], message[2])
        elif op == "status":
            _, self._slots_free, self._sessions_open, self._health = message
            self._status_at = time.monotonic()
        else:
            self.on_request(op, message[1], message[2:])


# ---- the engine process's side ----------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class _FrontEnd:
    """The engine process's record of one front end."""

    index: int
    listening: asyncio.Future  # the port, once the front end listens
    channel: Channel = None  # type: ignore[assignment]  # set once connected
    requests: _Requests = None  # type: ignore[assignment]
    sessions: Dict[int, Session] = dataclasses.field(default_factory=dict)
    consumed_sent: Dict[int, int] = dataclasses.field(default_factory=dict)
    gone: bool = False
    replacing: bool = False  # gone, and a new process for its index is starting


class EngineHost:
    """Serves the front ends' links in the engine process: applies their sessions' operations to the
    ``workers`` (placement, streams, input, ends) and sends each front end its sessions' events."""

    def __init__(self, workers: Any, served: ServedModel, options: ServerOptions):
        self.workers = workers
        self.served = served
        self.options = options
        self.front_ends: List[_FrontEnd] = []
        self._owners: Dict[Session, _FrontEnd] = {}  # every placed session's front end
        self._tasks: set = set()
        self._status: Optional[asyncio.Task] = None
        self.draining = False
        # Called when a front end that was listening goes (not at stop): MultiProcessServer starts another.
        self.on_lost_front_end: Callable[[_FrontEnd], None] = lambda front: None

    async def add(self, index: int, sock: socket.socket) -> _FrontEnd:
        """Serve the front end at the other end of ``sock`` (in place of a gone one of the same index)."""
        front = _FrontEnd(index, asyncio.get_running_loop().create_future())
        front.channel = await Channel.connect(sock, lambda batch: self._take_batch(front, batch),
                                              lambda: self._gone(front))
        front.requests = _Requests(front.channel)
        self.front_ends = [f for f in self.front_ends if f.index != index] + [front]
        return front

    def start(self) -> None:
        self.workers.start(self._take_events)
        self._status = asyncio.ensure_future(self._tell_status_often())

    async def stop(self) -> None:
        tasks = [t for t in (self._status, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.workers.stop()

    @property
    def sessions(self) -> int:
        return sum(len(front.sessions) for front in self.front_ends)

    def health(self) -> Tuple[bool, str]:
        gone = [front.index for front in self.front_ends if front.gone and not front.replacing]
        if gone:
            return False, f"front end {gone[0]} gone"
        return self.workers.health(self.options.stuck_tick_s)

    def readiness(self) -> Tuple[bool, str]:
        return readiness(self.draining, self.workers.slots_free(), self.health)

    # ---- status -----------------------------------------------------------------------------------------
    def _status_message(self) -> Tuple[Any, ...]:
        return "status", self.workers.slots_free(), self.workers.sessions_open(), self.health()

    def tell_status(self) -> None:
        message = self._status_message()
        for front in self.front_ends:
            if not front.gone:
                front.channel.send(message)

    async def _tell_status_often(self) -> None:
        while True:
            self.tell_status()
            await asyncio.sleep(STATUS_EVERY_S)

    # ---- requests of the front ends ---------------------------------------------------------------------
    def _take_batch(self, front: _FrontEnd, batch: List[Tuple[Any, ...]]) -> None:
        try:
            for message in batch:
                self._handle(front, message)
        except Exception:  # a bug: this front end's sessions go; the others are served on
            log.exception("engine process: front end %d's link failed", front.index)
            front.channel.close()

    def _gone(self, front: _FrontEnd) -> None:
        """The front end's link has closed (it ended, or died)."""
        front.gone = True
        listened = front.listening.done()
        if not listened:
            front.listening.set_exception(RuntimeError(f"front end {front.index} ended before it listened"))
            front.listening.exception()  # retrieved: whoever waits for it sees it too
        front.requests.fail_all(ConnectionError(f"front end {front.index} gone"))
        if front.sessions:
            log.error("front end %d gone: dropping its %d sessions", front.index, len(front.sessions))
        for session in list(front.sessions.values()):
            self.workers.abort(session)
            self.workers.release(session)
            self._owners.pop(session, None)
        front.sessions.clear()
        if listened:  # one that never listened is not started again: it would fail the same way
            self.on_lost_front_end(front)
        self.tell_status()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _handle(self, front: _FrontEnd, message: Tuple[Any, ...]) -> None:
        op = message[0]
        if op == "input":
            _, number, data, dtype, received, now = message
            session = front.sessions.get(number)
            if session is not None:
                session.loop.received = received
                self.workers.deliver(session, unpack_input(data, dtype), now)
        elif op == "place":
            self._place(front, message[1], message[2])
        elif op == "open":
            self._spawn(self._open(front, *message[1:]))
        elif op == "end":
            self._spawn(self._end(front, *message[1:]))
        elif op == "abort":
            session = front.sessions.get(message[1])
            if session is not None:
                self.workers.abort(session)
        elif op == "release":
            session = front.sessions.pop(message[1], None)
            front.consumed_sent.pop(message[1], None)
            if session is not None:
                self.workers.release(session)
                self._owners.pop(session, None)
                self.tell_status()
        elif op == "reply":
            front.requests.replied(message[1], message[2])
        elif op == "listening":
            if not front.listening.done():
                front.listening.set_result(message[1])
        elif op == "metrics":
            self._spawn(self._metrics(front, message[1]))
        else:
            log.error("engine process: unknown message %r from front end %d", op, front.index)

    def _place(self, front: _FrontEnd, rid: int, number: int) -> None:
        session = Session(None, number)  # type: ignore[arg-type]  # the engine side of the front end's session
        placed = self.workers.take_slot(session)
        if placed:
            front.sessions[number] = session
            self._owners[session] = front
            self.tell_status()
        front.requests.reply(rid, session.placement if placed else None)

    async def _open(self, front: _FrontEnd, rid: int, number: int, hello: Any, audio_format: str) -> None:
        session = front.sessions.get(number)
        try:
            if session is None:
                raise ProtocolError("internal_error", "internal error: session not placed")
            session.hello, session.audio_format = hello, audio_format
            session.layout = get_layout(hello.token_layout, self.served.config, token_offset=hello.token_offset)
            await self.workers.open(session)
        except Exception as exc:  # noqa: BLE001 - told to the front end, which fails the session
            front.requests.reply(rid, _as_protocol_error(exc))
        else:
            front.requests.reply(rid, None)

    async def _end(self, front: _FrontEnd, rid: int, number: int, flush_at: Any, end_error: Any) -> None:
        session = front.sessions.get(number)
        if session is not None:
            session.flush_at, session.end_error = flush_at, end_error
            await self.workers.end_stream(session)
        front.requests.reply(rid, None)  # after the tick's events, which hold the end's output and done

    async def _metrics(self, front: _FrontEnd, rid: int) -> None:
        try:
            front.requests.reply(rid, self.metrics_snapshot_text(await self.snapshots()))
        except Exception as exc:  # noqa: BLE001
            log.exception("engine process: metrics failed")
            front.requests.reply(rid, _as_protocol_error(exc))

    async def snapshots(self) -> List[Dict[str, Any]]:
        """Every live front end's counters (:func:`~.metrics.front_snapshot`); one that does not answer within
        a second is left out."""
        live = [front for front in self.front_ends if not front.gone]
        asks = [asyncio.wait_for(front.requests.request("snapshot"), 1.0) for front in live]
        answers = await asyncio.gather(*asks, return_exceptions=True)
        return [answer for answer in answers if isinstance(answer, dict)]

    metrics_snapshot_text: Callable[[List[Dict[str, Any]]], bytes]  # set by MultiProcessServer

    # ---- events of the engines' ticks ---------------------------------------------------------------------
    def _take_events(self, events: Events) -> None:
        """A worker's tick: each front end gets its sessions' events and consumed input in one message."""
        by_front: Dict[int, List[Tuple[int, Any]]] = {}
        for session, item in events:
            front = self._owners.get(session)
            if front is None:  # released meanwhile
                continue
            if item is session.end_error and item is not None:
                item = END_ERROR
            by_front.setdefault(front.index, []).append((session.number, item))
        for front in self.front_ends:
            if front.gone or not front.sessions:
                continue
            sent = front.consumed_sent
            consumed = [(number, s.consumed) for number, s in front.sessions.items()
                        if sent.get(number) != s.consumed]
            for number, count in consumed:
                sent[number] = count
            mine = by_front.get(front.index, [])
            if mine or consumed:
                front.channel.send(("events", mine, consumed))


# ---- the server -------------------------------------------------------------------------------------------
def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with ``SO_REUSEPORT`` but not listening: it holds the port (a free one
    for ``port`` 0) for the front ends to listen on beside it, and takes no connection itself."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


class MultiProcessServer(ServerLifecycle):
    """:class:`~.app.SNACServer`'s service with its client side in ``frontends`` processes (module docstring):
    same options, same protocol, same endpoints on one port; ``--max-sessions`` per device for the whole
    server. Use ``async with MultiProcessServer(model, options, frontends=4) as server:``.

    This process holds the model, the engines (``workers``, ``engine_sets``) and the engine-side counters
    (``stats``: ticks, their durations, 'behind' warnings); :meth:`front_stats` adds up the front ends'.
    """

    def __init__(self, model: SNACModel, options: Optional[ServerOptions] = None, *, frontends: int,
                 model_name: Optional[str] = None, random_weights: bool = False,
                 devices: Optional[Sequence[Union[str, torch.device]]] = None, log_level: int = logging.WARNING):
        if frontends < 1:
            raise ValueError(f"frontends must be at least 1, got {frontends}")
        self.options = options or ServerOptions()
        self.options.check()
        self.frontends = frontends
        self.log_level = log_level
        self.stats = new_stats()
        built = ModelEngines(model, self.options, self.stats, model_name=model_name, random_weights=random_weights,
                             devices=devices)
        self.model, self.model_name, self.random_weights = built.model, built.model_name, random_weights
        self.engine_sets, self.devices, self.threads = built.engine_sets, built.devices, built.threads
        self.step_frames, self.step_samples, self.latency = built.step_frames, built.step_samples, built.latency
        self.served, self.workers, self.metrics = built.served, built.workers, built.metrics
        self.host = EngineHost(self.workers, self.served, self.options)
        self.host.metrics_snapshot_text = self._render_metrics
        self.host.on_lost_front_end = self._replace
        self.processes: List[multiprocessing.process.BaseProcess] = []
        self.replaced = 0  # front ends started again after theirs went
        self._generations: List[int] = [0] * frontends  # processes started for each index so far, less one
        self._front_options: Optional[ServerOptions] = None
        self.port: Optional[int] = None
        self._reserved: Optional[socket.socket] = None
        self._stopped = False
        self._closed: Optional[asyncio.Event] = None

    # ---- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> "MultiProcessServer":
        """Start the engine workers and the front ends; returns once every front end listens."""
        self._closed = asyncio.Event()
        self._reserved = reserve_port(self.options.host, self.options.port)
        self.port = self._reserved.getsockname()[1]
        self._front_options = dataclasses.replace(self.options, port=self.port)
        self.host.start()
        for index in range(self.frontends):
            self.processes.append(await self._start_front_end(index))
        try:
            for front in self.host.front_ends:
                await asyncio.wait_for(front.listening, START_TIMEOUT_S)
        except BaseException:
            await self.stop()
            raise
        self.host.tell_status()
        freeze_heap()  # as SNACServer.start: the model and engines live as long as the server
        return self

    async def _start_front_end(self, index: int) -> multiprocessing.process.BaseProcess:
        ours, theirs = socket.socketpair()
        # Session numbers stay unique across a front end's replacements: each process numbers from its own
        # (index, generation) block.
        first = index + 1 + self.frontends * (self._generations[index] << 32)
        process = multiprocessing.get_context("spawn").Process(
            target=_front_end_process, name=f"snac-front-{index}", daemon=True,
            args=(index, (first, self.frontends), theirs, self.served, self._front_options, len(self.engine_sets),
                  self.log_level))
        process.start()
        theirs.close()
        await self.host.add(index, ours)
        return process

    def _replace(self, front: _FrontEnd) -> None:
        """A listening front end went (killed, crashed): start another in its place, unless stopping."""
        if self._stopped or self.host.draining:
            return
        front.replacing = True
        self.host._spawn(self._restart(front.index))

    async def _restart(self, index: int) -> None:
        old = self.processes[index]
        await asyncio.to_thread(old.join, 5.0)
        log.error("front end %d (pid %s) ended with exit code %s: starting another", index, old.pid, old.exitcode)
        self._generations[index] += 1
        self.processes[index] = await self._start_front_end(index)
        front = next(f for f in self.host.front_ends if f.index == index)
        try:
            await asyncio.wait_for(asyncio.shield(front.listening), START_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - it stays gone: /healthz says so
            log.error("front end %d did not start again: %s", index, exc)
            return
        self.replaced += 1
        self.host.tell_status()

    async def stop(self) -> None:
        """Close every connection (1001) and end the front ends, then the engines. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self._ask_all("stop", timeout=10.0)
        for process in self.processes:
            await asyncio.to_thread(process.join, 10.0)
            if process.is_alive():
                process.kill()
        await self.host.stop()
        for front in self.host.front_ends:
            front.channel.close()
        if self._reserved is not None:
            self._reserved.close()
        if self._closed is not None:
            self._closed.set()
        thaw_heap()

    async def serve_forever(self) -> None:
        assert self._closed is not None, "call start() first"
        await self._closed.wait()

    @property
    def active_sessions(self) -> int:
        return self.host.sessions

    def health(self) -> Tuple[bool, str]:
        return self.host.health()

    def readiness(self) -> Tuple[bool, str]:
        if self.port is None or self._stopped:
            return False, "starting" if self.port is None else "stopped"
        return self.host.readiness()

    # ---- operations -----------------------------------------------------------------------------------
    async def drain(self, timeout: float) -> Dict[str, Any]:
        """Every front end drains as :meth:`~.app.FrontServer.drain` does, at once; then :meth:`stop`. Returns
        what happened, added up."""
        t0 = time.monotonic()
        self.host.draining = True
        summaries = await self._ask_all("drain", timeout, timeout=timeout + 30.0)
        await self.stop()
        return {"sessions_open_at_start": sum(s["sessions_open_at_start"] for s in summaries),
                "sessions_ended_at_timeout": sum(s["sessions_ended_at_timeout"] for s in summaries),
                "seconds": round(time.monotonic() - t0, 3)}

    def hurry(self) -> None:
        """End a drain under way now."""
        for front in self.host.front_ends:
            if not front.gone:
                front.channel.send(("hurry", 0))

    async def front_stats(self) -> Dict[str, Any]:
        """The front ends' counters added up (:func:`~.metrics.front_snapshot`)."""
        return merge_snapshots(await self.host.snapshots())

    async def _ask_all(self, op: str, *args: Any, timeout: float) -> List[Any]:
        live = [front for front in self.host.front_ends if not front.gone]
        answers = await asyncio.gather(*[asyncio.wait_for(front.requests.request(op, *args), timeout)
                                         for front in live], return_exceptions=True)
        return [answer for answer in answers if not isinstance(answer, BaseException)]

    def _render_metrics(self, fronts: List[Dict[str, Any]]) -> bytes:
        snapshot = merge_snapshots([*fronts, engine_snapshot(self.workers, self.stats, self.options.stuck_tick_s)])
        snapshot["healthy"] = snapshot["healthy"] and self.health()[0]
        snapshot["ready"] = self.readiness()[0] and not snapshot["draining"]
        return self.metrics.render(snapshot)


# ---- a front end's process --------------------------------------------------------------------------------
class _FrontEndServer(FrontServer):
    """A front end: ``/metrics`` is rendered by the engine process, for the whole server."""

    async def metrics_text(self) -> bytes:
        text = await self.workers.requests.request("metrics")
        if isinstance(text, BaseException):
            raise text
        return text


def _front_end_process(index: int, numbering: Tuple[int, int], sock: socket.socket, served: ServedModel,
                       options: ServerOptions, devices: int, log_level: int) -> None:
    # The server's own process handles signals and tells the front ends (drain, stop): a Ctrl-C reaches the
    # whole process group, which must not end them behind its back.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    logging.basicConfig(level=log_level, format=f"%(asctime)s front {index}: %(message)s")
    asyncio.run(_front_end(numbering, sock, served, options, devices))


async def _front_end(numbering: Tuple[int, int], sock: socket.socket, served: ServedModel, options: ServerOptions,
                     devices: int) -> None:
    stats = new_stats()
    link = EngineLink(options.max_sessions, devices)
    await link.connect(sock)
    channel = link.channel
    server = _FrontEndServer(served, options, link, stats, reuse_port=True, numbering=numbering)
    finished = asyncio.Event()
    tasks: set = set()

    async def drain(rid: int, timeout: float) -> None:
        link.requests.reply(rid, await server.drain(timeout))
        finished.set()

    async def stop(rid: int) -> None:
        await server.stop()
        link.requests.reply(rid, None)
        finished.set()

    def on_request(op: str, rid: int, args: Tuple[Any, ...]) -> None:
        if op == "snapshot":
            link.requests.reply(rid, front_snapshot(server.gateway, stats))
        elif op == "drain":
            tasks.add(asyncio.ensure_future(drain(rid, *args)))
        elif op == "stop":
            tasks.add(asyncio.ensure_future(stop(rid)))
        elif op == "hurry":
            server.hurry()
        else:
            log.error("unknown request %r from the engine process", op)

    def on_lost() -> None:
        if not finished.is_set():
            log.error("the engine process is gone: ending this front end's sessions")
            server.gateway.go_away()
            finished.set()

    link.on_request, link.on_lost = on_request, on_lost
    await server.start()
    channel.send(("listening", server.port))
    await finished.wait()
    await server.stop()
    channel.close()
    try:
        await asyncio.wait_for(channel.wait_closed(), 5.0)  # the last replies written
    except asyncio.TimeoutError:
        pass
    os._exit(0)  # the process's work is done; skip interpreter teardown (torch's can take seconds)
