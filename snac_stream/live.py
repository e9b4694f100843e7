"""The live demos' engine: audio -> codes -> audio, and flat LLM tokens -> audio, block by block.

Two loops, each a plain function over a source, a *codec transport* and a sink (:mod:`snac_stream.audio_io`):

* :func:`run_codec` feeds microphone (or file) blocks through a :class:`CodecTransport` and plays (or
  writes) what comes back, measuring the latency of every output block: the time a sample is played minus
  the time the same sample was captured.
* :func:`run_token_playback` feeds text chunks of an Orpheus-style token stream through a
  :class:`TokenTransport` and plays the audio, measuring the time to first audio.

The transports are the seam between the loops and the codec: :class:`InProcessCodec` and
:class:`InProcessTokenDecoder` run the streaming encoder/decoder in this process; :mod:`snac_stream.remote`
implements the same methods over a websocket server's roundtrip and decode sessions. Stream positions are sample counts at the model's rate.
"""

from __future__ import annotations

import codecs
import collections
import math
import os
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Iterable, Iterator, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from .streaming import SNAC
from .streaming.latency import roundtrip_latency_samples
from .tokens import TokenLayout, TokenTextParser


# ---- transports ----------------------------------------------------------------------------------------
class CodecTransport(Protocol):
    """Audio in, audio out through the codec. Samples are mono float32 at ``sample_rate``.

    Output sample ``n`` is the codec's rendering of input sample ``n`` (no offset), so the loop can pair them.
    """

    sample_rate: int
    bits_per_token: float
    latency_samples: int  # algorithmic delay: input samples that must arrive before a sample can come out

    def push(self, audio: np.ndarray) -> Tuple[np.ndarray, int]:
        """Samples (n,) in -> (decoded samples now final, number of tokens the encoder emitted)."""

    def flush(self) -> Tuple[np.ndarray, int]:
        """End of stream: the remaining decoded samples and tokens."""


class TokenTransport(Protocol):
    """Flat token ids in, audio out. Samples are mono float32 at ``sample_rate``."""

    sample_rate: int

    def push(self, ids: Sequence[int]) -> np.ndarray:
        """Token ids (any number, frames may be partial) -> decoded samples now final."""

    def flush(self) -> np.ndarray:
        """End of stream: the remaining samples (a partial frame at the end raises ``ValueError``)."""


def _samples(audio: torch.Tensor) -> np.ndarray:
    return audio[0, 0].detach().to("cpu", torch.float32).numpy()


class InProcessCodec:
    """:class:`CodecTransport` running ``model``'s streaming encoder and decoder here.

    ``lookahead_samples`` is the decoder's latency dial (``None``: exact decoding, the default).
    """

    def __init__(self, model: SNAC, lookahead_samples: Optional[int] = None) -> None:
        self.model = model
        self.sample_rate: int = model.sampling_rate
        self.bits_per_token: float = math.log2(model.config.codebook_size)
        self.encoder = model.streaming_encoder()
        self.decoder = model.streaming_decoder(lookahead_samples=lookahead_samples)
        self.latency_samples: int = roundtrip_latency_samples(model, lookahead_samples)

    def _decode(self, codes: List[torch.Tensor]) -> Tuple[np.ndarray, int]:
        tokens = sum(c.shape[-1] for c in codes)
        return _samples(self.decoder.push(codes)), tokens

    def push(self, audio: np.ndarray) -> Tuple[np.ndarray, int]:
        chunk = torch.from_numpy(np.ascontiguousarray(audio, np.float32)).to(self.model.device).view(1, 1, -1)
        with torch.inference_mode():
            return self._decode(self.encoder.push(chunk))

    def flush(self) -> Tuple[np.ndarray, int]:
        with torch.inference_mode():
            out, tokens = self._decode(self.encoder.flush())
            return np.concatenate([out, _samples(self.decoder.flush())]), tokens


class InProcessTokenDecoder:
    """:class:`TokenTransport` parsing ids with ``layout`` and decoding each coarse frame as soon as it is complete."""

    def __init__(self, model: SNAC, layout: TokenLayout, lookahead_samples: Optional[int] = None) -> None:
        self.model = model
        self.sample_rate: int = model.sampling_rate
        self.parser = layout.parser()
        self.decoder = model.streaming_decoder(lookahead_samples=lookahead_samples)
        self.frame_tokens = layout.frame_tokens

    def push(self, ids: Sequence[int]) -> np.ndarray:
        with torch.inference_mode():
            codes = self.parser.push(torch.tensor(list(ids), dtype=torch.int64))
            if codes[0].shape[-1] == 0:
                return np.zeros(0, np.float32)
            return _samples(self.decoder.push([c.to(self.model.device) for c in codes]))

    def flush(self) -> np.ndarray:
        if self.parser.pending:
            raise ValueError(f"the token stream ends inside a coarse frame: {self.parser.pending} of its "
                             f"{self.frame_tokens} tokens arrived")
        with torch.inference_mode():
            return _samples(self.decoder.flush())


