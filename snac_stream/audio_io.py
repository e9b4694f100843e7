"""Live audio in and out, block by block: sound devices (sounddevice/PortAudio) and files, behind one interface.

A *source* yields :class:`Block` s of mono float32 samples at the model's rate, each stamped with the time its
first sample was captured; a *sink* takes samples at the model's rate and reports, through a callback, when
each one is played. Both count their own losses (blocks dropped because the consumer fell behind, output
underruns). Times are ``time.monotonic()`` seconds; stream positions are sample counts at the model's rate.

Devices get separate input and output streams (no full-duplex stream: the two clocks need not agree, and a
duplex stream through PulseAudio's ALSA plugin can stall), fixed block sizes, a bounded queue between the
input callback and the consumer, and an output jitter buffer that must fill before playback (re)starts.
When a device does not run at the model's rate, audio is resampled with soxr's streaming resampler.

``sounddevice`` is imported on first use, so files work without PortAudio installed.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Deque, List, Optional, Union

import numpy as np
import soxr

from .audio import RESAMPLE_QUALITY, load_audio, save_audio

DeviceSpec = Union[None, int, str]
PlayCallback = Callable[[int, float], None]  # (model-rate stream position, monotonic time it is played)


class AudioIOError(RuntimeError):
    """A device or stream problem with a message meant for the user (unknown device, unsupported rate...)."""


def sounddevice() -> Any:
    """The ``sounddevice`` module, or an :class:`AudioIOError` saying how to install it."""
    try:
        import sounddevice as sd
    except ImportError:
        raise AudioIOError("sound devices need the sounddevice package: pip install sounddevice "
                           "(or pip install \"snac-stream[live]\")") from None
    except OSError as exc:  # the module loads, but the PortAudio library is missing
        raise AudioIOError(f"sounddevice cannot load PortAudio ({exc}); install it, e.g. "
                           "apt-get install -y libportaudio2") from None
    return sd


#: How to get sound devices on a machine without any (a server, a container, CI).
VIRTUAL_DEVICES_HINT = ("for virtual ones, `python tests/virtual_audio.py DIR` (from a snac-stream checkout) "
                        "starts a private PulseAudio with a virtual microphone and speaker and prints the "
                        "environment to export (see docs/live.md); or use --input FILE / --output FILE")


def list_devices() -> str:
    """PortAudio's device table as text (index, name, host API, channels; ``>``/``<`` mark the defaults), with
    a note, and how to get virtual devices, when there are no input or no output devices."""
    devices = sounddevice().query_devices()
    missing = [kind for kind in ("input", "output")
               if not any(d[f"max_{kind}_channels"] >= 1 for d in devices)]
    if not missing:
        return str(devices)
    note = f"no {' or '.join(missing)} sound devices found; {VIRTUAL_DEVICES_HINT}"
    return f"{devices}\n{note}" if len(devices) else note


def find_device(spec: DeviceSpec, kind: str) -> int:
    """Index of the ``kind`` (``"input"`` or ``"output"``) device named by ``spec``.

    ``spec`` is ``None`` (the default device), an index (int or digit string), or a name: an exact name wins,
    otherwise a case-insensitive substring that matches exactly one device with ``kind`` channels.
    """
    sd = sounddevice()
    channels = "max_input_channels" if kind == "input" else "max_output_channels"
    devices = list(sd.query_devices())
    if spec is None:
        index = sd.default.device[0 if kind == "input" else 1]
        if index is None or index < 0:
            if not any(d[channels] >= 1 for d in devices):
                raise AudioIOError(f"no {kind} sound devices found; {VIRTUAL_DEVICES_HINT}")
            raise AudioIOError(f"there is no default {kind} device; pick one with --{kind}-device "
                               "(see --list-devices)")
        return int(index)
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        index = int(spec)
        if not 0 <= index < len(devices):
            raise AudioIOError(f"no {kind} device with index {index} ({len(devices)} devices; see --list-devices)")
        if devices[index][channels] < 1:
            raise AudioIOError(f"device {index} ({devices[index]['name']}) has no {kind} channels")
        return index
    usable = [(i, d["name"]) for i, d in enumerate(devices) if d[channels] >= 1]
    exact = [i for i, name in usable if name == spec]
    matches = exact or [i for i, name in usable if spec.lower() in name.lower()]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        names = ", ".join(repr(name) for _, name in usable) or "none"
        raise AudioIOError(f"no {kind} device matches {spec!r}; {kind} devices: {names}")
    raise AudioIOError(f"{kind} device {spec!r} is ambiguous: matches "
                       + ", ".join(f"{i} ({devices[i]['name']!r})" for i in matches) + "; pass its index")


def device_rate(device: int, kind: str, preferred: int, forced: Optional[int] = None) -> int:
    """The rate (Hz) to open ``device`` at: ``forced`` if given (error if unsupported), else ``preferred`` if
    the device accepts it, else the device's default rate (the caller resamples)."""
    sd = sounddevice()
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    info = sd.query_devices(device)

    def supported(rate: int) -> bool:
        try:
            check(device=device, samplerate=rate, channels=1, dtype="float32")
            return True
        except Exception:  # PortAudioError or ValueError, depending on what PortAudio dislikes
            return False

    if forced is not None:
        if not supported(forced):
            raise AudioIOError(f"{kind} device {device} ({info['name']}) does not support a sample rate of "
                               f"{forced} Hz (its default rate is {info['default_samplerate']:.0f} Hz)")
        return forced
    if supported(preferred):
        return preferred
    fallback = int(round(info["default_samplerate"]))
    if not supported(fallback):
        raise AudioIOError(f"{kind} device {device} ({info['name']}) supports neither {preferred} Hz nor its "
                           f"default {fallback} Hz for mono float32 audio")
    return fallback


