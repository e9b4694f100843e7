"""Asyncio client for the snac-stream websocket server (protocol v1, ``docs/protocol.md``).

Low level: :class:`Session` (``await Session.open(url, kind, ...)``, then ``send_audio`` / ``send_tokens``,
``flush``, and ``receive`` for output frames and ``done``). High level: :func:`encode`, :func:`decode` and
:func:`roundtrip` stream a whole signal (optionally paced in real time) and return a :class:`StreamResult`;
:func:`client_messages` cuts float audio into the messages of any client format (G.711, Opus pages, ...) as a
live client sends them; :func:`latency_breakdown` splits a paced roundtrip's (or decode's) per-sample latency
into algorithmic delay, server time and transport. :func:`llm_speech` opens an *llm session*: the server streams
the tokens from an LLM endpoint (``hello.llm``) and the client only receives the audio.

Example::

    result = await roundtrip("ws://127.0.0.1:8765", audio, chunk_samples=480, realtime=True)
    result.audio          # float32 (T,) decoded samples, as many as were sent
    result.tokens         # int64 (N,) token ids in the session's layout
    latency_breakdown(result)  # {"total": ..., "algorithmic": ..., "server": ..., "transport": ...} seconds
"""

from __future__ import annotations

import asyncio
import bisect
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from .formats import InputDecoder, OutputEncoder
from .protocol import (AUDIO_FORMATS, CONTAINER_FORMATS, PAYLOAD_AUDIO, PAYLOAD_TOKENS, SAMPLE_FORMATS, Hello,
                       LLMHello, OutputFrame, Ready, encode_audio, encode_tokens)

__all__ = ["ServerError", "Session", "StreamResult", "ClientMessages", "LLMSessionStats", "encode", "decode",
           "roundtrip", "client_messages", "llm_speech", "latency_breakdown", "input_samples"]


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
    sample ``i`` counts as captured at ``t0 + (i + 1) / sample_rate`` (decode: the tokens describing it as
    generated then, :func:`input_samples`); None when sent as fast as possible.
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
    # Input sent as ClientMessages: (input items sent so far, input samples captured by then) per message.
    captured: List[Tuple[int, int]] = field(default_factory=list)
    # decode_output=True: the output decoded as it arrived (float32 at the output rate; PCM: ``audio`` itself),
    # and for G.711 and Opus (start, count) of each audio frame's decoded samples, in the frames' order.
    decoded: Optional[np.ndarray] = None
    decoded_spans: List[Tuple[int, int]] = field(default_factory=list)


@dataclass
class ClientMessages:
    """Audio already cut into the messages a client sends (:func:`client_messages`): each message's bytes in the
    session's input format, and the input samples (at the input rate) captured once it is complete, counted
    from the start. Real-time pacing sends message ``k`` at ``t0 + captured[k] / rate``, and
    :func:`latency_breakdown` times ``input_end`` by it (Opus input counts bytes, not samples)."""

    payloads: List[bytes]
    captured: List[int]


def client_messages(audio: np.ndarray, sample_format: str, sample_rate: int, chunk_samples: int, *,
                    opus_bitrate: int = 24000) -> ClientMessages:
    """Mono float audio (T,) at ``sample_rate`` (Hz) -> the messages a live client sends, one per
    ``chunk_samples``, coded by :class:`~snac_stream.formats.OutputEncoder` at that rate (no resampling):
    PCM and G.711 samples; for ``opus`` / ``webm`` (48000 Hz) one Opus frame of ``chunk_samples`` (10, 20, 40
    or 60 ms) a message, the container's headers in the first and its end (the last frame, zero-padded, and
    the end-of-stream page) in a message of its own. Raises ``ValueError`` for a rate or frame the format does
    not take."""
    x = np.asarray(audio, np.float32).reshape(-1)
    if chunk_samples < 1:
        raise ValueError(f"chunk_samples must be positive, got {chunk_samples}")
    options: Dict[str, Any] = {}
    if sample_format in CONTAINER_FORMATS:
        frame_ms = chunk_samples * 1000 / sample_rate
        if frame_ms != int(frame_ms):
            raise ValueError(f"an Opus message is one frame of 10, 20, 40 or 60 ms, not {chunk_samples} samples "
                             f"({frame_ms:g} ms at {sample_rate} Hz)")
        options = {"frame_ms": int(frame_ms), "bitrate": opus_bitrate}
    encoder = OutputEncoder(sample_format, sample_rate, model_rate=sample_rate, **options)
    out = ClientMessages([], [])
    pending = b""  # a push that completes no bytes sends nothing; its samples go with the next message
    for start in range(0, x.shape[0], chunk_samples):
        pending += encoder.push(x[start:start + chunk_samples])
        if pending:
            out.payloads.append(pending)
            out.captured.append(min(start + chunk_samples, x.shape[0]))
            pending = b""
    tail = pending + encoder.flush()
    if tail:
        out.payloads.append(tail)
        out.captured.append(x.shape[0])
    return out


