"""One client session, its state split by the thread that owns it.

The event loop serves the socket (:class:`LoopSide`: the parser, counts, the output queue and its writer);
the engine worker computes its output (:class:`EngineSide`: output positions; its streams on the engines
live in the lanes, :mod:`.lanes`). :class:`Session` holds both, what is fixed once the hello is accepted
(before the engine first sees the session), and the few fields one thread hands to the other.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Deque, List, Optional, Tuple, Union

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ..protocol import Hello, ProtocolError
from ..tokens import TokenLayout, TokenParser
from .conversion import SessionFormats

# (input items received when a step became runnable, receive time of the message that completed it): what an
# output frame's input_end and server time are measured from.
Marker = Tuple[int, float]
# What a tick hands back to the event loop: a message for a session's client, or the error that ends it.
Event = Tuple["Session", Union[bytes, str, ProtocolError]]
Events = List[Event]
# An input message's content for the engine: (samples or codes, input count after it, receive time).
Input = Tuple[Any, int, float]

_CLOSE = object()  # writer sentinel: close the socket after what is queued


def message_bytes(message: Union[bytes, str]) -> int:
    """A message's size on the wire in bytes (a text message's UTF-8 encoding, not its characters)."""
    return len(message.encode("utf-8")) if isinstance(message, str) else len(message)


class LoopSide:
    """The part of a session only the event loop touches."""

    def __init__(self, ws: ServerConnection):
        self.ws = ws
        self.parser: Optional[TokenParser] = None  # decode sessions: token ids -> codes
        self.received = 0  # input items (samples, or tokens for decode) received
        self.held: List[Any] = []  # input received short of a whole engine step, not handed over yet
        self.coarse_frames = 0  # decode: whole coarse frames received
        self.ended: Optional[asyncio.Future] = None  # resolved once the stream's end has been sent
        self.out: Deque[Any] = collections.deque()  # messages for the client, then a close
        self.out_bytes = 0  # bytes of the queued messages (close markers aside)
        self.out_ready = asyncio.Event()
        self.progress = asyncio.Event()  # set when the engine consumed input, output went out or the writer ended
        self.sent_at = time.monotonic()  # when the writer last handed a message to the socket (monotonic s)
        self.peer_gone = False  # the writer found the connection closed: the session ends at the next look
        self.awaiting_hello = True  # nothing received yet: a drain does not wait for such a connection
        self.dead = False
        self.error: Optional[ProtocolError] = None
        self.writer: Optional[asyncio.Task] = None
        self.feeder: Optional[asyncio.Task] = None  # an llm session's completion stream (stopped on failure)

    def queue_close(self, code: int, reason: str) -> None:
        """Close the socket once the writer has sent what is queued before this."""
        self.out.append((_CLOSE, code, reason))
        self.out_ready.set()

    async def write_loop(self) -> None:
        """Send the queued messages in order until a queued close (or the peer's: then ``peer_gone``)."""
        try:
            while True:
                while not self.out:
                    self.out_ready.clear()
                    await self.out_ready.wait()
                item = self.out.popleft()
                if isinstance(item, tuple) and item[0] is _CLOSE:
                    await self.ws.close(item[1], item[2])
                    return
                self.out_bytes -= message_bytes(item)
                await self.ws.send(item)
                self.sent_at = time.monotonic()
                self.progress.set()
        except ConnectionClosed:
            # The read loop may have stopped reading (a full queue) and would not see the close itself.
            self.peer_gone = True
        finally:
            self.progress.set()


class EngineSide:
    """The part of a session only the engine worker touches (besides its streams, held by the lanes)."""

    def __init__(self) -> None:
        self.audio_pos = 0  # output samples sent
        self.token_pos = 0  # output tokens sent
        self.warned_at: Optional[float] = None  # last "behind" warning


class Session:
    """One client.

    ``number``, ``hello``, ``layout``, ``placement``, ``formats`` (the client's audio formats and their converters, which only
    the loop touches) and ``audio_format`` (the sample format the lanes put output audio in) are set on the loop
    before the engine first sees the session and do not change after. Handed between the threads: ``inbox`` (the
    loop appends input, the engine pops it; both atomic on a deque), ``flush_at`` (set by the loop before it asks
    the engine to end the stream) and ``consumed`` (advanced by the engine, read by the loop for backpressure).
    ``llm`` (an llm session's request, :mod:`.llm`) is set with the hello; ``end_error``, set by the loop before
    it ends an llm session's stream, is what the engine sends in place of ``done`` (its LLM failed after some
    whole frames: their audio and tail go first).
    """

    def __init__(self, ws: ServerConnection, number: int):
        self.number = number
        self.kind = "?"  # the hello's kind once it has come (set with ``hello``): the lanes read it per session
        self.hello: Optional[Hello] = None
        self.layout: Optional[TokenLayout] = None
        self.formats: Optional[SessionFormats] = None
        self.audio_format = "pcm16"
        self.loop = LoopSide(ws)
        self.engine = EngineSide()
        self.inbox: Deque[Input] = collections.deque()  # input not yet submitted to an engine
        self.flush_at: Optional[Marker] = None  # (received, time) at flush
        self.consumed = 0  # input items stepped through the engine
        self.placement: Optional[int] = None  # the engine set (device) it runs on, set on the loop before opening
        self.llm: Optional[Any] = None  # an llm session's LLMSource
        self.end_error: Optional[ProtocolError] = None

    @property
    def hello(self) -> Optional[Hello]:
        return self._hello

    @hello.setter
    def hello(self, hello: Optional[Hello]) -> None:
        self._hello = hello
        self.kind = hello.kind if hello else "?"

    def take_inbox(self) -> List[Input]:
        """[engine] The input queued since the last call, oldest first."""
        pieces = []
        while self.inbox:
            pieces.append(self.inbox.popleft())
        return pieces
