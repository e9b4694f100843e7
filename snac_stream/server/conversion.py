"""A session's client audio formats: the hello's formats and rates checked, the client's audio converted to the
model's on the way in and back on the way out, by :mod:`snac_stream.formats`' stream objects (the ones the
command line and the library use). Event loop only, but for the Opus encoding (below).

PCM (``pcm16`` / ``float32``) at the model's rate is not converted: the protocol's own decoding and the lanes'
batched conversion per sample format serve it, bit for bit as before. Any other format or rate gets an
:class:`~snac_stream.formats.InputDecoder` / :class:`~snac_stream.formats.OutputEncoder`; the engines then see
float32 at the model's rate, and the positions and counts the client sees (``input_end``, ``start``, ``count``,
``done``) are turned into the client's units: input items (samples at the input rate; bytes for the Opus
containers) and output items (samples at the output rate; bytes).

Where the conversion runs, and why: never on the engine thread, whose tick every session shares (one session's
conversion there would stall every other session's step). Input is converted on the event loop as each message
arrives: G.711, PCM and soxr resampling take 7-10 us a 20 ms message, Opus decoding about 0.2 % of a core per
stream. Output in PCM or G.711 (resampled or not) likewise, about 30 us an 85 ms engine frame (measured on the
2-core CPU, ``bench/format_cost.py``). Opus encoding takes about 0.75 % of a core per stream (0.65 ms per 85 ms of
24 kHz audio): a hundred Opus streams would take most of the loop's core and delay every socket, so it runs in the
loop's default thread pool (PyAV lets go of the GIL while libopus codes), one batch of frames at a time per
session, in order (the hop costs about 0.2-0.3 % of a core more per stream).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

import numpy as np

from ..formats import InputDecoder, OutputEncoder, check_format
from ..protocol import (AUDIO_FORMATS, CONTAINER_FORMATS, FLAG_FINAL, HEADER, HEADER_BYTES, PAYLOAD_AUDIO,
                        SAMPLE_FORMATS, Hello, ProtocolError, decode_audio, dumps)

log = logging.getLogger("snac_stream.server")

Message = Union[bytes, str]
_AUDIO_IN = ("encode", "roundtrip")
_AUDIO_OUT = ("decode", "roundtrip")


@dataclass
class _Job:
    """One message on its way to the client: sent as it is, or its ``audio`` encoded into a frame first; ``done``
    (the parsed message) flushes the encoder and is sent in the client's units."""

    message: Optional[Message]
    audio: Optional[np.ndarray] = None
    flags: int = 0
    input_end: int = 0
    server_us: int = 0
    done: Optional[Dict[str, Any]] = None
    taken: float = 0.0  # perf_counter when the engine's output reached the loop
    error: Optional[ProtocolError] = None  # in done's place: an llm session's end_error


