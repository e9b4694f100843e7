"""The live demos' transports through a ``snac-stream serve`` websocket server.

:class:`WebSocketCodec` (a roundtrip session) is a :class:`snac_stream.live.CodecTransport` and
:class:`WebSocketTokenDecoder` (a decode session) a :class:`snac_stream.live.TokenTransport`, so
:func:`snac_stream.live.run_codec` and :func:`snac_stream.live.run_token_playback` stream through a server
exactly as they do in process.

The demo loops are synchronous (a capture loop, a sound device callback) and the client
(:mod:`snac_stream.client`) is asyncio: each transport runs the client on an event loop in its own thread.
``push`` hands the input to that loop and returns at once with whatever output has arrived so far (a
thread-safe queue filled by a receiver task), so the time a sample spends on the network and in the server
is part of the latency the demos measure. Stream positions are sample counts at the server model's rate.

:func:`token_text_from_websocket` is a token *source*: an LLM server (or anything) that streams tokens over a
websocket, read as they arrive.

Failures (server unreachable, refused -- full, bad token --, or an error during the stream) raise
:class:`RemoteError`, an ``OSError`` whose message names the server and the protocol error code; a
``bad_tokens`` error from a decode session raises ``ValueError`` like the in-process decoder.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
from typing import Any, Coroutine, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np

from .client import ServerError, Session
from .protocol import PAYLOAD_AUDIO, PAYLOAD_TOKENS

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10.0
_DONE = object()  # receiver -> caller: the server sent ``done``


class RemoteError(ConnectionError):
    """The server could not be reached, refused the session, or ended it with an error."""


class _LoopThread:
    """An asyncio event loop running in a daemon thread; synchronous code submits coroutines to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="snac-remote", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
        """Run ``coro`` on the loop and wait for its result (its exception is raised here)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what still runs on the loop (e.g. a connection's keepalive task), then stop and close it."""
        if self.loop.is_closed():
            return

        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_rest(), timeout)
        except Exception:  # noqa: BLE001 - stopping anyway
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class _RemoteSession:
    """One client session on its own loop thread: blocking ``send`` / ``finish``, non-blocking ``take``.

    A receiver task puts every output frame, then ``_DONE`` or the error that ended the session, on a
    thread-safe queue; the caller's thread takes them off.
    """

    def __init__(self, url: str, kind: str, *, token: Optional[str] = None, sample_format: str = "float32",
                 token_layout: str = "interleaved", token_offset: int = 0) -> None:
        self.url = url
        self._output: "queue.Queue[Any]" = queue.Queue()
        self._loop = _LoopThread()
        try:
            self.session: Session = self._loop.run(asyncio.wait_for(Session.open(
                url, kind, sample_format=sample_format, token_layout=token_layout, token_offset=token_offset,
                auth=token), CONNECT_TIMEOUT_S))
        except BaseException as exc:
            self._loop.close()
            raise self._error(exc, "cannot open a session on") from None
        self._done = False
        self._failed: Optional[BaseException] = None  # the error that ended the session, once received
        self.warnings: List[Dict[str, Any]] = []  # the server's "warning" messages (appended by the loop thread)
        self._receiver = asyncio.run_coroutine_threadsafe(self._receive(), self._loop.loop)

    def _error(self, exc: BaseException, doing: str = "") -> Exception:
        if isinstance(exc, ServerError):
            return RemoteError(f"server {self.url}: {exc.code}: {exc.message}")
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            return RemoteError(f"{doing or 'lost'} server {self.url}: no answer in {CONNECT_TIMEOUT_S:g} s")
        detail = str(exc) or type(exc).__name__
        return RemoteError(f"{doing or 'lost'} server {self.url}: {detail}")

    async def _receive(self) -> None:
        try:
            while True:
                item = await self.session.receive()
                if isinstance(item, dict):
                    if item.get("type") == "done":
                        self._output.put(_DONE)
                        return
                    if item.get("type") == "warning":
                        self.warnings.append(item)
                    continue
                self._output.put(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            self._failed = exc
            self._output.put(exc)

    def send(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a send on the loop; raises the error that ended the session, if one came first."""
        if self._failed is not None:
            coro.close()  # never run: the session is over
            self._raise_pending()
        try:
            self._loop.run(coro)
        except BaseException as exc:
            self._raise_pending()  # the server's error explains a failed send better
            raise self._error(exc) from None

    def take(self, block: bool = False) -> List[Any]:
        """Output frames that have arrived (all of them, up to ``done``, when ``block``); raises on an error."""
        frames: List[Any] = []
        while not self._done:
            try:
                item = self._output.get(block=block)
            except queue.Empty:
                break
            if item is _DONE:
                self._done = True
            elif isinstance(item, BaseException):
                self._done = True
                self.close()
                raise self._wrap(item)
            else:
                frames.append(item)
        return frames

    def _wrap(self, exc: BaseException) -> Exception:
        if isinstance(exc, ServerError) and exc.code == "bad_tokens":
            return ValueError(f"server {self.url}: {exc.message}")
        return self._error(exc)

    def _raise_pending(self) -> None:
        """Raise the error that ended the session, if the receiver has seen one (the output is moot then)."""
        if self._failed is not None:
            self._done = True
            self.close()
            raise self._wrap(self._failed)

    def finish(self) -> List[Any]:
        """Flush: every remaining output frame, once the server says ``done``."""
        self.send(self.session.flush())
        try:
            return self.take(block=True)
        finally:
            self.close()

    def close(self) -> None:
        if self._loop.loop.is_closed():
            return
        # After done or an error only the socket is left to close; otherwise tell the server we leave.
        ending = self.session.ws.close() if self._receiver.done() else self.session.close()
        try:
            self._loop.run(ending, CONNECT_TIMEOUT_S)
        except BaseException:  # noqa: BLE001 - closing a session that is already gone
            pass
        self._loop.close()


def _split(frames: Sequence[Any]) -> Tuple[np.ndarray, int]:
    """Output frames -> (audio samples in order, number of tokens)."""
    audio = [f.data for f in frames if f.payload_kind == PAYLOAD_AUDIO]
    tokens = sum(f.data.shape[0] for f in frames if f.payload_kind == PAYLOAD_TOKENS)
    return (np.concatenate(audio).astype(np.float32, copy=False) if audio else np.zeros(0, np.float32)), tokens


class WebSocketCodec:
    """:class:`snac_stream.live.CodecTransport` through a server's ``roundtrip`` session at ``url``.

    ``sample_format``: ``float32`` (the default; audio as the model computes it) or ``pcm16`` (half the bytes;
    input and output rounded to 16 bits). The input must be at the server model's rate (``sample_rate``).
    """

    def __init__(self, url: str, *, token: Optional[str] = None, sample_format: str = "float32") -> None:
        self._remote = _RemoteSession(url, "roundtrip", token=token, sample_format=sample_format)
        ready = self._remote.session.ready
        self.ready = ready
        self.sample_rate: int = ready.sample_rate
        self.bits_per_token: float = math.log2(ready.codebook_size)
        self.latency_samples: int = ready.algorithmic_latency_samples

    @property
    def warnings(self) -> List[Dict[str, Any]]:
        """The server's warnings so far (``code`` ``behind``: it is slower than this session's input)."""
        return list(self._remote.warnings)

    def push(self, audio: np.ndarray) -> Tuple[np.ndarray, int]:
        if audio.shape[0]:
            self._remote.send(self._remote.session.send_audio(np.asarray(audio, np.float32)))
        return _split(self._remote.take())

    def flush(self) -> Tuple[np.ndarray, int]:
        return _split(self._remote.finish())

    def close(self) -> None:
        """Abandon the session (after an error elsewhere); ``flush`` closes it otherwise."""
        self._remote.close()


class WebSocketTokenDecoder:
    """:class:`snac_stream.live.TokenTransport` through a server's ``decode`` session at ``url``.

    Token ids are in the layout named ``layout`` (``snac_stream.tokens.LAYOUTS``) with ``token_offset``, both
    sent in the hello: the layout's shape is the server model's. A stream the server rejects (an id out of
    range for its frame position, a partial frame at the end) raises ``ValueError``.
    """

    def __init__(self, url: str, layout: str = "orpheus", *, token_offset: int = 0,
                 token: Optional[str] = None) -> None:
        self._remote = _RemoteSession(url, "decode", token=token, token_layout=layout, token_offset=token_offset)
        self.ready = self._remote.session.ready
        self.sample_rate: int = self.ready.sample_rate

    def push(self, ids: Sequence[int]) -> np.ndarray:
        if len(ids):
            self._remote.send(self._remote.session.send_tokens(ids))
        return _split(self._remote.take())[0]

    def flush(self) -> np.ndarray:
        return _split(self._remote.finish())[0]

    def close(self) -> None:
        self._remote.close()


def token_text_from_websocket(url: str, *, token: Optional[str] = None) -> Iterator[str]:
    """Token text from a websocket as it arrives, until the peer closes the connection.

    Text messages are passed on as they are (``<custom_token_N>`` text or integer ids); binary messages are
    little-endian int32 token ids, passed on as integers separated by spaces. ``token`` is sent as an
    ``Authorization: Bearer`` header. A connection that cannot be opened, or that ends in an error rather
    than a normal close, raises :class:`RemoteError`.
    """
    from websockets.exceptions import ConnectionClosedError, WebSocketException
    from websockets.sync.client import connect

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        ws = connect(url, additional_headers=headers, open_timeout=CONNECT_TIMEOUT_S)
    except (OSError, WebSocketException, TimeoutError) as exc:
        raise RemoteError(f"cannot read tokens from {url}: {exc}") from None
    with ws:
        while True:
            try:
                message = ws.recv()
            except ConnectionClosedError as exc:
                raise RemoteError(f"the token stream from {url} ended with an error: {exc}") from None
            except WebSocketException:  # a normal close: the end of the stream
                return
            if isinstance(message, str):
                yield message
            else:
                if len(message) % 4:
                    raise ValueError(f"a binary message from {url} is {len(message)} bytes, not whole int32 ids")
                yield " ".join(map(str, np.frombuffer(message, dtype="<i4").tolist())) + " "
