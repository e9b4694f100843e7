"""The websocket server: one model, a decode and an encode engine, many sessions.

One asyncio event loop owns the sockets; the engines live in one worker thread (torch releases the GIL while
it computes) and are touched only there. The loop puts each client message's input in its session's inbox,
marks flushed sessions as ending, and turns the rest (open, abort) into *commands*. A tick submits every
session's inbox in one engine call (however many sessions and messages), runs the commands, ends the streams
whose queued steps have all run (all of them in one batched flush per engine), then runs one engine step for
every stream with a whole step queued (encode first, so a roundtrip's fresh codes are decoded in the same
tick), and hands the output frames back to the loop. Outputs are converted per batch: tokens once per token
layout, PCM once per sample format, so the host work of a tick grows slowly with the number of sessions.
While nothing is queued the tick loop sleeps on an event: no busy waiting.

Threads: the worker runs torch with ``threads`` intra-op threads (default: torch's count less one core, at
least 1), so the event loop, which serves every socket, keeps a core; torch's threads competing with it for
every core make each step slower than one thread does (bench/RESULTS.md, server section).

Bounds (see :class:`ServerOptions`): a session's unprocessed input (``max_backlog_s``) -- past it the server
stops reading that socket, so a client sending faster than the engine computes is slowed by TCP flow
control; its queued output -- past half of ``max_output_bytes`` the server stops reading too, and a client
whose output does not move for ``idle_timeout_s``, or whose queue passes the whole bound, is dropped as a slow
consumer; the message size (``max_frame_bytes``); the number of sessions (``max_sessions``); and ``idle_timeout_s``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import gc
import hmac
import ipaddress
import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from .. import __version__
from ..engine import DecodeEngine, EncodeEngine, EngineFull
from ..model.snac import SNAC
from ..streaming.build import stream_op
from ..tokens import TokenLayout, TokenParser, get_layout
from . import web
from ..protocol import (TOKEN_ENV, FLAG_FINAL, PAYLOAD_AUDIO, PAYLOAD_TOKENS, Hello, OutputFrame, ProtocolError, Ready,
                       audio_payload, decode_audio, decode_tokens, dumps, parse_json)

log = logging.getLogger("snac_stream.server")

# Browsers send an Origin header; other clients do not (None). Default: pages served from this machine.
LOOPBACK_ORIGINS: Tuple[Union[str, re.Pattern, None], ...] = (
    re.compile(r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"), None)


@dataclass
class ServerOptions:
    """Limits and security settings.

    ``token``: a shared secret clients present in ``hello.auth`` or an ``Authorization: Bearer`` header;
    required when ``host`` is not a loopback address. ``allowed_origins``: exact Origin values (or ``"*"``)
    browsers may connect from, besides loopback pages. ``threads``: torch intra-op threads of the engine
    worker (``None``: :func:`default_engine_threads`).
    """

    host: str = "127.0.0.1"
    port: int = 8765
    max_sessions: int = 8
    max_frame_bytes: int = 1 << 20
    idle_timeout_s: float = 30.0
    max_backlog_s: float = 2.0
    max_output_bytes: int = 4 << 20
    token: Optional[str] = None
    allowed_origins: Sequence[str] = ()
    backend: Optional[str] = None
    threads: Optional[int] = None
    web: bool = True  # serve the browser page (snac_stream/server/web.py) on plain HTTP GETs
    # Warn an audio-input session (encode, roundtrip) whose output answers input received more than this many
    # seconds earlier: the server is slower than that session's input. 0: never.
    behind_warning_s: float = 1.0

    def check(self) -> None:
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.max_frame_bytes < 1024:
            raise ValueError(f"max_frame_bytes must be >= 1024, got {self.max_frame_bytes}")
        if self.idle_timeout_s <= 0 or self.max_backlog_s <= 0:
            raise ValueError("idle_timeout_s and max_backlog_s must be positive")
        if not self.behind_warning_s >= 0:
            raise ValueError(f"behind_warning_s must be >= 0, got {self.behind_warning_s}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {self.threads!r}")
        if not is_loopback(self.host) and not self.token:
            raise ValueError(f"binding to {self.host!r} (not a loopback address) requires an auth token: pass "
                             f"--token or set {TOKEN_ENV}")


_TICKS_KEPT = 100_000  # tick durations kept for statistics (about 2 hours of 85 ms steps)
_BEHIND_REPEAT_S = 5.0  # at most one "behind" warning per session this often


def default_engine_threads() -> int:
    """Torch intra-op threads for the engine worker: torch's default less one core for the event loop."""
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1))


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname, "" or "0.0.0.0"-like wildcard: assume reachable from outside