# ---- token text ----------------------------------------------------------------------------------------
def read_text_chunks(fd: int, size: int = 65536) -> Iterator[str]:
    """UTF-8 text from a file descriptor as it arrives: each ``os.read`` returns what is available (a pipe
    delivers a writer's pieces as they are written), decoded incrementally so a split character is kept."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    while True:
        data = os.read(fd, size)
        try:
            text = decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise ValueError(f"the token stream is not UTF-8 text ({exc.reason} at byte {exc.start} of a chunk)") from None
        if text:
            yield text
        if not data:
            return


# ---- latency accounting --------------------------------------------------------------------------------
class LatencyMeter:
    """Pairs the capture time of stream position ``n`` with the time ``n`` is played.

    The loop :meth:`mark_captured` each block it feeds (position of its first sample, capture time); the sink
    calls :meth:`played` from its audio thread. Positions are in model-rate samples.
    """

    def __init__(self, rate: int, keep: int = 4096, label: str = "latency") -> None:
        self.rate = rate
        self.label = label  # what the values are called: "queueing" for input sent faster than real time
        self._marks: Deque[Tuple[int, float]] = collections.deque()
        self._lock = threading.Lock()
        self.values: Deque[float] = collections.deque(maxlen=keep)  # seconds

    def mark_captured(self, position: int, captured_at: float) -> None:
        with self._lock:
            self._marks.append((position, captured_at))

    def played(self, position: int, played_at: float) -> None:
        with self._lock:
            while len(self._marks) > 1 and self._marks[1][0] <= position:
                self._marks.popleft()  # positions only grow: older marks are never needed again
            if not self._marks or self._marks[0][0] > position:
                return
            start, captured_at = self._marks[0]
            self.values.append(played_at - (captured_at + (position - start) / self.rate))

    @property
    def last(self) -> Optional[float]:
        return self.values[-1] if self.values else None

    def summary(self) -> Optional[Tuple[float, float, float]]:
        """(median, min, max) latency in seconds, or ``None`` before anything was played."""
        values = list(self.values)
        return (statistics.median(values), min(values), max(values)) if values else None


@dataclass
class LiveStats:
    """Counters of a :func:`run_codec` run. Samples at the model's rate; times in seconds."""

    rate: int
    bits_per_token: float
    captured: int = 0  # samples fed to the codec
    produced: int = 0  # samples the codec gave back
    tokens: int = 0
    dropped_blocks: int = 0
    underruns: int = 0
    started_at: float = field(default_factory=time.monotonic)
    latency: Optional[LatencyMeter] = None

    @property
    def audio_seconds(self) -> float:
        return self.captured / self.rate

    @property
    def token_rate(self) -> float:
        """Tokens per second of audio."""
        return self.tokens / self.audio_seconds if self.captured else 0.0

    @property
    def bitrate(self) -> float:
        """Bits per second of audio."""
        return self.token_rate * self.bits_per_token

    def status(self) -> str:
        last = self.latency.last if self.latency else None
        label = self.latency.label if self.latency else "latency"
        lat = f"{last * 1000:6.0f} ms" if last is not None else "     - ms"
        return (f"{self.audio_seconds:6.1f} s  {label} {lat}  {self.bitrate / 1000:5.2f} kbps  "
                f"{self.token_rate:5.1f} tokens/s  dropped {self.dropped_blocks}  underruns {self.underruns}")


class Source(Protocol):
    dropped_blocks: int

    def start(self) -> None: ...
    def read(self): ...  # -> Optional[Block]
    def stop(self) -> None: ...


class Sink(Protocol):
    underruns: int
    first_audio_at: Optional[float]

    def start(self) -> None: ...
    def write(self, samples: np.ndarray) -> None: ...
    def close(self) -> None: ...  # end of stream: play out / write everything
    def abort(self) -> None: ...  # give up: release the device, write nothing


