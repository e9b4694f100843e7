"""Asyncio client for the snac-stream websocket server (protocol v1, ``docs/protocol.md``).

Low level: :class:`Session` (``await Session.open(url, kind, ...)``, then ``send_audio`` / ``send_tokens``,
``flush``, and ``receive`` for output frames and ``done``). High level: :func:`encode`, :func:`decode` and
:func:`roundtrip` stream a whole signal (optionally paced in real time) and return a :class:`StreamResult`;
:func:`latency_breakdown` splits a paced roundtrip's per-sample latency into algorithmic delay, server time
and transport. :func:`llm_speech` opens an *llm session*: the server streams the tokens from an LLM endpoint
(``hello.llm``) and the client only receives the audio.

Example::

    result = await roundtrip("ws://127.0.0.1:8765", audio, chunk_samples=480, realtime=True)
    result.audio          # float32 (T,) decoded samples, as many as were sent
    result.tokens         # int64 (N,) token ids in the session's layout
    latency_breakdown(result)  # {"total": ..., "algorithmic": ..., "server": ..., "transport": ...} seconds
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from .protocol import (AUDIO_FORMATS, CONTAINER_FORMATS, PAYLOAD_AUDIO, PAYLOAD_TOKENS, SAMPLE_FORMATS, Hello,
                       LLMHello, OutputFrame, Ready, encode_audio, encode_tokens)

__all__ = ["ServerError", "Session", "StreamResult", "LLMSessionStats", "encode", "decode", "roundtrip",
           "llm_speech", "latency_breakdown"]


class ServerError(Exception):
    """The server reported an error (``code`` as in the protocol's error table) and closed the session.

    ``fields``: the error message's other members (``llm_error``: ``reason``, and ``status`` for HTTP errors).
    """

    def __init__(self, code: str, message: str, close_code: Optional[int] = None,
                 fields: Optional[Dict[str, Any]] = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.close_code = code, message, close_code
        self.fields = fields or {}


def _server_error(message: Dict[str, Any], close_code: Optional[int]) -> ServerError:
    fields = {k: v for k, v in message.items() if k not in ("type", "code", "message")}
    return ServerError(message.get("code", "?"), message.get("message", ""), close_code, fields)


class Session:
    """One open websocket session (after the hello/ready exchange)."""

    def __init__(self, ws: ClientConnection, hello: Hello, ready: Ready):
        self.ws, self.hello, self.ready = ws, hello, ready
        self.sent = 0  # input items sent (samples, or tokens for decode)

    @classmethod
    async def open(cls, url: str, kind: str, *, sample_format: str = "pcm16", sample_rate: Optional[int] = None,
                   token_layout: str = "interleaved", token_offset: int = 0, auth: Optional[str] = None,
                   input_format: Optional[str] = None, input_rate: Optional[int] = None,
                   output_format: Optional[str] = None, output_rate: Optional[int] = None,
                   opus_bitrate: Optional[int] = None, llm: Union[LLMHello, Dict[str, Any], None] = None,
                   **connect_kwargs: Any) -> "Session":
        """Connect, send ``hello`` and wait for ``ready``; raises :class:`ServerError` if refused.

        The format and rate arguments are the hello's fields (``docs/protocol.md``, "Formats and sample
        rates"); ``llm`` (a ``decode`` session: an :class:`~snac_stream.protocol.LLMHello` or its fields) makes
        the server stream the tokens from that LLM (see :func:`llm_speech`). ``connect_kwargs`` go to
        :func:`websockets.asyncio.client.connect` (``origin``, ``additional_headers``, ``max_queue``, ``sock``,
        ...). Compression is off unless given: audio barely compresses.
        """
        if isinstance(llm, dict):
            llm = LLMHello.parse(llm)
        hello = Hello(kind=kind, sample_format=sample_format, sample_rate=sample_rate, token_layout=token_layout,
                      token_offset=token_offset, auth=auth, input_format=input_format, input_rate=input_rate,
                      output_format=output_format, output_rate=output_rate, opus_bitrate=opus_bitrate, llm=llm)
        connect_kwargs.setdefault("compression", None)
        connect_kwargs.setdefault("max_size", None)
        ws = await connect(url, **connect_kwargs)
        try:
            await ws.send(hello.to_json())
            message = await _recv_json(ws)
            return cls(ws, hello, Ready.parse(message))
        except BaseException:
            await ws.close()
            raise

    @property
    def input_format(self) -> str:
        """The format of the audio this session sends."""
        return self.ready.input_format or self.hello.formats()["input"][0]

    @property
    def output_format(self) -> str:
        """The format of the audio this session receives."""
        return self.ready.output_format or self.hello.formats()["output"][0]

    async def send_audio(self, samples: Union[np.ndarray, bytes]) -> None:
        """Send raw payload bytes in the session's input format, or (``pcm16``, ``float32``) float samples (T,)
        in [-1, 1], converted to it."""
        fmt = self.input_format
        if isinstance(samples, (bytes, bytearray)):
            payload = bytes(samples)
        elif fmt in SAMPLE_FORMATS:
            payload = encode_audio(samples, fmt)
        elif samples.dtype == np.uint8:
            payload = samples.tobytes()
        else:
            raise TypeError(f"send {fmt} audio as bytes (snac_stream.formats.OutputEncoder makes them)")
        await self.ws.send(payload)
        self.sent += len(payload) // AUDIO_FORMATS[fmt]

    async def send_tokens(self, tokens: Union[Sequence[int], np.ndarray]) -> None:
        """Send token ids (int32 on the wire) in the session's layout."""
        payload = encode_tokens(tokens)
        await self.ws.send(payload)
        self.sent += len(payload) // 4

    async def flush(self) -> None:
        """End of stream: the server sends the rest, then ``done``, then closes."""
        await self.ws.send(json.dumps({"type": "flush"}))

    async def close(self) -> None:
        """Abandon the stream without flushing and close the socket."""
        try:
            await self.ws.send(json.dumps({"type": "close"}))
        except ConnectionClosed:
            pass
        await self.ws.close()

    async def receive(self) -> Union[OutputFrame, Dict[str, Any]]:
        """The next output frame, or the ``done`` message; raises :class:`ServerError` on ``error``."""
        message = await _recv_or_error(self.ws)
        if isinstance(message, str):
            parsed = json.loads(message)
            if parsed.get("type") == "error":
                raise _server_error(parsed, await _close_code(self.ws))
            return parsed
        return OutputFrame.unpack(message, self.output_format)


async def _recv_or_error(ws: ClientConnection) -> Union[str, bytes]:
    try:
        return await ws.recv()
    except ConnectionClosed as exc:
        rcvd, sent = exc.rcvd, exc.sent
        if rcvd is not None:
            why = f"{rcvd.code}{': ' + rcvd.reason if rcvd.reason else ''}"
        else:  # closed from this side, e.g. the keepalive ping went unanswered: say why
            why = "no close frame" + (f"; closed here with {sent.code}: {sent.reason}" if sent and sent.reason else "")
        raise ServerError("closed", f"connection closed ({why})", rcvd.code if rcvd else None) from exc


async def _recv_json(ws: ClientConnection) -> Dict[str, Any]:
    message = await _recv_or_error(ws)
    if not isinstance(message, str):
        raise ServerError("protocol", "expected a JSON text message, got a binary frame")
    parsed = json.loads(message)
    if parsed.get("type") == "error":
        raise _server_error(parsed, await _close_code(ws))
    return parsed


async def _close_code(ws: ClientConnection) -> Optional[int]:
    """The close code that follows an error message (waits briefly for the closing handshake)."""
    try:
        await asyncio.wait_for(ws.wait_closed(), 5.0)
    except asyncio.TimeoutError:
        return None
    return ws.close_code


@dataclass
class StreamResult:
    """What a whole-stream helper collected.

    ``frames``: (receive time in ``time.perf_counter`` seconds, frame) for every output frame, in order.
    ``t0``: for real-time paced input, the instant the first sample would have been captured minus nothing:
    sample ``i`` counts as captured at ``t0 + (i + 1) / sample_rate``; None when sent as fast as possible.
    """

    ready: Ready
    audio: np.ndarray
    tokens: np.ndarray
    frames: List[Tuple[float, OutputFrame]]
    done: Dict[str, Any]
    t0: Optional[float] = None
    sent: int = 0
    send_times: List[Tuple[int, float]] = field(default_factory=list)  # (input items sent so far, time)
    warnings: List[Dict[str, Any]] = field(default_factory=list)  # the server's "warning" messages, in order


async def _stream(url: str, kind: str, pieces: Iterable[np.ndarray], *, realtime: bool = False,
                  keep_frames: bool = True, **hello: Any) -> StreamResult:
    """Send ``pieces`` (audio samples or token ids) while receiving, then flush; collect the output."""
    session = await Session.open(url, kind, **hello)
    rate = session.ready.input_rate or session.ready.sample_rate
    result = StreamResult(session.ready, np.zeros(0, np.float32), np.zeros(0, np.int64), [], {})
    send_audio = kind != "decode"

    async def sender() -> None:
        t0 = time.perf_counter()
        result.t0 = t0 if realtime else None
        for piece in pieces:
            if realtime:
                # A piece is sent when its last sample has been captured.
                delay = t0 + (session.sent + len(piece)) / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            if send_audio:
                await session.send_audio(piece)
            else:
                await session.send_tokens(piece)
            result.send_times.append((session.sent, time.perf_counter()))
        await session.flush()
        result.sent = session.sent

    audio: List[np.ndarray] = []
    tokens: List[np.ndarray] = []
    task = asyncio.create_task(sender())
    try:
        while True:
            try:
                item = await session.receive()
            except ServerError:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    exc = task.exception()
                    if not isinstance(exc, ConnectionClosed):
                        raise exc  # a local failure explains the closed socket better
                raise
            now = time.perf_counter()
            if isinstance(item, dict):
                if item.get("type") == "done":
                    result.done = item
                    break
                if item.get("type") == "warning":
                    result.warnings.append(item)
                continue
            if item.payload_kind == PAYLOAD_AUDIO:
                if item.start != sum(a.size for a in audio):
                    raise ServerError("protocol", f"audio frame starts at {item.start}, expected "
                                                  f"{sum(a.size for a in audio)}")
                audio.append(item.data)
            elif item.payload_kind == PAYLOAD_TOKENS:
                tokens.append(item.data)
            if keep_frames:
                result.frames.append((now, item))
        await task
    finally:
        if not task.done():
            task.cancel()
        await session.ws.close()
    result.audio = np.concatenate(audio) if audio else np.zeros(0, np.float32)
    result.tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int64)
    return result


