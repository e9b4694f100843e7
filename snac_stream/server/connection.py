"""The connection side, on the event loop: handshake, hello check, the read loop, backpressure, output queues.

Bounds (see :class:`~.options.ServerOptions`): a session's unprocessed input (``max_backlog_s``) -- past it
the server stops reading that socket, so a client sending faster than the engine computes is slowed by TCP
flow control; its queued output -- past half of ``max_output_bytes`` the server stops reading too, and a
client none of whose output goes out for ``idle_timeout_s`` (its own: the engine steps every session causes do
not count), or whose queue passes the whole bound, is dropped as a slow consumer, and one whose socket closed
meanwhile ends at once; the message size (``max_frame_bytes``, in bytes: UTF-8 for text); the number of
sessions (``max_sessions`` per device: a new session takes a slot on the device with the most free ones,
:class:`~.worker.Workers`); and ``idle_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Dict, Optional, Set, Tuple, Union

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from .. import __version__
from ..llm import LLMStreamError, LLMTokenError, LLMTruncatedError, SpeechStats
from ..protocol import Hello, ProtocolError, Ready, decode_tokens, parse_json
from ..tokens import get_layout
from .conversion import SessionFormats
from .llm import LLMSource, progress_message
from .options import ServedModel, ServerOptions, token_accepted
from .session import Events, Session, message_bytes
from .worker import Workers

log = logging.getLogger("snac_stream.server")


async def _receive_within(ws: ServerConnection, seconds: Optional[float]) -> Union[str, bytes]:
    """``ws.recv()``, ``asyncio.TimeoutError`` after ``seconds`` (None: no limit). ``asyncio.timeout`` costs a
    timer; ``wait_for`` before Python 3.12 a task as well, some 10 us on every client message."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await ws.recv()
    return await asyncio.wait_for(ws.recv(), seconds)  # Python 3.10


async def _close_or_abort(ws: ServerConnection, code: int, reason: str, timeout_s: float = 1.0) -> None:
    """Send a close frame; drop the TCP connection if the peer does not answer in time."""
    try:
        await asyncio.wait_for(ws.close(code, reason), timeout_s)
    except (asyncio.TimeoutError, ConnectionClosed, OSError):
        ws.transport.abort()