def input_samples(ready: Ready, items: float) -> float:
    """The input samples (at the session's input rate) that ``items`` input items stand for: the samples
    themselves, or for a ``decode`` session the audio its tokens describe, ``frame_samples`` (at the model's
    rate) per ``token_layout["frame_tokens"]`` tokens, as in the protocol's output delay bound. Real-time pacing
    sends a message when these samples would have been captured (decode: generated, as by a real-time TTS),
    and :func:`latency_breakdown` times ``input_end`` by them."""
    if ready.kind == "decode":
        return items * ready.frame_samples / ready.token_layout["frame_tokens"]
    return items


def _output_decoder(ready: Ready) -> Optional[InputDecoder]:
    """What turns the session's G.711 or Opus output back into float samples at its own rate (None for PCM)."""
    fmt = ready.output_format or ready.sample_format
    if fmt in SAMPLE_FORMATS:
        return None
    rate = ready.output_rate or ready.sample_rate
    return InputDecoder(fmt, rate, model_rate=rate)


async def _stream(url: str, kind: str, pieces: Iterable[Union[np.ndarray, bytes]], *,
                  captured: Optional[Sequence[int]] = None, realtime: bool = False, keep_frames: bool = True,
                  decode_output: bool = False, **hello: Any) -> StreamResult:
    """Send ``pieces`` (audio samples or token ids; bytes with ``captured``, the input samples captured once
    each is complete) while receiving, then flush; collect the output (and decode it, ``decode_output``).
    ``realtime``: send each piece when its input would have been captured (:func:`input_samples`)."""
    session = await Session.open(url, kind, **hello)
    rate = session.ready.input_rate or session.ready.sample_rate
    result = StreamResult(session.ready, np.zeros(0, np.float32), np.zeros(0, np.int64), [], {})
    send_audio = kind != "decode"

    async def sender() -> None:
        t0 = time.perf_counter()
        result.t0 = t0 if realtime else None
        for k, piece in enumerate(pieces):
            end = captured[k] if captured is not None else input_samples(session.ready, session.sent + len(piece))
            if realtime:
                # A piece is sent when its last sample has been captured.
                delay = t0 + end / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            if send_audio:
                await session.send_audio(piece)
            else:
                await session.send_tokens(piece)
            result.send_times.append((session.sent, time.perf_counter()))
            if captured is not None:
                result.captured.append((session.sent, end))
        await session.flush()
        result.sent = session.sent

    audio: List[np.ndarray] = []
    tokens: List[np.ndarray] = []
    decoder = _output_decoder(session.ready) if decode_output and kind != "encode" else None
    decoded: List[np.ndarray] = []
    decoded_samples = 0
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
                if decoder is not None:  # as a player would, frame by frame
                    samples = decoder.push(item.data.tobytes())
                    result.decoded_spans.append((decoded_samples, samples.shape[0]))
                    decoded.append(samples)
                    decoded_samples += samples.shape[0]
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
    if decoder is not None:
        decoded.append(decoder.flush())
        result.decoded = np.concatenate(decoded)
    elif decode_output and kind != "encode":
        result.decoded = result.audio
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


AudioInput = Union[np.ndarray, bytes, ClientMessages]


def _audio_pieces(audio: AudioInput, chunk_samples: Union[int, Sequence[int]]) -> Dict[str, Any]:
    """:func:`_stream`'s pieces (and their capture counts) for ``audio``: messages as made, or chunks of it."""
    if isinstance(audio, ClientMessages):
        return {"pieces": audio.payloads, "captured": audio.captured}
    return {"pieces": _chunks(_audio_items(audio), chunk_samples)}


async def encode(url: str, audio: AudioInput, *, chunk_samples: Union[int, Sequence[int]] = 480,
                 realtime: bool = False, **hello: Any) -> StreamResult:
    """Stream mono float audio (T,) (or, in G.711 or Opus, its bytes; chunk sizes then count bytes; or
    :class:`ClientMessages`, sent message by message, ``chunk_samples`` unused); ``result.tokens`` are the ids
    in ``token_layout``."""
    return await _stream(url, "encode", **_audio_pieces(audio, chunk_samples), realtime=realtime, **hello)


async def decode(url: str, tokens: Union[Sequence[int], np.ndarray], *,
                 chunk_tokens: Union[int, Sequence[int]] = 7, realtime: bool = False, decode_output: bool = False,
                 **hello: Any) -> StreamResult:
    """Stream token ids in ``token_layout`` (e.g. ``"orpheus"``); ``result.audio`` is float32 (T,) (in G.711 or
    Opus output formats: the bytes received, as uint8; ``decode_output`` also decodes them, frame by frame as
    they arrive, into ``result.decoded``).

    ``realtime``: pace the tokens as a real-time TTS generates them: a message is sent when the audio its tokens
    end on would have been generated in real time (``t0 +`` :func:`input_samples` ``/ sample_rate``;
    ``frame_samples`` per ``frame_tokens`` tokens), and :func:`latency_breakdown` splits each output sample's
    latency as for a paced :func:`roundtrip` (send whole coarse frames a message, e.g. ``chunk_tokens`` =
    ``frame_tokens``, for the tokens' audio to be complete when they are sent)."""
    return await _stream(url, "decode", _chunks(np.asarray(tokens, np.int64), chunk_tokens), realtime=realtime,
                         decode_output=decode_output, **hello)