def _chunks(data: np.ndarray, sizes: Union[int, Sequence[int]]) -> List[np.ndarray]:
    """Split ``data`` into consecutive pieces: a fixed size, or the given sizes cycled."""
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"chunk sizes must be positive, got {sizes}")
    out, pos, k = [], 0, 0
    while pos < data.shape[0]:
        n = sizes[k % len(sizes)]
        out.append(data[pos : pos + n])
        pos, k = pos + n, k + 1
    return out


def _audio_items(audio: Union[np.ndarray, bytes]) -> np.ndarray:
    """What the helpers chunk: float samples (PCM formats), or the client's bytes as uint8 (the others)."""
    if isinstance(audio, (bytes, bytearray)) or (isinstance(audio, np.ndarray) and audio.dtype == np.uint8):
        return np.frombuffer(bytes(audio), np.uint8)
    return np.asarray(audio, np.float32)


async def encode(url: str, audio: Union[np.ndarray, bytes], *, chunk_samples: Union[int, Sequence[int]] = 480,
                 realtime: bool = False, **hello: Any) -> StreamResult:
    """Stream mono float audio (T,) (or, in G.711 or Opus, its bytes; chunk sizes then count bytes);
    ``result.tokens`` are the ids in ``token_layout``."""
    return await _stream(url, "encode", _chunks(_audio_items(audio), chunk_samples), realtime=realtime, **hello)