# ---- algorithmic latency (pure arithmetic on the stream ops' emission counts) -------------------------
def algorithmic_latency(model: SNAC, kind: str, step_frames: int) -> int:
    """Worst-case algorithmic delay in samples of a session ``kind`` whose input arrives in whole steps.

    * ``decode``: how far an output sample trails the audio its received coarse frames describe
      (``input_end * frame_samples / frame_tokens - (i + 1)``);
    * ``encode``: from the end of a coarse frame to the input count at which its tokens come out;
    * ``roundtrip``: from capturing sample ``i`` to the input count at which output sample ``i`` comes out.
    """
    cfg = model.config
    F, cs, S = cfg.frame_samples, cfg.coarse_stride, step_frames * cfg.frame_samples
    horizon = 64 // step_frames + 8  # steps; the emission pattern is periodic long before this
    enc = stream_op(model.encoder, 1)
    dec = stream_op(model.decoder, model.latent_dim)
    enc_frames = lambda n: enc.emitted(n) // cs  # noqa: E731  coarse frames final after n samples
    dec_samples = lambda k: dec.emitted(k * cs)  # noqa: E731  samples final after k coarse frames
    worst = 0
    if kind == "decode":
        for m in range(1, horizon):
            before, after = dec_samples((m - 1) * step_frames), dec_samples(m * step_frames)
            if after > before:
                worst = max(worst, m * S - before - 1)
    elif kind == "encode":
        done = 0
        for m in range(1, horizon):
            frames = enc_frames(m * S)
            for j in range(done, frames):
                worst = max(worst, m * S - (j + 1) * F)
            done = frames
    elif kind == "roundtrip":
        before = 0
        for m in range(1, horizon):
            after = dec_samples(enc_frames(m * S) // step_frames * step_frames)
            if after > before:
                worst = max(worst, m * S - before - 1)
            before = after
    else:
        raise ValueError(f"unknown session kind {kind!r}")
    return worst


# ---- sessions -----------------------------------------------------------------------------------------
_CLOSE = object()  # writer sentinel: close the socket after what is queued


class _Session:
    """One client. Fields marked [engine] are touched only in the engine thread, [loop] only on the loop."""

    def __init__(self, server: "SNACServer", ws: ServerConnection, number: int):
        self.server, self.ws, self.number = server, ws, number
        self.hello: Optional[Hello] = None
        self.layout: Optional[TokenLayout] = None
        self.parser: Optional[TokenParser] = None  # [loop] decode sessions
        self.received = 0  # [loop] input items (samples, or tokens for decode) received
        self.consumed = 0  # [engine] input items stepped through the engine
        self.flush_at: Optional[Tuple[int, float]] = None  # [loop -> engine] (received, time) at flush
        self.ended: Optional[asyncio.Future] = None  # [loop] resolved once the stream's end has been sent
        # [loop -> engine] input not yet submitted: (samples or codes, input count after it, receive time).
        # The loop appends, the worker pops (both atomic on a deque).
        self.inbox: Deque[Tuple[Any, int, float]] = collections.deque()
        # [engine]
        self.sid_enc: Optional[int] = None
        self.sid_dec: Optional[int] = None
        self.enc_markers: Deque[Tuple[int, float]] = collections.deque()  # (input_end, t_recv) per queued step
        self.dec_markers: Deque[Tuple[int, float]] = collections.deque()
        self.code_buf: Optional[List[torch.Tensor]] = None  # codes short of a whole decoder step
        self.audio_pos = 0
        self.token_pos = 0
        self.warned_at: Optional[float] = None  # last "behind" warning
        # [loop]
        self.out: Deque[Any] = collections.deque()
        self.out_bytes = 0
        self.out_ready = asyncio.Event()
        self.progress = asyncio.Event()
        self.dead = False
        self.error: Optional[ProtocolError] = None
        self.writer: Optional[asyncio.Task] = None

    @property
    def kind(self) -> str:
        return self.hello.kind if self.hello else "?"

    # ---- loop side --------------------------------------------------------------------------------------
    def enqueue(self, message: Union[bytes, str]) -> None:
        if self.dead:
            return
        self.out.append(message)
        self.out_bytes += len(message)
        self.out_ready.set()
        # After flush the rest is bounded (backlog + codec latency) and may come as one large frame.
        if self.out_bytes > self.server.options.max_output_bytes and self.flush_at is None:
            self.server._fail(self, ProtocolError(
                "slow_consumer", f"the client is not reading: over {self.server.options.max_output_bytes} bytes "
                                 "of output queued"), drop_queue=True)

    async def write_loop(self) -> None:
        try:
            while True:
                while not self.out:
                    self.out_ready.clear()
                    await self.out_ready.wait()
                item = self.out.popleft()
                if isinstance(item, tuple) and item[0] is _CLOSE:
                    await self.ws.close(item[1], item[2])
                    return
                self.out_bytes -= len(item)
                await self.ws.send(item)
                self.progress.set()
        except ConnectionClosed:
            pass


async def _close_or_abort(ws: ServerConnection, code: int, reason: str, timeout_s: float = 1.0) -> None:
    """Send a close frame; drop the TCP connection if the peer does not answer in time."""
    try:
        await asyncio.wait_for(ws.close(code, reason), timeout_s)
    except (asyncio.TimeoutError, ConnectionClosed, OSError):
        ws.transport.abort()


class SNACServer:
    """A websocket server streaming one model to many sessions.

    Use ``async with SNACServer(model, options) as server:`` (or :meth:`start` / :meth:`stop`); ``server.port``
    is the bound port (``options.port = 0`` picks a free one).
    """

    def __init__(self, model: SNAC, options: Optional[ServerOptions] = None, *, model_name: Optional[str] = None,
                 random_weights: bool = False):
        self.options = options or ServerOptions()
        self.options.check()
        self.model = model.eval()
        self.model_name = model_name or getattr(model, "name", None) or "snac"
        self.random_weights = random_weights
        n = self.options.max_sessions
        # Outputs come back on the host in one copy per step (they are sent from there anyway).
        self.decoder = DecodeEngine(model, n, backend=self.options.backend, output_device="cpu")
        self.encoder = EncodeEngine(model, n, backend=self.options.backend, output_device="cpu")
        for engine in (self.decoder, self.encoder):
            if engine.step_mode == "graphs":  # CUDA: compile and capture now, not in a session's step
                engine.warm_up()
                engine.capture_graphs()
        self.step_frames = self.decoder.step_frames
        self.step_samples = self.decoder.step_samples
        self.latency = {kind: algorithmic_latency(model, kind, self.step_frames)
                        for kind in ("encode", "decode", "roundtrip")}
        # tick_s / step_s: the latest ticks' durations and the engine steps' share of them, in seconds.
        self.stats: Dict[str, Any] = {"sessions": 0, "completed": 0, "errors": collections.Counter(), "ticks": 0,
                                      "max_backlog": 0, "behind_warnings": 0,
                                      "tick_s": collections.deque(maxlen=_TICKS_KEPT),
                                      "step_s": collections.deque(maxlen=_TICKS_KEPT)}
        self._sessions: Set[_Session] = set()
        self._numbers = 0
        # [engine]
        self._by_enc: Dict[int, _Session] = {}
        self._by_dec: Dict[int, _Session] = {}
        self.threads = self.options.threads or default_engine_threads()
        # torch's thread count is per thread: set it in the worker, leaving the caller's alone.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="snac-engine",
                                            initializer=torch.set_num_threads, initargs=(self.threads,))
        self._commands: List[Tuple[Callable[[List[Any]], Any], Optional[asyncio.Future]]] = []
        self._input_ready: List[_Session] = []  # [loop -> engine] sessions whose inbox has input since last tick
        self._end_requests: List[_Session] = []  # [loop -> engine] sessions flushed since last tick
        self._ending: List[_Session] = []  # [engine] flushed sessions whose end is not sent yet
        self._wake: Optional[asyncio.Event] = None
        self._changed = asyncio.Event()
        self._ticker: Optional[asyncio.Task] = None
        self._server: Optional[Server] = None
        self.port: Optional[int] = None

    # ---- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> "SNACServer":
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._ticker = asyncio.create_task(self._tick_loop())
        origins: Optional[List[Any]] = None
        if "*" not in self.options.allowed_origins:
            origins = [*LOOPBACK_ORIGINS, *self.options.allowed_origins]
        self._server = await serve(
            self._handle, self.options.host, self.options.port, origins=origins, compression=None,
            # The library refuses (close 1009) anything far beyond our own limit, which we report in JSON.
            max_size=2 * self.options.max_frame_bytes + 1024, max_queue=4,
            process_request=self._check_request)
        self.port = self._server.sockets[0].getsockname()[1]
        # What is alive now (model, engine states, modules) lives as long as the server: keep it out of the cyclic
        # garbage collector's full passes, which otherwise scan it all (80-120 ms with a 2048-slot engine on a
        # CPU core), stalling whichever tick they land in.
        gc.collect()
        gc.freeze()
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)
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
        host = self.options.host
        return f"ws://{'[' + host + ']' if ':' in host else host}:{self.port}"

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    async def wait_sessions(self, at_most: int) -> None:
        """Return once no more than ``at_most`` sessions hold a slot."""
        while len(self._sessions) > at_most:
            self._changed.clear()
            await self._changed.wait()

    def _drop(self, session: _Session) -> None:
        self._sessions.discard(session)
        self._changed.set()

    def _check_request(self, connection: ServerConnection, request: Any) -> Any:
        if self.options.web and not web.is_websocket_request(request):
            return web.respond(self, connection, request)
        # The bearer header is an alternative to hello.auth; remember it for the hello check.
        header = request.headers.get("Authorization", "")
        connection.bearer = header[7:] if header.startswith("Bearer ") else None  # type: ignore[attr-defined]
        return None

    # ---- connection handler (event loop) -------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        self._numbers += 1
        session = _Session(self, ws, self._numbers)
        opened = False
        try:
            hello = Hello.parse(parse_json(await self._recv(session, expect_text=True)))
            self._check_hello(ws, hello)
            if len(self._sessions) >= self.options.max_sessions:
                raise ProtocolError("server_full", f"all {self.options.max_sessions} sessions are in use; "
                                                   "try again later")
            session.hello = hello
            session.layout = get_layout(hello.token_layout, self.model.config, token_offset=hello.token_offset)
            if hello.kind == "decode":
                session.parser = session.layout.parser()
            self._sessions.add(session)
            self.stats["sessions"] += 1
            await self._call(lambda events: self._open(session))
            opened = True
            session.writer = asyncio.create_task(session.write_loop())
            session.enqueue(self._ready(session).to_json())
            if await self._read_loop(session):
                await self._end_stream(session)
                if not session.dead:  # not failed on the way
                    self.stats["completed"] += 1
        except ProtocolError as exc:
            self._fail(session, exc)
        except ConnectionClosed:
            pass  # abrupt disconnect: nothing to tell; the slot is freed below
        except Exception as exc:  # a bug: tell the client, keep serving the others
            log.exception("session %d failed", session.number)
            self._fail(session, ProtocolError("internal_error", f"internal error: {type(exc).__name__}"))
        finally:
            if opened and not session.dead:
                self._release(session)
            session.dead = True
            self._drop(session)
            if session.writer is not None:
                # Ends the writer after what is queued (a no-op close if an error close is queued first).
                session.out.append((_CLOSE, 1000, "done"))
                session.out_ready.set()
                try:
                    await session.writer
                except asyncio.CancelledError:
                    pass
            elif session.error is not None:  # failed before the writer started: send the error directly
                try:
                    await ws.send(session.error.to_json())
                    await ws.close(session.error.close_code, session.error.code)
                except ConnectionClosed:
                    pass

    def _check_hello(self, ws: ServerConnection, hello: Hello) -> None:
        token = self.options.token
        if token:
            presented = hello.auth or getattr(ws, "bearer", None) or ""
            if not hmac.compare_digest(presented.encode(), token.encode()):
                raise ProtocolError("unauthorized", "missing or wrong auth token")
        rate = self.model.config.sampling_rate
        if hello.sample_rate is not None and hello.sample_rate != rate:
            raise ProtocolError("bad_sample_rate", f"this model runs at {rate} Hz, the hello says "
                                                   f"{hello.sample_rate} Hz; resample on the client")
        try:
            get_layout(hello.token_layout, self.model.config, token_offset=hello.token_offset)
        except ValueError as exc:
            raise ProtocolError("bad_hello", str(exc)) from None

    def _ready(self, session: _Session) -> Ready:
        cfg, layout, hello = self.model.config, session.layout, session.hello
        assert layout is not None and hello is not None
        opts = self.options
        return Ready(
            kind=hello.kind, model=self.model_name, sample_rate=cfg.sampling_rate, sample_format=hello.sample_format,
            hop_samples=cfg.hop_length, frame_samples=cfg.frame_samples, step_samples=self.step_samples,
            step_frames=self.step_frames, n_codebooks=cfg.n_codebooks, codebook_size=cfg.codebook_size,
            token_layout={"name": layout.name, "frame_tokens": layout.frame_tokens,
                          "token_offset": layout.token_offset, "order": [list(o) for o in layout.order],
                          "id_offsets": [layout.id_offset(p) for p in range(layout.frame_tokens)]},
            algorithmic_latency_samples=self.latency[hello.kind],
            limits={"max_frame_bytes": opts.max_frame_bytes, "idle_timeout_s": opts.idle_timeout_s,
                    "max_backlog_samples": self._backlog_limit(hello.kind) if hello.kind != "decode" else None,
                    "max_backlog_tokens": self._backlog_limit(hello.kind) if hello.kind == "decode" else None,
                    "max_output_bytes": opts.max_output_bytes, "max_sessions": opts.max_sessions},
            session=session.number, server=f"snac-stream {__version__}", random_weights=self.random_weights)

    def _backlog_limit(self, kind: str) -> int:
        """Unprocessed input items (samples, or tokens for decode) past which the server stops reading."""
        steps = max(1, math.ceil(self.options.max_backlog_s * self.model.config.sampling_rate / self.step_samples))
        if kind == "decode":
            return steps * self.step_frames * len(get_layout("interleaved", self.model.config).order)
        return steps * self.step_samples

    async def _recv(self, session: _Session, expect_text: bool = False) -> Union[str, bytes]:
        try:
            message = await asyncio.wait_for(session.ws.recv(), self.options.idle_timeout_s)
        except asyncio.TimeoutError:
            raise ProtocolError("idle_timeout", f"nothing received for {self.options.idle_timeout_s:g} s") from None
        if len(message) > self.options.max_frame_bytes:
            raise ProtocolError("frame_too_big", f"a message of {len(message)} bytes is over the limit of "
                                                 f"{self.options.max_frame_bytes} bytes")
        if expect_text and not isinstance(message, str):
            raise ProtocolError("bad_data_type", "the first message must be a JSON text hello, got a binary frame")
        return message

    async def _read_loop(self, session: _Session) -> bool:
        """Read until flush (returns True) or close (False)."""
        limit = self._backlog_limit(session.kind)
        out_limit = self.options.max_output_bytes // 2
        while True:
            # Backpressure: stop reading while the engine is behind or the client is slow to read its output;
            # TCP flow control then slows the client down.
            while not session.dead and (session.received - session.consumed > limit or session.out_bytes > out_limit):
                session.progress.clear()
                try:
                    await asyncio.wait_for(session.progress.wait(), self.options.idle_timeout_s)
                except asyncio.TimeoutError:
                    if session.out_bytes > out_limit:  # no output went out for a whole idle timeout
                        raise ProtocolError("slow_consumer", f"the client has not read its output for "
                                                             f"{self.options.idle_timeout_s:g} s") from None
            if session.dead:
                return False
            message = await self._recv(session)
            if session.dead:
                return False
            now = time.perf_counter()
            if isinstance(message, str):
                control = parse_json(message)
                if control["type"] == "flush":
                    if session.parser is not None and session.parser.pending:
                        raise ProtocolError("bad_tokens", f"the stream ended inside a coarse frame: "
                                                          f"{session.parser.pending} tokens left over")
                    session.flush_at = (session.received, now)
                    return True
                if control["type"] == "close":
                    return False
                raise ProtocolError("unknown_message", f"unknown message type {control['type']!r}; "
                                                       "after ready the client sends binary frames, flush or close")
            if session.kind == "decode":
                self._on_tokens(session, message, now)
            else:
                self._on_audio(session, message, now)
            self.stats["max_backlog"] = max(self.stats["max_backlog"], session.received - session.consumed)

    def _on_audio(self, session: _Session, payload: bytes, now: float) -> None:
        samples = decode_audio(payload, session.hello.sample_format)  # type: ignore[union-attr]
        if not samples.size:
            return
        session.received += samples.size
        self._deliver(session, samples, now)

    def _on_tokens(self, session: _Session, payload: bytes, now: float) -> None:
        ids = decode_tokens(payload)
        try:
            codes = session.parser.push(torch.from_numpy(ids))  # type: ignore[union-attr]
        except (ValueError, TypeError) as exc:
            raise ProtocolError("bad_tokens", str(exc)) from None
        session.received += ids.size
        if codes[0].shape[-1]:
            self._deliver(session, codes, now)

    def _deliver(self, session: _Session, item: Any, now: float) -> None:
        """Queue one message's input; the first item of an empty inbox marks the session for the next tick,
        which submits everything that arrived since the last one at once (one engine call for all sessions'
        audio, not one per message)."""
        session.inbox.append((item, session.received, now))
        if len(session.inbox) == 1:
            self._input_ready.append(session)
            assert self._wake is not None
            self._wake.set()

    def _fail(self, session: _Session, error: ProtocolError, drop_queue: bool = False) -> None:
        """Report ``error`` to the client, close with its code, free the slot at once."""
        if session.dead:
            return
        self.stats["errors"][error.code] += 1
        log.info("session %d (%s): %s: %s", session.number, session.kind, error.code, error.message)
        session.error = error
        if session in self._sessions:
            self._release(session)
            self._drop(session)
        if drop_queue:
            session.out.clear()
            session.out_bytes = 0
        session.out.append(error.to_json())
        session.out.append((_CLOSE, error.close_code, error.code))
        session.out_ready.set()
        session.dead = True
        session.progress.set()
        if drop_queue and session.writer is not None:
            # The writer is stuck in a send to a client that does not read: close from here.
            session.writer.cancel()
            asyncio.ensure_future(_close_or_abort(session.ws, error.close_code, error.code))

    def _release(self, session: _Session) -> None:
        session.dead = True
        session.progress.set()
        self._post(lambda events: self._abort(session))

    # ---- engine thread ---------------------------------------------------------------------------------------
    def _post(self, command: Callable[[List[Any]], Any], future: Optional[asyncio.Future] = None) -> None:
        self._commands.append((command, future))
        assert self._wake is not None
        self._wake.set()

    async def _call(self, command: Callable[[List[Any]], Any]) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._post(command, future)
        return await future

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            commands, self._commands = self._commands, []
            ready, self._input_ready = self._input_ready, []
            ending, self._end_requests = self._end_requests, []
            events, results, ended, busy = await loop.run_in_executor(self._executor, self._tick, commands, ready,
                                                                      ending)
            self.stats["ticks"] += 1
            for session, item in events:
                if isinstance(item, ProtocolError):
                    self._fail(session, item)
                else:
                    session.enqueue(item)
            # Steps consume input even when they emit nothing yet (warm-up): wake every throttled reader.
            for session in self._sessions:
                session.progress.set()
            for session in ended:
                if session.ended is not None and not session.ended.done():
                    session.ended.set_result(None)
            for (command, future), result in zip(commands, results):
                if future is not None and not future.done():
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
            if busy:
                self._wake.set()

    def _tick(self, commands: List[Tuple[Callable[[List[Any]], Any], Any]], ready: Sequence[_Session],
              ending: Sequence[_Session]) -> Tuple[List[Tuple[_Session, Any]], List[Any], List[_Session], bool]:
        """Submit the input of the ``ready`` sessions, run the commands, take the new ``ending`` sessions (a
        stream's end comes after its last input), end the streams that are ready to, then one step of each
        engine. Returns (events, command results, sessions whose end is sent, more to do)."""
        start = time.perf_counter()
        events: List[Tuple[_Session, Any]] = []
        results: List[Any] = []
        self._submit_audio([session for session in ready if session.kind != "decode"], events)
        for session in ready:
            if session.kind == "decode":
                self._guard(session, events, functools.partial(self._submit_codes, session))
        for command, _ in commands:
            try:
                results.append(command(events))
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting handler
                results.append(exc)
        for session in ending:
            if session.sid_enc is not None and self.encoder.end_input(session.sid_enc):
                session.enc_markers.append(session.flush_at)  # type: ignore[arg-type]
            self._ending.append(session)
        ended = self._end_streams(events) if self._ending else []
        t0 = time.perf_counter()
        enc_groups = self._step_engine(self.encoder, self._by_enc, events)
        t_enc = time.perf_counter() - t0
        for sids, codes in enc_groups:
            sessions = [self._by_enc[sid] for sid in sids]
            markers = []
            for session in sessions:
                markers.append(session.enc_markers.popleft())
                session.consumed += self.step_samples
            self._emit_codes(sessions, codes, markers, t_enc, events)
        t1 = time.perf_counter()
        dec_groups = self._step_engine(self.decoder, self._by_dec, events)
        t_dec = time.perf_counter() - t1
        for sids, audio in dec_groups:
            sessions = [self._by_dec[sid] for sid in sids]
            markers, compute = [], []
            for session in sessions:
                markers.append(session.dec_markers.popleft())
                if session.kind == "decode":
                    session.consumed += self.step_frames * session.layout.frame_tokens  # type: ignore[union-attr]
                compute.append(t_dec + (t_enc if session.kind == "roundtrip" else 0.0))
            self._emit_audio(sessions, audio, markers, compute, events)
        busy = (bool(self._ending) or any(self.encoder.pending(sid) for sid in self._by_enc)
                or any(self.decoder.pending(sid) for sid in self._by_dec))
        if enc_groups or dec_groups or ended:
            self.stats["tick_s"].append(time.perf_counter() - start)
            self.stats["step_s"].append(t_enc + t_dec)
        return events, results, ended, busy

    def _step_engine(self, engine: Union[EncodeEngine, DecodeEngine], sessions: Dict[int, _Session],
                     events: List[Any]) -> List[Tuple[List[int], Any]]:
        """One step of ``engine`` if any of its streams has input queued: its outputs as batched rows
        (``step_groups``; every session's output is converted per batch, not per session). A failure of the step
        as a whole (not of one stream's input, which the engines refuse at submit) ends every session on that
        engine with ``internal_error`` and frees their slots; the server goes on serving."""
        if not any(engine.pending(sid) for sid in sessions):
            return []
        try:
            return engine.step_groups()
        except Exception as exc:  # noqa: BLE001
            log.exception("engine step failed; ending the %d sessions on it", len(sessions))
            for session in list(sessions.values()):
                self._abort(session)
                events.append((session, ProtocolError("internal_error", f"internal error: {type(exc).__name__}")))
            return []

    def _guard(self, session: _Session, events: List[Any], work: Callable[[], None]) -> None:
        """Run one session's share of a tick; a failure ends that session only."""
        try:
            work()
        except Exception as exc:  # noqa: BLE001
            self._session_failed(session, events, exc)

    def _session_failed(self, session: _Session, events: List[Any], exc: Exception) -> None:
        """End ``session`` (slots freed at once) after ``exc`` in its share of a tick; the error goes to its
        client with the tick's events."""
        if not isinstance(exc, ProtocolError):
            log.error("session %d failed in the engine", session.number, exc_info=exc)
            exc = ProtocolError("internal_error", f"internal error: {type(exc).__name__}")
        self._abort(session)
        events.append((session, exc))

    def _open(self, session: _Session) -> None:
        try:
            if session.kind in ("encode", "roundtrip"):
                session.sid_enc = self.encoder.open()
                self._by_enc[session.sid_enc] = session
            if session.kind in ("decode", "roundtrip"):
                session.sid_dec = self.decoder.open()
                self._by_dec[session.sid_dec] = session
        except EngineFull:
            self._abort(session)
            raise ProtocolError("server_full", "no free engine slot; try again later") from None

    def _abort(self, session: _Session) -> None:
        if session.sid_enc is not None:
            self._by_enc.pop(session.sid_enc, None)
            self.encoder.abort(session.sid_enc)
            session.sid_enc = None
        if session.sid_dec is not None:
            self._by_dec.pop(session.sid_dec, None)
            self.decoder.abort(session.sid_dec)
            session.sid_dec = None

    @staticmethod
    def _take_inbox(session: _Session) -> List[Tuple[Any, int, float]]:
        pieces = []
        while session.inbox:
            pieces.append(session.inbox.popleft())
        return pieces

    def _submit_audio(self, sessions: Sequence[_Session], events: List[Any]) -> None:
        """Submit each session's queued audio, all sessions in one engine call; each step a session's audio
        completes is tagged with the (input count, receive time) of the message that completed it."""
        members: List[Tuple[_Session, List[Tuple[Any, int, float]], np.ndarray]] = []
        for session in sessions:
            pieces = self._take_inbox(session)
            if session.sid_enc is not None and pieces:
                audio = pieces[0][0] if len(pieces) == 1 else np.concatenate([p[0] for p in pieces])
                members.append((session, pieces, audio))
        if not members:
            return
        try:
            self.encoder.submit_many([m[0].sid_enc for m in members],  # type: ignore[misc]
                                     [torch.from_numpy(m[2]).view(1, 1, -1) for m in members])
        except Exception:  # noqa: BLE001 - refused as a whole: one by one, so that only a session at fault ends
            accepted = []
            for member in members:
                try:
                    self.encoder.submit(member[0].sid_enc, torch.from_numpy(member[2]).view(1, 1, -1))
                    accepted.append(member)
                except Exception as exc:  # noqa: BLE001
                    self._session_failed(member[0], events, exc)
            members = accepted
        for session, pieces, _ in members:
            done = (pieces[0][1] - pieces[0][0].size) // self.step_samples
            for _, end, t_recv in pieces:
                session.enc_markers.extend([(end, t_recv)] * (end // self.step_samples - done))
                done = end // self.step_samples

    def _submit_codes(self, session: _Session) -> None:
        """Feed the session's queued codes (a decode session's parsed tokens) to the decoder at once."""
        pieces = self._take_inbox(session)
        if not pieces:
            return
        codes = (pieces[0][0] if len(pieces) == 1
                 else [torch.cat(level, dim=-1) for level in zip(*(p[0] for p in pieces))])
        marks, frames = [], 0
        for piece, end, t_recv in pieces:
            frames += piece[0].shape[-1]
            marks.append((frames, (end, t_recv)))
        self._feed_decoder([session], codes, [marks])

    def _feed_decoder(self, sessions: Sequence[_Session], codes: List[torch.Tensor],
                      marks: Sequence[Sequence[Tuple[int, Tuple[int, float]]]]) -> None:
        """Buffer codes and queue every whole decoder step. Row ``j`` of ``codes`` (per level
        (len(sessions), t_i)) belongs to ``sessions[j]``; ``marks[j]``: (coarse frames of that row up to the end
        of one input piece, that piece's marker), ascending; a step is tagged with the marker of the piece that
        completed it. Sessions holding the same number of buffered frames go to the decoder as one batch."""
        by_held: Dict[int, List[int]] = {}
        for j, session in enumerate(sessions):
            if session.sid_dec is not None:
                by_held.setdefault(0 if session.code_buf is None else session.code_buf[0].shape[-1], []).append(j)
        for held, rows in by_held.items():
            members = [sessions[j] for j in rows]
            part = codes if len(rows) == len(sessions) else [c[rows] for c in codes]
            if held:
                part = [torch.cat([torch.cat(buffered, dim=0), new], dim=-1)
                        for buffered, new in zip(zip(*(m.code_buf for m in members)), part)]  # type: ignore
            frames = part[0].shape[-1]
            whole = frames // self.step_frames * self.step_frames
            if whole:
                self.decoder.submit_many([m.sid_dec for m in members],  # type: ignore[misc]
                                         [c[:, : whole * c.shape[-1] // frames] for c in part])
                for j, member in zip(rows, members):
                    done = 0
                    for upto, marker in marks[j]:
                        steps = (held + upto) // self.step_frames
                        member.dec_markers.extend([marker] * (steps - done))
                        done = steps
            rest = [c[:, whole * c.shape[-1] // frames:] for c in part] if whole < frames else None
            for i, member in enumerate(members):
                member.code_buf = None if rest is None else [c[i : i + 1] for c in rest]

    def _emit_codes(self, sessions: Sequence[_Session], codes: List[torch.Tensor],
                    markers: Sequence[Tuple[int, float]], compute_s: float, events: List[Any],
                    final: bool = False) -> None:
        """Send row ``j`` of ``codes`` (per level (len(sessions), t_i), on the host) to ``sessions[j]`` as
        tokens, converted once per token layout in use; a roundtrip session's codes go on to the decoder."""
        if not codes[0].shape[-1]:
            return
        by_layout: Dict[Tuple[str, int], List[int]] = {}
        for j, session in enumerate(sessions):
            layout = session.layout
            by_layout.setdefault((layout.name, layout.token_offset), []).append(j)  # type: ignore[union-attr]
        tokens: List[Any] = [None] * len(sessions)
        for rows in by_layout.values():
            part = codes if len(rows) == len(sessions) else [c[rows] for c in codes]
            try:
                flat = sessions[rows[0]].layout.to_flat(part).numpy().astype("<i4")  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - ends the sessions of this layout only
                for j in rows:
                    self._session_failed(sessions[j], events, exc)
                continue
            for i, j in enumerate(rows):
                tokens[j] = flat[i]
        roundtrip: List[int] = []
        for j, session in enumerate(sessions):
            if tokens[j] is None:
                continue
            end = final or markers[j] is session.flush_at  # output of the stream's padded end
            if not end:
                self._check_behind(session, markers[j], events)
            events.append((session, self._frame(PAYLOAD_TOKENS, session.token_pos, markers[j], compute_s,
                                                tokens[j], end)))
            session.token_pos += tokens[j].size
            if session.kind == "roundtrip":
                roundtrip.append(j)
        if not roundtrip:
            return
        members = [sessions[j] for j in roundtrip]
        part = codes if len(roundtrip) == len(sessions) else [c[roundtrip] for c in codes]
        try:
            self._feed_decoder(members, part, [[(part[0].shape[-1], markers[j])] for j in roundtrip])
        except Exception as exc:  # noqa: BLE001 - codes made by the encoder: a bug, not the clients' doing
            for member in members:
                self._session_failed(member, events, exc)

    def _check_behind(self, session: _Session, marker: Tuple[int, float], events: List[Any]) -> None:
        """Warn an audio-input session whose output now answers input received over ``behind_warning_s`` ago:
        the engine is slower than that input (an overloaded server, or a client sending faster than real
        time) and the delay grows while it lasts. At most once per ``_BEHIND_REPEAT_S``."""
        limit, now = self.options.behind_warning_s, time.perf_counter()
        lag = now - marker[1]
        recently = session.warned_at is not None and now - session.warned_at < _BEHIND_REPEAT_S
        if not limit or lag <= limit or recently:
            return
        session.warned_at = now
        self.stats["behind_warnings"] += 1
        events.append((session, dumps({
            "type": "warning", "code": "behind", "lag_ms": round(1e3 * lag),
            "message": f"output is {lag:.1f} s behind the input it answers: the server is slower than this "
                       f"session's input"})))

    def _emit_audio(self, sessions: Sequence[_Session], audio: torch.Tensor, markers: Sequence[Tuple[int, float]],
                    compute_s: Sequence[float], events: List[Any], final: bool = False) -> None:
        """Send row ``j`` of ``audio`` (len(sessions), 1, n) to ``sessions[j]``, converted to each sample format
        once for all sessions using it. A roundtrip whose input has ended gets no more samples than it sent
        (the rest decodes the end padding)."""
        samples = audio.reshape(len(sessions), -1).float().cpu().numpy()
        by_format: Dict[str, List[int]] = {}
        for j, session in enumerate(sessions):
            by_format.setdefault(session.hello.sample_format, []).append(j)  # type: ignore[union-attr]
        payloads: List[Any] = [None] * len(sessions)
        for fmt, rows in by_format.items():
            data = audio_payload(samples if len(rows) == len(sessions) else samples[rows], fmt)
            for i, j in enumerate(rows):
                payloads[j] = data[i]
        for j, session in enumerate(sessions):
            data = payloads[j]
            if session.flush_at is not None and session.kind == "roundtrip":
                data = data[: max(0, session.flush_at[0] - session.audio_pos)]
            if not data.size:
                continue
            # Steps tagged with the flush's marker decode the stream's padded end: end-of-stream output too.
            events.append((session, self._frame(PAYLOAD_AUDIO, session.audio_pos, markers[j], compute_s[j], data,
                                                final or markers[j] is session.flush_at)))
            session.audio_pos += data.size

    @staticmethod
    def _frame(kind: int, start: int, marker: Tuple[int, float], compute_s: float, data: np.ndarray,
               final: bool) -> bytes:
        server_us = (time.perf_counter() - marker[1]) * 1e6
        return OutputFrame(kind, start, marker[0], int(server_us), int(compute_s * 1e6), data,
                           FLAG_FINAL if final else 0).pack()

    # ---- stream ends ----------------------------------------------------------------------------------------
    async def _end_stream(self, session: _Session) -> None:
        """[loop] After a flush: hand the session to the engine thread's stream ends; returns once its end
        (or an error) is queued for the client."""
        session.ended = asyncio.get_running_loop().create_future()
        self._end_requests.append(session)
        assert self._wake is not None
        self._wake.set()
        await session.ended

    def _end_streams(self, events: List[Any]) -> List[_Session]:
        """End the flushed sessions whose queued steps have all run (padded as offline encode/decode would),
        every session ending in this tick in one batched pass per engine (``close_many``); a roundtrip's
        decoder ends once the steps its encoder's end completed have run too. Sends the rest of the output
        and ``done``; returns the sessions whose end is sent (or that failed on the way)."""
        t0 = time.perf_counter()
        closing = [s for s in self._ending if s.sid_enc is not None and not self.encoder.pending(s.sid_enc)]
        for sessions, codes in self._close_many(self.encoder, closing, events):
            self._emit_codes(sessions, codes, [s.flush_at for s in sessions],  # type: ignore[misc]
                             time.perf_counter() - t0, events, final=True)
        closing = []
        for session in self._ending:
            if session.sid_enc is None and session.sid_dec is not None and not self.decoder.pending(session.sid_dec):
                if session.code_buf is not None and session.code_buf[0].shape[-1]:
                    self._session_failed(session, events, ProtocolError(
                        "bad_tokens", f"the stream ended inside a decoder step: {session.code_buf[0].shape[-1]} "
                                      f"coarse frames left over; this model decodes whole steps of "
                                      f"{self.step_frames} frames"))
                else:
                    closing.append(session)
        t1 = time.perf_counter()
        for sessions, audio in self._close_many(self.decoder, closing, events):
            self._emit_audio(sessions, audio, [s.flush_at for s in sessions],  # type: ignore[misc]
                             [time.perf_counter() - t1] * len(sessions), events, final=True)
        ended = [s for s in self._ending if s.sid_enc is None and s.sid_dec is None]
        if ended:
            self._ending = [s for s in self._ending if s.sid_enc is not None or s.sid_dec is not None]
        for session in ended:
            assert session.flush_at is not None
            events.append((session, dumps({"type": "done", "input_items": session.flush_at[0],
                                           "output_samples": session.audio_pos, "output_tokens": session.token_pos})))
        return ended

    def _close_many(self, engine: Union[EncodeEngine, DecodeEngine], sessions: List[_Session],
                    events: List[Any]) -> List[Tuple[List[_Session], Any]]:
        """End these sessions' streams on ``engine`` (``close_many``) and detach them from it; returns the
        outputs as (sessions, batched outputs) groups. A failure ends those sessions only."""
        if not sessions:
            return []
        encoder = engine is self.encoder
        by_sid = self._by_enc if encoder else self._by_dec
        sids = [s.sid_enc if encoder else s.sid_dec for s in sessions]
        try:
            groups = engine.close_many(sids)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - close_many freed every slot of the call
            groups, failed = [], exc
        else:
            failed = None
        for sid, session in zip(sids, sessions):  # every slot of the call is free now
            by_sid.pop(sid, None)  # type: ignore[arg-type]
            if encoder:
                session.sid_enc = None
                session.enc_markers.clear()
            else:
                session.sid_dec = None
                session.dec_markers.clear()
            if failed is not None:
                self._session_failed(session, events, failed)
        by_session = dict(zip(sids, sessions))
        return [([by_session[sid] for sid in group], outputs) for group, outputs in groups]