class SessionFormats:
    """The client's audio formats of one session, and their converters.

    Args:
        hello: the session's hello (its names and types already checked by :meth:`Hello.parse`).
        model_rate: the model's sample rate (Hz).

    Raises ``ProtocolError``: ``bad_sample_rate`` for a rate outside 8000..48000 Hz or one its format does not
    take (Opus: 48000), ``bad_hello`` for the rest (a direction field for a kind without audio that way, an
    ``opus_bitrate`` without Opus output or out of range, Opus without PyAV on the server).
    """

    def __init__(self, hello: Hello, model_rate: int) -> None:
        self.model_rate = model_rate
        wanted = hello.formats()
        has = {"input": hello.kind in _AUDIO_IN, "output": hello.kind in _AUDIO_OUT}
        for way in ("input", "output"):
            given = [name for name in (f"{way}_format", f"{way}_rate") if getattr(hello, name) is not None]
            if given and not has[way]:
                raise ProtocolError("bad_hello", f"{hello.kind} sessions have no audio {way}: "
                                                 f"{' and '.join(given)} do not apply")
        out_fmt = wanted["output"][0]
        if hello.opus_bitrate is not None and not (has["output"] and out_fmt in CONTAINER_FORMATS):
            raise ProtocolError("bad_hello", "opus_bitrate applies to an opus or webm output only")
        self.input_format, self.input_rate = self._check(hello, "input") if has["input"] else (None, None)
        self.output_format, self.output_rate = self._check(hello, "output") if has["output"] else (None, None)
        self.input: Optional[InputDecoder] = None
        self.output: Optional[OutputEncoder] = None
        try:
            if has["input"] and not self._plain(self.input_format, self.input_rate):
                self.input = InputDecoder(self.input_format, self.input_rate, model_rate=model_rate)
            if has["output"] and not self._plain(self.output_format, self.output_rate):
                options = {} if hello.opus_bitrate is None else {"bitrate": hello.opus_bitrate}
                self.output = OutputEncoder(self.output_format, self.output_rate, model_rate=model_rate, **options)
        except ImportError as exc:  # PyAV missing: this server cannot code Opus
            raise ProtocolError("bad_hello", f"this server cannot code Opus: {exc}") from None
        except ValueError as exc:  # the bitrate: formats and rates were checked above
            raise ProtocolError("bad_hello", str(exc)) from None
        #: the sample format the lanes put this session's audio in: the client's own, or float32 to convert here
        self.engine_format: str = "float32" if self.output is not None or not has["output"] else str(out_fmt)
        # Input: (model samples received, client items received) after each message that gave the engine samples.
        self.items_in = 0
        self._ends: List[int] = []
        self._items: List[int] = []
        self._used: Dict[int, int] = {}  # per payload kind: the lowest map entry its frames may still ask for
        self._flush: Optional[Tuple[int, float]] = None  # (client input items, perf_counter) at flush
        self._last_end = 0  # the latest input_end sent (client units)
        # Output: items sent, the jobs waiting for the thread pool, the task taking them there.
        self.items_out = 0
        self._offload = self.output is not None and self.output_format in CONTAINER_FORMATS
        self._jobs: Deque[_Job] = collections.deque()
        self._task: Optional[asyncio.Task] = None

    # ---- what the session runs with ---------------------------------------------------------------------
    def _check(self, hello: Hello, way: str) -> Tuple[str, int]:
        fmt, rate = hello.formats()[way]
        try:
            return check_format(fmt, rate, model_rate=self.model_rate)
        except ValueError as exc:  # the name is known (Hello.parse): the rate is at fault
            field = f"{way}_rate" if getattr(hello, f"{way}_rate") is not None else "sample_rate"
            raise ProtocolError("bad_sample_rate", f"{way} ({fmt}, {field}): {exc}") from None

    def _plain(self, fmt: str, rate: int) -> bool:
        """What the protocol and the lanes serve without conversion: PCM at the model's rate."""
        return fmt in SAMPLE_FORMATS and rate == self.model_rate

    @property
    def converted(self) -> bool:
        """Whether any of the session's audio is converted (else its messages pass through untouched)."""
        return self.input is not None or self.output is not None

    @property
    def added_latency(self) -> int:
        """Worst-case delay the conversions add, in samples at the model's rate."""
        return sum(c.latency_samples for c in (self.input, self.output) if c is not None)

    def ready_fields(self) -> Dict[str, Any]:
        """The formats, rates and added latencies (samples at the client's rate) ``ready`` announces."""
        def latency(conv: Any, rate: Optional[int]) -> Optional[int]:
            if rate is None:
                return None
            return 0 if conv is None else math.ceil(conv.latency_samples * rate / self.model_rate)

        return {"input_format": self.input_format, "input_rate": self.input_rate,
                "input_latency_samples": latency(self.input, self.input_rate),
                "output_format": self.output_format, "output_rate": self.output_rate,
                "output_latency_samples": latency(self.output, self.output_rate),
                "opus_bitrate": self.output.bitrate if self.output is not None else None}

    # ---- input (event loop) ---------------------------------------------------------------------------------
    def decode(self, payload: bytes) -> np.ndarray:
        """One input message -> float32 samples at the model's rate (possibly none); ``bad_audio`` if malformed.
        A message of a sample format carries whole samples; Opus container bytes may be split anywhere."""
        if self.input is None:
            return decode_audio(payload, self.input_format)  # type: ignore[arg-type]
        width = AUDIO_FORMATS[self.input.format]
        if len(payload) % width:
            raise ProtocolError("bad_audio", f"{self.input.format} audio needs a multiple of {width} bytes per "
                                             f"frame, got {len(payload)}")
        try:
            samples = self.input.push(payload)
        except ValueError as exc:  # PyAV's decoding errors are ValueErrors too
            raise ProtocolError("bad_audio", str(exc)) from None
        self.items_in += len(payload) // width
        return samples

    def delivered(self, received: int) -> None:
        """The engine has been given samples: ``received`` model samples in all, for the items so far."""
        if self.input is not None:
            self._ends.append(received)
            self._items.append(self.items_in)

    def end_input(self, now: float) -> np.ndarray:
        """At flush (of any kind): the input decoder's last samples (the resampler's tail; none without one);
        ``bad_audio`` if the stream ends inside a sample or an Opus page."""
        self._flush = (self.items_in, now)
        if self.input is None:
            return np.zeros(0, np.float32)
        try:
            return self.input.flush()
        except ValueError as exc:
            raise ProtocolError("bad_audio", str(exc)) from None

    def _input_items(self, kind: int, flags: int, model_end: int) -> int:
        """A frame's ``input_end`` (model samples) in client items: what had been received when the engine
        got that many samples (the flush's count for end-of-stream frames)."""
        if flags & FLAG_FINAL and self._flush is not None:
            return self._flush[0]
        i = bisect.bisect_right(self._ends, model_end, lo=self._used.get(kind, 0)) - 1
        items = self._items[i] if i >= 0 else 0
        self._used[kind] = max(i, 0)
        low = min(self._used.values())
        if low > 4096 and len(self._used) == self._kinds_out:  # forget what no frame can ask for any more
            del self._ends[:low], self._items[:low]
            self._used = {k: v - low for k, v in self._used.items()}
        return items

    @property
    def _kinds_out(self) -> int:
        return 2 if self.input_format is not None and self.output_format is not None else 1

    # ---- output (event loop; Opus encoding in the thread pool) ----------------------------------------------
    def take(self, item: Union[Message, ProtocolError], send: Callable[[Message], None],
             fail: Callable[[ProtocolError], None]) -> None:
        """One of the engine's messages for this session: converted, then handed to ``send`` in order. A
        ``ProtocolError`` (an llm session's ``end_error``) ends the stream as ``done`` does, then goes to ``fail``."""
        job = self._prepare(item)
        if not self._offload:
            try:
                self._finish(job, self._encode(job), send, fail)
            except Exception as exc:  # noqa: BLE001 - a fault of this session's conversion ends it alone
                self._failed(exc, fail)
            return
        self._jobs.append(job)
        if self._task is None:
            self._task = asyncio.ensure_future(self._drain(send, fail))

    async def drained(self) -> None:
        """Return once every message taken so far has been handed on."""
        while self._task is not None:
            await asyncio.shield(self._task)

    async def _drain(self, send: Callable[[Message], None], fail: Callable[[ProtocolError], None]) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._jobs:
                jobs = list(self._jobs)
                self._jobs.clear()
                coded = await loop.run_in_executor(None, lambda: [self._encode(job) for job in jobs])
                for job, data in zip(jobs, coded):
                    self._finish(job, data, send, fail)
        except Exception as exc:  # noqa: BLE001
            self._jobs.clear()
            self._failed(exc, fail)
        finally:
            self._task = None

    @staticmethod
    def _failed(exc: Exception, fail: Callable[[ProtocolError], None]) -> None:
        log.error("converting a session's output failed", exc_info=exc)
        fail(ProtocolError("internal_error", f"internal error: {type(exc).__name__}"))

    def _prepare(self, item: Union[Message, ProtocolError]) -> _Job:
        """[loop] The job for one message: headers in the client's units, the audio to encode, ``done``."""
        now = time.perf_counter()
        if isinstance(item, ProtocolError):  # the stream's end, as done, but told as this error
            return _Job(None, done={}, taken=now, error=item)
        if isinstance(item, str):
            message = json.loads(item)
            return _Job(item, done=message if message.get("type") == "done" else None, taken=now)
        kind, flags, start, input_end, count, server_us, compute_us = HEADER.unpack_from(item)
        if self.input is not None:
            input_end = self._input_items(kind, flags, input_end)
        self._last_end = max(self._last_end, input_end)
        if kind == PAYLOAD_AUDIO and self.output is not None:
            audio = np.frombuffer(item, "<f4", offset=HEADER_BYTES)
            return _Job(None, audio, flags, input_end, server_us, taken=now)
        if self.input is not None:
            item = HEADER.pack(kind, flags, start, input_end, count, server_us, compute_us) + item[HEADER_BYTES:]
        return _Job(item)

    def _encode(self, job: _Job) -> bytes:
        """[loop or thread pool] The job's client bytes: its audio encoded, or the encoder's end at ``done``."""
        if self.output is None:
            return b""
        if job.audio is not None:
            return self.output.push(job.audio)
        return self.output.flush() if job.done is not None else b""

    def _finish(self, job: _Job, data: bytes, send: Callable[[Message], None],
                fail: Callable[[ProtocolError], None]) -> None:
        """[loop] Send the job's message, or its coded audio as a frame (and at ``done`` the encoder's end
        first, as the last frame, flagged FINAL)."""
        now = time.perf_counter()
        if data:
            if job.done is not None:  # the encoder's tail: it waited for the flush and all the input before it
                flush_time = self._flush[1] if self._flush is not None else job.taken
                flags, input_end, server_us = FLAG_FINAL, self._last_end, (now - flush_time) * 1e6
            else:  # the engine's time, plus the wait for and time of the conversion
                flags, input_end, server_us = job.flags, job.input_end, job.server_us + (now - job.taken) * 1e6
            count = len(data) // AUDIO_FORMATS[self.output.format]  # type: ignore[union-attr]
            send(HEADER.pack(PAYLOAD_AUDIO, flags, self.items_out, input_end, count, min(int(server_us), 2**32 - 1),
                             0) + data)
            self.items_out += count
        if job.error is not None:
            fail(job.error)
        elif job.done is not None:
            send(self._done(job.done))
        elif job.message is not None:
            send(job.message)

    def _done(self, message: Dict[str, Any]) -> str:
        """``done`` in the client's units."""
        if self.input is not None:
            message["input_items"] = self.items_in
        if self.output is not None:
            if self.output.format in CONTAINER_FORMATS:
                message["output_samples"], message["output_bytes"] = None, self.items_out
            else:
                message["output_samples"] = self.items_out
        return dumps(message)