async def decode(url: str, tokens: Union[Sequence[int], np.ndarray], *,
                 chunk_tokens: Union[int, Sequence[int]] = 7, **hello: Any) -> StreamResult:
    """Stream token ids in ``token_layout`` (e.g. ``"orpheus"``); ``result.audio`` is float32 (T,) (in G.711 or
    Opus output formats: the bytes received, as uint8)."""
    return await _stream(url, "decode", _chunks(np.asarray(tokens, np.int64), chunk_tokens), **hello)


async def roundtrip(url: str, audio: Union[np.ndarray, bytes], *, chunk_samples: Union[int, Sequence[int]] = 480,
                    realtime: bool = False, **hello: Any) -> StreamResult:
    """Stream audio through the codec and back: ``result.audio`` (as many samples as sent, when both ways are PCM
    at the model's rate) and ``result.tokens``. Audio in other formats and rates as :func:`encode` and
    :func:`decode`."""
    return await _stream(url, "roundtrip", _chunks(_audio_items(audio), chunk_samples), realtime=realtime, **hello)


@dataclass
class LLMSessionStats:
    """What :func:`llm_speech` saw of an llm session, filled in as it goes.

    Seconds. ``ready_s`` and ``first_audio_s`` are measured here, from sending the hello (connection, hello,
    the LLM, the decoder and the way back: the time to first audio a listener gets). ``first_token_s`` and
    ``first_audio_token_s`` are the server's (its ``llm`` messages), from its request to the LLM: the time to
    the first completion text, and to the first audio token in it.
    """

    ready: Optional[Ready] = None
    ready_s: Optional[float] = None
    first_token_s: Optional[float] = None
    first_audio_token_s: Optional[float] = None
    first_audio_s: Optional[float] = None
    finished_s: Optional[float] = None  # the last message (done or the error) received
    samples: int = 0  # output items received (samples; bytes for Opus outputs)
    tokens: Optional[int] = None  # audio tokens the LLM sent (the server's count, at its end)
    finish_reason: Optional[str] = None
    llm: Dict[str, Any] = field(default_factory=dict)  # the last llm message
    done: Dict[str, Any] = field(default_factory=dict)

    def take(self, message: Dict[str, Any]) -> None:
        """An ``llm`` message from the server."""
        self.llm = message
        for name in ("first_token", "first_audio_token"):
            if message.get(f"{name}_ms") is not None:
                setattr(self, f"{name}_s", message[f"{name}_ms"] / 1000)
        if message.get("event") == "end":
            self.tokens, self.finish_reason = message.get("tokens"), message.get("finish_reason")