class StreamResampler:
    """Chunk-by-chunk band-limited resampling (soxr) of mono float32 audio from ``in_rate`` to ``out_rate`` Hz.

    Identity when the rates agree. The streaming resampler holds back a few samples (its filter delay), which
    :meth:`flush` releases at the end of the stream.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate, self.out_rate = in_rate, out_rate
        self._stream = (None if in_rate == out_rate else
                        soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=RESAMPLE_QUALITY))

    def push(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(samples, last=last)

    def flush(self) -> np.ndarray:
        return self.push(np.zeros(0, np.float32), last=True)


@dataclass
class Block:
    """Mono float32 samples (n,) at the model's rate; ``captured_at``: monotonic time of the first sample."""

    samples: np.ndarray
    captured_at: float


class FileSource:
    """An audio file read ``block`` samples at a time (any format :func:`load_audio` reads, resampled).

    With ``realtime`` each block is released when it would have finished arriving from a microphone, and
    stamped with that time; otherwise blocks come as fast as they are asked for.
    """

    dropped_blocks = 0

    def __init__(self, path: Path, rate: int, block: int, realtime: bool = False) -> None:
        self.audio, self.file_rate = load_audio(path, rate)
        self.rate, self.block, self.realtime = rate, block, realtime
        self.position = 0
        self._stop = threading.Event()

    def start(self) -> None:
        self._t0 = time.monotonic()

    def read(self) -> Optional[Block]:
        """The next block, or ``None`` at the end of the file (or after :meth:`stop`)."""
        if self.position >= self.audio.shape[0] or self._stop.is_set():
            return None
        samples = self.audio[self.position : self.position + self.block]
        captured_at = self._t0 + self.position / self.rate
        if self.realtime:
            # Pacing: wait until the block's last sample "has been spoken"; stop() interrupts the wait.
            self._stop.wait(max(0.0, captured_at + samples.shape[0] / self.rate - time.monotonic()))
        else:
            captured_at = time.monotonic()
        self.position += samples.shape[0]
        return Block(samples, captured_at)

    def stop(self) -> None:
        self._stop.set()


class DeviceSource:
    """A microphone: an input stream whose callback queues blocks for the consumer (:meth:`read`).

    Args:
        device: device index (see :func:`find_device`).
        rate: the model's rate in Hz; ``device_rate``: the rate the device is opened at (resampled if different).
        block: samples per block at the model's rate (the device block is scaled to its own rate).
        max_queued: blocks the queue holds; when the consumer falls behind, new blocks are dropped and counted
            in ``dropped_blocks`` rather than letting the delay grow without bound.
    """

    def __init__(self, device: int, rate: int, device_rate: int, block: int, max_queued: int = 50) -> None:
        sd = sounddevice()
        self.rate, self.device_rate = rate, device_rate
        self.device_block = max(1, round(block * device_rate / rate))
        self.dropped_blocks = 0
        self.overflows = 0  # PortAudio reported input overflow (samples lost before reaching the callback)
        self._queue: "queue.Queue[Optional[Block]]" = queue.Queue(maxsize=max_queued)
        self._resampler = StreamResampler(device_rate, rate)
        self._stream = sd.InputStream(device=device, samplerate=device_rate, channels=1, dtype="float32",
                                      blocksize=self.device_block, latency="high", callback=self._callback)
        self.latency_s: float = float(self._stream.latency)

    def _callback(self, data: np.ndarray, frames: int, when: Any, status: Any) -> None:
        if status.input_overflow:
            self.overflows += 1
        now = time.monotonic()
        # PortAudio's clock may not be time.monotonic(): translate the capture time through "now".
        adc = when.inputBufferAdcTime
        captured_at = now - (when.currentTime - adc) if adc > 0 else now
        try:
            self._queue.put_nowait(Block(data[:, 0].copy(), captured_at))
        except queue.Full:
            self.dropped_blocks += 1

    def start(self) -> None:
        self._stream.start()

    def read(self, timeout: float = 5.0) -> Optional[Block]:
        """The next block (resampled to the model's rate), or ``None`` after :meth:`stop`."""
        try:
            block = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AudioIOError(f"the input device delivered no audio for {timeout:.0f} s") from None
        if block is None:
            return None
        block.samples = self._resampler.push(block.samples)
        return block

    def stop(self) -> None:
        self._stream.stop()
        self._stream.close()
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # make room for the end marker: the consumer is stopping anyway
            self._queue.get_nowait()
            self._queue.put_nowait(None)