class Gateway:
    """Serves each websocket connection as one session, its engine work done by the worker of the device it
    is placed on (``workers``: this process's :class:`~.worker.Workers`, or a front end's link to the engine
    process, :class:`~.frontends.EngineLink`)."""

    def __init__(self, served: ServedModel, options: ServerOptions, workers: Workers, stats: Dict[str, Any], *,
                 numbering: Tuple[int, int] = (1, 1)):
        self.served = served
        self.options = options
        self.workers = workers
        self.stats = stats
        self.sessions: Set[Session] = set()
        self.connections: Set[Session] = set()  # every handler under way, with a slot or not
        self.draining = False  # no new sessions (refused with `draining`); open ones finish
        self.server_id: Optional[str] = None  # told in `ready`
        self._next_number, self._number_step = numbering  # session numbers: first, step (several front ends)
        self._backlog_limits: Dict[str, int] = {}
        self._changed = asyncio.Event()

    async def wait_sessions(self, at_most: int) -> None:
        """Return once no more than ``at_most`` sessions hold a slot."""
        while len(self.sessions) > at_most:
            self._changed.clear()
            await self._changed.wait()

    async def wait_idle(self) -> None:
        """Return once no connection handler is under way (every session ended and its output sent), leaving
        out connections that have sent nothing yet: they hold no slot, and one idle until its hello times out
        would hold a drain up for nothing (:meth:`go_away` or the server's stop closes them)."""
        while any(not session.loop.awaiting_hello for session in self.connections):
            self._changed.clear()
            await self._changed.wait()

    def go_away(self) -> int:
        """End every session now with ``going_away`` (close 1001), and close connections that have no session
        yet (1001 too); returns the sessions ended."""
        ended = 0
        for session in list(self.connections):
            if session in self.sessions:
                self.fail(session, ProtocolError("going_away", "the server is shutting down"))
                ended += 1
            elif not session.loop.dead and session.hello is None:  # still before its hello
                asyncio.ensure_future(_close_or_abort(session.loop.ws, 1001, "going_away"))
        return ended

    def _drop(self, session: Session) -> None:
        self.sessions.discard(session)
        self.workers.release(session)
        self._changed.set()

    @staticmethod
    def check_request(connection: ServerConnection, request: Any) -> None:
        """The websocket handshake's request hook: the bearer header is an alternative to ``hello.auth``;
        remember it for the hello check."""
        header = request.headers.get("Authorization", "")
        connection.bearer = header[7:] if header.startswith("Bearer ") else None  # type: ignore[attr-defined]

    # ---- one connection ---------------------------------------------------------------------------------
    async def handle(self, ws: ServerConnection) -> None:
        """The connection handler: hello, ready, input until flush or close, the stream's end."""
        session = Session(ws, self._next_number)
        self._next_number += self._number_step
        side = session.loop
        opened = completed = False
        self.connections.add(session)
        try:
            try:
                first = await self._recv(session, expect_text=True)
            finally:
                side.awaiting_hello = False  # a hello, a refusal or a close to finish: a drain waits for it
            hello = Hello.from_text(first)
            formats, session.llm = self._check_hello(ws, hello)
            if self.draining:
                raise ProtocolError("draining", "the server is shutting down and takes no new sessions; "
                                                "connect again (elsewhere)")
            if not await self.workers.place(session):
                raise ProtocolError("server_full", f"all {self.workers.slots} sessions are in use; "
                                                   "try again later")
            session.hello, session.formats, session.audio_format = hello, formats, formats.engine_format
            session.layout = get_layout(hello.token_layout, self.served.config, token_offset=hello.token_offset)
            if hello.kind == "decode":
                side.parser = session.layout.parser()
            self.sessions.add(session)
            self.stats["sessions"] += 1
            await self.workers.open(session)
            opened = True
            side.writer = asyncio.create_task(side.write_loop())
            self.send(session, self._ready(session).to_json())
            if await (self._llm_loop(session) if session.llm is not None else self._read_loop(session)):
                await self.workers.end_stream(session)
                await formats.drained()  # the output still being converted, `done` last
                if not side.dead:  # not failed on the way
                    self.stats["completed"] += 1
                    completed = True
        except ProtocolError as exc:
            self.fail(session, exc)
        except ConnectionClosed:
            pass  # abrupt disconnect: nothing to tell; the slot is freed below
        except Exception as exc:  # a bug: tell the client, keep serving the others
            log.exception("session %d failed", session.number)
            self.fail(session, ProtocolError("internal_error", f"internal error: {type(exc).__name__}"))
        finally:
            error = side.error.code if side.error is not None else None
            if opened:
                self.stats["outcomes"][session.kind, "completed" if completed else error or "closed"] += 1
            elif error is not None:
                self.stats["refusals"][error] += 1
            if opened and not side.dead:
                self._release(session)
            side.dead = True
            self._drop(session)
            if side.writer is not None:
                # Ends the writer after what is queued (a no-op close if an error close is queued first).
                side.queue_close(1000, "done")
                try:
                    await side.writer
                except asyncio.CancelledError:
                    pass
            elif side.error is not None:  # failed before the writer started: send the error directly
                try:
                    await ws.send(side.error.to_json())
                    await ws.close(side.error.close_code, side.error.code)
                except ConnectionClosed:
                    pass
            self.connections.discard(session)
            self._changed.set()

    def _check_hello(self, ws: ServerConnection, hello: Hello) -> Tuple[SessionFormats, Optional[LLMSource]]:
        """The hello's auth, formats (returned with their converters), token layout and LLM (returned as the
        request to make, or None), or a ``ProtocolError``."""
        if not token_accepted(self.options, hello.auth or getattr(ws, "bearer", None)):
            raise ProtocolError("unauthorized", "missing or wrong auth token")
        formats = SessionFormats(hello, self.served.config.sampling_rate)
        try:
            get_layout(hello.token_layout, self.served.config, token_offset=hello.token_offset)
        except ValueError as exc:
            raise ProtocolError("bad_hello", str(exc)) from None
        llm = LLMSource.from_hello(hello.llm, self.options) if hello.llm is not None else None
        return formats, llm

    def _ready(self, session: Session) -> Ready:
        served, layout, hello, opts, formats = self.served, session.layout, session.hello, self.options, session.formats
        cfg = served.config
        assert layout is not None and hello is not None and formats is not None
        backlog = self._backlog_limit(hello.kind)
        return Ready(
            kind=hello.kind, model=served.name, sample_rate=cfg.sampling_rate, sample_format=hello.sample_format,
            hop_samples=cfg.hop_length, frame_samples=cfg.frame_samples, step_samples=served.step_samples,
            step_frames=served.step_frames, n_codebooks=cfg.n_codebooks, codebook_size=cfg.codebook_size,
            token_layout={"name": layout.name, "frame_tokens": layout.frame_tokens,
                          "token_offset": layout.token_offset, "order": [list(o) for o in layout.order],
                          "id_offsets": [layout.id_offset(p) for p in range(layout.frame_tokens)]},
            algorithmic_latency_samples=served.latency[hello.kind] + formats.added_latency,
            limits={"max_frame_bytes": opts.max_frame_bytes, "idle_timeout_s": opts.idle_timeout_s,
                    "max_backlog_samples": backlog if hello.kind != "decode" else None,
                    "max_backlog_tokens": backlog if hello.kind == "decode" else None,
                    "max_output_bytes": opts.max_output_bytes, "max_sessions": self.workers.slots,
                    "max_sessions_per_device": opts.max_sessions},
            session=session.number, server=f"snac-stream {__version__}", random_weights=served.random_weights,
            server_id=self.server_id, llm=session.llm.ready_fields() if session.llm is not None else None,
            **formats.ready_fields())

    def _backlog_limit(self, kind: str) -> int:
        """Unprocessed input items (samples, or tokens for decode) past which the server stops reading."""
        limit = self._backlog_limits.get(kind)
        if limit is None:  # computed once per kind: the read loop asks before every message
            served = self.served
            steps = max(1, math.ceil(self.options.max_backlog_s * served.config.sampling_rate / served.step_samples))
            limit = (steps * served.step_frames * len(get_layout("interleaved", served.config).order)
                     if kind == "decode" else steps * served.step_samples)
            self._backlog_limits[kind] = limit
        return limit

    async def _recv(self, session: Session, expect_text: bool = False, idle: bool = True) -> Union[str, bytes]:
        """The client's next message; ``idle_timeout`` after ``idle_timeout_s`` without one (unless not ``idle``)."""
        try:
            message = await _receive_within(session.loop.ws, self.options.idle_timeout_s if idle else None)
        except asyncio.TimeoutError:
            raise ProtocolError("idle_timeout", f"nothing received for {self.options.idle_timeout_s:g} s") from None
        size = message_bytes(message)
        self.stats["bytes_in"] += size
        if size > self.options.max_frame_bytes:
            raise ProtocolError("frame_too_big", f"a message of {size} bytes is over the limit of "
                                                 f"{self.options.max_frame_bytes} bytes")
        if expect_text and not isinstance(message, str):
            raise ProtocolError("bad_data_type", "the first message must be a JSON text hello, got a binary frame")
        return message

    async def _wait_for_room(self, session: Session) -> None:
        """Backpressure: wait while the engine is behind the session's input or its client is slow to read its
        output (a client's socket is not read meanwhile, so TCP flow control slows it down; an LLM's stream is
        not read either). ``slow_consumer`` if no output went out for ``idle_timeout_s``."""
        side = session.loop
        limit = self._backlog_limit(session.kind)
        out_limit = self.options.max_output_bytes // 2
        idle = self.options.idle_timeout_s
        stalled_since: Optional[float] = None  # when this wait first saw the queue past half
        while not side.dead and not side.peer_gone and (side.received - session.consumed > limit
                                                        or side.out_bytes > out_limit):
            timeout = None  # the engine's steps wake a wait for the backlog
            if side.out_bytes > out_limit:
                now = time.monotonic()
                stalled_since = now if stalled_since is None else stalled_since
                # Counted from this client's own last output: every engine tick sets `progress`, so a
                # busy server would otherwise restart the wait forever.
                timeout = max(stalled_since, side.sent_at) + idle - now
                if timeout <= 0:
                    raise ProtocolError("slow_consumer", f"the client has not read its output for {idle:g} s")
            else:
                stalled_since = None
            side.progress.clear()
            try:
                await asyncio.wait_for(side.progress.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _end_input(self, session: Session, now: float) -> None:
        """The input is complete (a flush): the input converter's tail (a resampler's) is input too, and so is
        the part of a step held back (:meth:`_deliver_audio`, :meth:`_deliver_codes`)."""
        if session.kind == "decode":
            self._deliver_codes(session, None, now)
        else:
            self._deliver_audio(session, session.formats.end_input(now), now, end=True)  # type: ignore[union-attr]
        session.flush_at = (session.loop.received, now)

    async def _read_loop(self, session: Session) -> bool:
        """Read until flush (returns True) or close (False)."""
        side = session.loop
        while True:
            await self._wait_for_room(session)
            if side.dead or side.peer_gone:
                return False
            message = await self._recv(session)
            if side.dead:
                return False
            now = time.perf_counter()
            if isinstance(message, str):
                control = parse_json(message)
                if control["type"] == "flush":
                    if side.parser is not None and side.parser.pending:
                        raise ProtocolError("bad_tokens", f"the stream ended inside a coarse frame: "
                                                          f"{side.parser.pending} tokens left over")
                    self._end_input(session, now)
                    return True
                if control["type"] == "close":
                    return False
                raise ProtocolError("unknown_message", f"unknown message type {control['type']!r}; "
                                                       "after ready the client sends binary frames, flush or close")
            if session.kind == "decode":
                self._on_tokens(session, message, now)
            else:
                self._on_audio(session, message, now)
            self.stats["max_backlog"] = max(self.stats["max_backlog"], side.received - session.consumed)

    def _on_audio(self, session: Session, payload: bytes, now: float) -> None:
        # Converted here, on the loop, as each message arrives: see .conversion for the cost and why.
        self._deliver_audio(session, session.formats.decode(payload), now)  # type: ignore[union-attr]

    def _deliver_audio(self, session: Session, samples: Any, now: float, end: bool = False) -> None:
        """Hand samples at the model's rate to the engine, whole engine steps at a time (:meth:`_hand_over`; the
        flush, ``end``, hands over what is held). The engine steps only whole steps, so nothing runs later; what
        it saves is per message: a 20 ms message is a quarter of a 24 kHz step, and every message handed over
        costs the engine's process a link message, an inbox entry and a piece to join (bench/RESULTS.md,
        "Sessions per server"). The step a message completes keeps that message's receive time, as before."""
        side = session.loop
        if not samples.size:
            if end:
                self._hand_over(session, None, True, now)
            return
        before, step = side.received, self.served.step_samples
        side.received += samples.size
        session.formats.delivered(side.received)  # type: ignore[union-attr]
        self._hand_over(session, samples, end or side.received // step > before // step, now)

    def _hand_over(self, session: Session, piece: Optional[np.ndarray], complete: bool, now: float) -> None:
        """Hold ``piece`` (samples, or coarse frames flattened; None: nothing new) until ``complete`` (it
        completes an engine step, or the input ends), then hand everything held to the engines as one piece."""
        side = session.loop
        if piece is not None:
            side.held.append(piece)
        if not complete or not side.held:
            return
        joined = side.held[0] if len(side.held) == 1 else np.concatenate(side.held)
        side.held.clear()
        self.workers.deliver(session, joined, now)

    def _on_tokens(self, session: Session, payload: bytes, now: float) -> None:
        self._on_token_ids(session, decode_tokens(payload), now)

    def _on_token_ids(self, session: Session, ids: np.ndarray, now: float) -> None:
        """Token ids (int64) into the session's parser; whole coarse frames to the engine; ``bad_tokens``."""
        try:
            frames = session.loop.parser.push_frames(ids)  # type: ignore[union-attr]
        except (ValueError, TypeError) as exc:
            raise ProtocolError("bad_tokens", str(exc)) from None
        session.loop.received += ids.size
        if frames.shape[0]:
            self._deliver_codes(session, frames, now)

    def _deliver_codes(self, session: Session, frames: Optional[np.ndarray], now: float) -> None:
        """Hand whole coarse frames ((F, width): each frame's codes of every level side by side, in time order, as
        ``model.vq.codes_to_frames`` lays them out) to the engine, whole decoder steps at a time, as
        :meth:`_deliver_audio` does audio: an LLM or a TTS client sends a frame or two a message. ``frames``
        None (the flush): what is held goes now; a stream that ends inside a step is refused downstream."""
        side = session.loop
        if frames is None:
            self._hand_over(session, None, True, now)
            return
        before, step = side.coarse_frames, self.served.step_frames
        side.coarse_frames += frames.shape[0]
        self._hand_over(session, frames.reshape(-1), side.coarse_frames // step > before // step, now)

    # ---- llm sessions: the tokens come from an LLM, not from the client ---------------------------------------
    async def _llm_loop(self, session: Session) -> bool:
        """An llm session's input: the LLM's tokens (:meth:`_feed_llm`) while the client's socket is watched
        (:meth:`_watch_client`). Returns True to end the stream as a flush does (the completion ended, or failed
        after whole frames: then ``end_error`` is told after their audio), False when the session was dropped."""
        side = session.loop
        feeder = side.feeder = asyncio.ensure_future(self._feed_llm(session))
        watcher = asyncio.ensure_future(self._watch_client(session))
        try:
            await asyncio.wait((feeder, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (feeder, watcher):
                task.cancel()  # closes the HTTP stream, so the LLM stops generating
            await asyncio.gather(feeder, watcher, return_exceptions=True)
        if watcher.done() and not watcher.cancelled():
            watcher.result()  # the client's protocol error, or its closed socket (ConnectionClosed)
            return False  # its close
        if feeder.cancelled() or side.dead:
            return False
        feeder.result()  # a fault of ours is raised (internal_error)
        if session.end_error is not None and side.received - side.parser.pending == 0:  # type: ignore[union-attr]
            raise session.end_error  # no whole frame: nothing to end
        self._end_input(session, time.perf_counter())
        return True

    async def _feed_llm(self, session: Session) -> None:
        """Stream the session's completion and feed its token ids as a client's tokens are fed (the same parser,
        backlog bound and lane). An LLM failure becomes the session's ``end_error``; ``llm`` messages tell the
        first tokens' arrival and the completion's end."""
        side, source = session.loop, session.llm
        assert source is not None and side.parser is not None
        stats = SpeechStats(rate=self.served.config.sampling_rate)
        tokens = source.tokens(stats)
        told = False
        try:
            try:
                async for ids in tokens:
                    if not told:
                        self.send(session, progress_message("first_tokens", stats))
                        told = True
                    await self._wait_for_room(session)
                    if side.dead or side.peer_gone:
                        return
                    try:
                        self._on_token_ids(session, np.asarray(ids, np.int64), time.perf_counter())
                    except ProtocolError as exc:  # bad_tokens: the LLM's, not the client's
                        raise LLMTokenError(f"bad audio tokens: {exc.message}") from None
                if not stats.tokens:
                    raise LLMTokenError(f"the completion held no audio tokens (its text began {stats.other_text[:80]!r}"
                                        f"; finish reason {stats.finish_reason!r}): is the model a TTS model, the "
                                        "prompt format its own?")
                if side.parser.pending:
                    raise LLMTruncatedError(
                        f"the completion ended inside a coarse frame: {side.parser.pending} of its "
                        f"{session.layout.frame_tokens} tokens arrived (finish reason "  # type: ignore[union-attr]
                        f"{stats.finish_reason!r}); the audio of the whole frames was sent", side.parser.pending)
            finally:
                await tokens.aclose()
        except LLMStreamError as exc:
            session.end_error = source.error(exc)
        stats.finished_s = time.monotonic() - stats.requested_at
        self.send(session, progress_message("end", stats))

    async def _watch_client(self, session: Session) -> None:
        """An llm session's client only listens: return at its ``close``; its socket's close raises
        ``ConnectionClosed``; anything else is an error. No idle timeout: the LLM is awaited, not the client."""
        while True:
            message = await self._recv(session, idle=False)
            if not isinstance(message, str):
                raise ProtocolError("bad_data_type", "an llm session takes no input: the server streams the tokens "
                                                     "from the LLM")
            control = parse_json(message)
            if control["type"] == "close":
                return
            raise ProtocolError("unknown_message", f"the client of an llm session may only send close, got "
                                                   f"{control['type']!r}")

    # ---- output and failures ----------------------------------------------------------------------------
    def send(self, session: Session, message: Union[bytes, str]) -> None:
        """Queue a message for the client; a client whose queue passes ``max_output_bytes`` is dropped."""
        side = session.loop
        if side.dead:
            return
        size = message_bytes(message)
        side.out.append(message)
        side.out_bytes += size
        self.stats["bytes_out"] += size
        side.out_ready.set()
        # After flush the rest is bounded (backlog + codec latency) and may come as one large frame.
        if side.out_bytes > self.options.max_output_bytes and session.flush_at is None:
            self.fail(session, ProtocolError(
                "slow_consumer", f"the client is not reading: over {self.options.max_output_bytes} bytes "
                                 "of output queued"), drop_queue=True)

    def take_events(self, events: Events) -> None:
        """A tick's events: messages to queue, errors that end their sessions."""
        for session, item in events:
            # An llm session's end_error comes in done's place: after the output converter's end, as done would.
            ending = item is session.end_error
            if isinstance(item, ProtocolError) and not ending:
                self.fail(session, item)
            elif session.formats is not None and session.formats.converted and not session.loop.dead:
                session.formats.take(item, lambda message, s=session: self.send(s, message),
                                     lambda error, s=session: self.fail(s, error))
            elif isinstance(item, ProtocolError):
                self.fail(session, item)
            else:
                self.send(session, item)
        # Steps consume input even when they emit nothing yet (warm-up): wake every throttled reader.
        for session in self.sessions:
            session.loop.progress.set()

    def fail(self, session: Session, error: ProtocolError, drop_queue: bool = False) -> None:
        """Report ``error`` to the client, close with its code, free the slot at once."""
        side = session.loop
        if side.dead:
            return
        if session.llm is not None and error.code == "bad_tokens":  # the tokens are the LLM's, not the client's
            error = ProtocolError("llm_error", f"the LLM's completion ended badly: {error.message}",
                                  reason="truncated")
        if side.feeder is not None:
            side.feeder.cancel()  # no more of the LLM's stream
        self.stats["errors"][error.code] += 1
        log.info("session %d (%s): %s: %s", session.number, session.kind, error.code, error.message)
        side.error = error
        if session in self.sessions:
            self._release(session)
            self._drop(session)
        if drop_queue:
            side.out.clear()
            side.out_bytes = 0
        side.out.append(error.to_json())
        side.queue_close(error.close_code, error.code)
        side.dead = True
        side.progress.set()
        if drop_queue and side.writer is not None:
            # The writer is stuck in a send to a client that does not read: close from here.
            side.writer.cancel()
            asyncio.ensure_future(_close_or_abort(side.ws, error.close_code, error.code))

    def _release(self, session: Session) -> None:
        session.loop.dead = True
        session.loop.progress.set()
        self.workers.abort(session)