async def llm_speech(url: str, llm: Union[LLMHello, Dict[str, Any]], *, stats: Optional[LLMSessionStats] = None,
                     sample_format: str = "float32", token_layout: str = "orpheus",
                     **hello: Any) -> AsyncIterator[OutputFrame]:
    """Speech from an LLM, decoded by the server: open a ``decode`` session naming ``llm`` (endpoint, model,
    text: :class:`~snac_stream.protocol.LLMHello`), yield its audio frames as they arrive.

    The server streams the completion itself (its ``--allow-llm`` must list the endpoint, which it, not this
    machine, must reach), so the client sends nothing. Frames' ``data`` are float32 samples at
    ``stats.ready.sample_rate`` for PCM formats (``sample_format``, default float32), bytes otherwise; the last
    ones are flagged ``FINAL``. ``stats`` (a new :class:`LLMSessionStats` if not given) is filled in as the
    messages arrive. ``hello`` takes :meth:`Session.open`'s other arguments (``auth``, ``output_format``, ...).

    Raises :class:`ServerError`: ``llm_not_allowed`` at once; ``llm_error`` (``fields["reason"]``) after the
    audio of the frames that completed, its tail included. Leaving the loop early closes the session, and the
    server closes its LLM stream.
    """
    stats = stats if stats is not None else LLMSessionStats()
    start = time.perf_counter()
    session = await Session.open(url, "decode", sample_format=sample_format, token_layout=token_layout, llm=llm,
                                 **hello)
    stats.ready, stats.ready_s = session.ready, time.perf_counter() - start
    finished = False
    try:
        while True:
            try:
                item = await session.receive()
            except ServerError:
                stats.finished_s = time.perf_counter() - start
                finished = True
                raise
            if isinstance(item, dict):
                if item.get("type") == "llm":
                    stats.take(item)
                elif item.get("type") == "done":
                    stats.done, stats.finished_s = item, time.perf_counter() - start
                    finished = True
                    return
                continue
            if item.payload_kind == PAYLOAD_AUDIO and item.data.shape[0]:
                if stats.first_audio_s is None:
                    stats.first_audio_s = time.perf_counter() - start
                stats.samples += item.data.shape[0]
                yield item
    finally:
        if finished:
            await session.ws.close()
        else:  # stopped early: the server drops the session and its LLM stream
            await session.close()