class FileSink:
    """Collects the output and writes it to ``path`` at :meth:`close` (float32 wav keeps samples exact)."""

    underruns = 0

    def __init__(self, path: Path, rate: int, on_play: Optional[PlayCallback] = None) -> None:
        self.path, self.rate, self.on_play = Path(path), rate, on_play
        self._chunks: List[np.ndarray] = []
        self.position = 0
        self.first_audio_at: Optional[float] = None

    def start(self) -> None:
        pass

    def write(self, samples: np.ndarray) -> None:
        if samples.size == 0:
            return
        now = time.monotonic()
        self.first_audio_at = self.first_audio_at or now
        if self.on_play is not None:
            self.on_play(self.position, now)
        self._chunks.append(np.asarray(samples, np.float32))
        self.position += samples.shape[0]

    def abort(self) -> None:
        self._chunks.clear()

    def close(self) -> None:
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
        if audio.size == 0:
            raise AudioIOError(f"no audio was produced; {self.path} not written")
        subtype = "FLOAT" if self.path.suffix.lower() == ".wav" else None
        save_audio(self.path, audio, self.rate, subtype=subtype)


class DeviceSink:
    """A speaker: an output stream fed from a FIFO, with a jitter buffer.

    Playback starts once ``prebuffer`` samples (model rate) are queued, so that decoded audio, which arrives
    in bursts of whole coarse frames, plays without gaps. If the FIFO runs dry mid-stream the callback plays
    silence, counts an underrun and waits for the buffer to refill. ``on_play(position, time)`` reports when
    the first sample of each callback's audio reaches the speaker (position in model-rate samples).
    """

    def __init__(self, device: int, rate: int, device_rate: int, block: int, prebuffer: int,
                 on_play: Optional[PlayCallback] = None) -> None:
        sd = sounddevice()
        self.rate, self.device_rate, self.on_play = rate, device_rate, on_play
        self.device_block = max(1, round(block * device_rate / rate))
        self.prebuffer = max(1, round(prebuffer * device_rate / rate))
        self.underruns = 0
        self.first_audio_at: Optional[float] = None
        self._fifo: Deque[np.ndarray] = collections.deque()
        self._queued = 0  # samples in the FIFO (device rate)
        self._played = 0  # samples of real audio handed to the device (device rate)
        self._playing = False
        self._ended = False
        self._lock = threading.Lock()
        self._drained = threading.Event()
        self._silence_after_end = 0  # samples of silence played since the FIFO ran out at the end
        self._resampler = StreamResampler(rate, device_rate)
        self._stream = sd.OutputStream(device=device, samplerate=device_rate, channels=1, dtype="float32",
                                       blocksize=self.device_block, latency="high", callback=self._callback)
        self.latency_s: float = float(self._stream.latency)
        # Closing an output stream can drop what the host API still buffers, so after the last sample the
        # stream plays this much silence before close() returns.
        self._end_silence = round((self.latency_s + 0.05) * device_rate)

    def start(self) -> None:
        self._stream.start()

    def write(self, samples: np.ndarray) -> None:
        self._put(self._resampler.push(samples))

    def _put(self, samples: np.ndarray) -> None:
        if samples.size:
            with self._lock:
                self._fifo.append(samples)
                self._queued += samples.shape[0]

    def _callback(self, out: np.ndarray, frames: int, when: Any, status: Any) -> None:
        out.fill(0)
        with self._lock:
            if not self._playing:
                # Wait for the jitter buffer (at the end of the stream, play whatever is left).
                if self._queued < self.prebuffer and not (self._ended and self._queued):
                    if self._ended and not self._queued:
                        self._silence_after_end += frames
                        if self._silence_after_end >= self._end_silence:
                            self._drained.set()
                    return
                self._playing = True
            start = self._played
            filled = 0
            while filled < frames and self._fifo:
                head = self._fifo[0]
                n = min(frames - filled, head.shape[0])
                out[filled : filled + n, 0] = head[:n]
                filled += n
                if n == head.shape[0]:
                    self._fifo.popleft()
                else:
                    self._fifo[0] = head[n:]
            self._queued -= filled
            self._played += filled
            if filled < frames:
                self._playing = False
                if self._ended:
                    self._silence_after_end += frames - filled
                else:
                    self.underruns += 1
        if filled:
            now = time.monotonic()
            dac = when.outputBufferDacTime
            played_at = now + (dac - when.currentTime) if dac > 0 else now
            self.first_audio_at = self.first_audio_at or played_at
            if self.on_play is not None:
                self.on_play(round(start * self.rate / self.device_rate), played_at)

    def close(self, timeout: Optional[float] = None) -> None:
        """End of stream: play out the FIFO, then close the device (waits at most ``timeout`` seconds)."""
        self._put(self._resampler.flush())
        with self._lock:
            self._ended = True
            pending = self._queued / self.device_rate
        self._drained.wait(timeout if timeout is not None else pending + 2 * self.latency_s + 5.0)
        self._stream.stop()
        self._stream.close()

    def abort(self) -> None:
        self._stream.abort()  # drop what is queued
        self._stream.close()