def run_codec(source: Source, codec: CodecTransport, sink: Sink, *, latency: Optional[LatencyMeter] = None,
              max_samples: Optional[int] = None, tee: Optional[Callable[[np.ndarray], None]] = None,
              on_status: Optional[Callable[[LiveStats], None]] = None, status_every: float = 0.5,
              on_start: Optional[Callable[[], None]] = None) -> LiveStats:
    """Stream ``source`` through ``codec`` into ``sink`` until the source ends, ``max_samples`` (model rate)
    have been fed, or Ctrl-C; then flush the codec and let the sink play out.

    ``latency`` must be the meter the sink reports to (its ``on_play``); ``tee`` sees every block fed to the
    codec (e.g. to save what the microphone heard); ``on_status`` is called every ``status_every`` seconds,
    ``on_start`` once both ends are running.
    """
    stats = LiveStats(codec.sample_rate, codec.bits_per_token, latency=latency)
    next_status = time.monotonic() + status_every
    sink.start()
    source.start()
    if on_start is not None:
        on_start()
    try:
        while max_samples is None or stats.captured < max_samples:
            block = source.read()
            if block is None:
                break
            samples = block.samples
            if max_samples is not None:
                samples = samples[: max_samples - stats.captured]
            if latency is not None:
                latency.mark_captured(stats.captured, block.captured_at)
            if tee is not None:
                tee(samples)
            out, tokens = codec.push(samples)
            stats.captured += samples.shape[0]
            stats.tokens += tokens
            stats.produced += out.shape[0]
            sink.write(out)
            stats.dropped_blocks, stats.underruns = source.dropped_blocks, sink.underruns
            if on_status is not None and time.monotonic() >= next_status:
                next_status = time.monotonic() + status_every  # no catching up after a stall
                on_status(stats)
    except KeyboardInterrupt:
        pass  # Ctrl-C ends the session like the end of the input: flush and play out what is left
    except BaseException:
        source.stop()
        sink.abort()
        raise
    source.stop()
    out, tokens = codec.flush()
    stats.tokens += tokens
    # The codec pads the last coarse frame; the input ended at ``captured``.
    out = out[: max(0, stats.captured - stats.produced)]
    stats.produced += out.shape[0]
    sink.write(out)
    sink.close()
    stats.dropped_blocks, stats.underruns = source.dropped_blocks, sink.underruns
    return stats


@dataclass
class PlaybackStats:
    """Counters of a :func:`run_token_playback` run; times are ``time.monotonic()`` seconds."""

    rate: int
    tokens: int = 0
    samples: int = 0
    first_token_at: Optional[float] = None
    first_audio_at: Optional[float] = None
    underruns: int = 0

    @property
    def time_to_first_audio(self) -> Optional[float]:
        """Seconds from the first token's arrival to the first audio sample played (or written)."""
        if self.first_token_at is None or self.first_audio_at is None:
            return None
        return self.first_audio_at - self.first_token_at


def run_token_playback(chunks: Iterable[str], parser: TokenTextParser, decoder: TokenTransport, sink: Sink,
                       on_first_audio: Optional[Callable[[PlaybackStats], None]] = None) -> PlaybackStats:
    """Decode text chunks of a token stream as they arrive and play (or write) the audio.

    ``on_first_audio`` is called once, as soon as the first decoded samples have gone to the sink.

    Errors in the stream (bad text, ids out of range for their frame position) raise ``ValueError`` naming
    the line and column of the offending token.
    """
    stats = PlaybackStats(decoder.sample_rate)
    sink.start()
    try:
        for text in _with_end(chunks):
            ids = parser.feed(text or "", final=text is None)
            if not ids:
                continue
            if stats.first_token_at is None:
                stats.first_token_at = time.monotonic()
            try:
                out = decoder.push(ids)
            except ValueError as exc:
                raise ValueError(f"{_locate(exc, parser, stats.tokens)}: {exc}") from None
            stats.tokens += len(ids)
            first = stats.samples == 0 and out.shape[0] > 0
            stats.samples += out.shape[0]
            sink.write(out)
            stats.underruns = sink.underruns
            if first and on_first_audio is not None:
                on_first_audio(stats)
        out = decoder.flush()
        stats.samples += out.shape[0]
        sink.write(out)
    except BaseException:
        sink.abort()  # the error is the news, not an empty output
        raise
    sink.close()
    stats.underruns, stats.first_audio_at = sink.underruns, sink.first_audio_at
    return stats


def _with_end(chunks: Iterable[str]) -> Iterator[Optional[str]]:
    yield from chunks
    yield None  # end of stream: lets the parser complete a token that ended exactly at the last byte


def _locate(exc: ValueError, parser: TokenTextParser, before: int) -> str:
    """'line L, column C of SOURCE' of the token a layout error names (by its stream index)."""
    match = re.search(r"stream index (\d+)", str(exc))
    if match:
        index = int(match.group(1)) - before
        if 0 <= index < len(parser.positions):
            return parser.where(*parser.positions[index])
    return parser.source