def latency_breakdown(result: StreamResult, decimate: int = 1) -> Dict[str, np.ndarray]:
    """Per output sample of a real-time paced roundtrip: latency and its parts, in seconds.

    For output sample ``i`` in a frame received at ``t_recv`` with header fields ``input_end``, ``server_us``:

    * ``total = t_recv - (t0 + (i + 1) / rate)``: from capturing input sample ``i`` to receiving its output;
    * ``algorithmic = (input_end - (i + 1)) / rate``: waiting for the input the output depends on (the codec's
      look-ahead, the engine's step, the client's chunk size and any resampler's hold);
    * ``server = server_us``: from the server receiving that input to the output being ready (queue + compute);
    * ``transport = total - algorithmic - server``: sending, the network and the client's own scheduling.

    With other rates in than out (``ready.input_rate``, ``ready.output_rate``), ``i + 1`` counts at the output
    rate and ``input_end`` at the input rate. Opus outputs (counted in bytes) have no per-sample split.

    Frames of the end-of-stream flush are left out (their input ends with the flush, not with capture).
    ``decimate`` keeps every n-th sample.
    """
    if result.t0 is None:
        raise ValueError("latency needs a real-time paced stream (realtime=True)")
    ready = result.ready
    if ready.output_format in CONTAINER_FORMATS:
        raise ValueError(f"{ready.output_format} output frames are counted in bytes: no per-sample latency")
    in_rate, out_rate = ready.input_rate or ready.sample_rate, ready.output_rate or ready.sample_rate
    parts: Dict[str, List[np.ndarray]] = {k: [] for k in ("total", "algorithmic", "server", "transport")}
    for t_recv, frame in result.frames:
        if frame.payload_kind != PAYLOAD_AUDIO or frame.final:
            continue
        i = np.arange(frame.start, frame.start + frame.data.shape[0], decimate, dtype=np.float64)
        total = t_recv - (result.t0 + (i + 1) / out_rate)
        algorithmic = frame.input_end / in_rate - (i + 1) / out_rate
        server = np.full_like(i, frame.server_us / 1e6)
        parts["total"].append(total)
        parts["algorithmic"].append(algorithmic)
        parts["server"].append(server)
        parts["transport"].append(total - algorithmic - server)
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