async def roundtrip(url: str, audio: AudioInput, *, chunk_samples: Union[int, Sequence[int]] = 480,
                    realtime: bool = False, decode_output: bool = False, **hello: Any) -> StreamResult:
    """Stream audio through the codec and back: ``result.audio`` (as many samples as sent, when both ways are PCM
    at the model's rate) and ``result.tokens``. Audio in other formats and rates as :func:`encode` and
    :func:`decode`; for a per-sample latency of a paced Opus session (:func:`latency_breakdown`), send
    :func:`client_messages` and pass ``decode_output=True``."""
    return await _stream(url, "roundtrip", **_audio_pieces(audio, chunk_samples), realtime=realtime,
                         decode_output=decode_output, **hello)


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
    """Per output sample of a real-time paced roundtrip or decode: latency and its parts, in seconds.

    For output sample ``i`` in a frame received at ``t_recv`` with header fields ``input_end``, ``server_us``:

    * ``total = t_recv - (t0 + (i + 1) / rate)``: from capturing input sample ``i`` (decode: generating the
      tokens of audio sample ``i``, in real time) to receiving its output;
    * ``algorithmic = (input_end - (i + 1)) / rate``: waiting for the input the output depends on (the codec's
      look-ahead, the engine's step, the client's chunk size and any conversion's hold); for decode,
      ``input_end`` tokens count as the audio samples they describe (:func:`input_samples`: ``input_end x
      frame_samples / frame_tokens``, as in the protocol's output delay bound);
    * ``server = server_us``: from the server receiving that input to the output being ready (queue + compute,
      and any conversion's compute);
    * ``transport = total - algorithmic - server``: sending, the network and the client's own scheduling.

    Client formats and rates (``ready.input_rate``, ``ready.output_rate``): ``i`` counts output samples at the
    output rate, ``input_end`` input samples at the input rate. The server's conversions hold samples back
    (the ``input_latency_samples`` and ``output_latency_samples`` its ``ready`` announces): held input raises
    the ``input_end`` a step needs, held output goes out in a later frame with a later ``input_end``, so both
    land in ``algorithmic``. Opus counts bytes both ways: input sent as :class:`ClientMessages` times
    ``input_end`` (bytes) by the samples captured when that message was complete (the client's own encoder,
    one frame and its look-ahead, is then algorithmic too); output decoded as it arrived
    (``decode_output=True``) gives ``i``, a sample of the decoded 48 kHz stream.

    Frames of the end-of-stream flush are left out (their input ends with the flush, not with capture).
    ``decimate`` keeps every n-th sample.
    """
    if result.t0 is None:
        raise ValueError("latency needs a real-time paced stream (realtime=True)")
    ready = result.ready
    # A decode session's input is tokens, whatever its (output) sample format.
    in_fmt = None if ready.kind == "decode" else ready.input_format or ready.sample_format
    out_fmt = ready.output_format or ready.sample_format
    if out_fmt in CONTAINER_FORMATS and result.decoded is None:
        raise ValueError(f"{out_fmt} output frames are counted in bytes: decode them as they arrive "
                         f"(decode_output=True) for a per-sample latency")
    if in_fmt in CONTAINER_FORMATS and not result.captured:
        raise ValueError(f"{in_fmt} input is counted in bytes: send it as ClientMessages (client_messages) to time "
                         f"input_end by the samples each message carried")
    in_rate, out_rate = ready.input_rate or ready.sample_rate, ready.output_rate or ready.sample_rate
    # Items are samples but for Opus input, whose bytes are timed by the messages that carried them.
    items = [n for n, _ in result.captured] if in_fmt in CONTAINER_FORMATS else []

    def captured(input_end: int) -> float:
        """Input samples captured once ``input_end`` input items had been sent."""
        if not items:
            return input_samples(ready, input_end)
        k = bisect.bisect_right(items, input_end) - 1
        return result.captured[k][1] if k >= 0 else 0

    spans = iter(result.decoded_spans) if out_fmt in CONTAINER_FORMATS else None
    parts: Dict[str, List[np.ndarray]] = {k: [] for k in ("total", "algorithmic", "server", "transport")}
    for t_recv, frame in result.frames:
        if frame.payload_kind != PAYLOAD_AUDIO:
            continue
        start, count = next(spans) if spans is not None else (frame.start, frame.data.shape[0])
        if frame.final:
            continue
        i = np.arange(start, start + count, decimate, dtype=np.float64)
        total = t_recv - (result.t0 + (i + 1) / out_rate)
        algorithmic = captured(frame.input_end) / in_rate - (i + 1) / out_rate
        server = np.full_like(i, frame.server_us / 1e6)
        parts["total"].append(total)
        parts["algorithmic"].append(algorithmic)
        parts["server"].append(server)
        parts["transport"].append(total - algorithmic - server)
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
