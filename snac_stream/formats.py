"""Client audio formats and sample rates, converted both ways as streams.

A voice session speaks the model's language (mono float32 at ``model.sampling_rate``) inside and the client's
outside: telephony sends G.711 at 8 kHz, browsers Opus, other clients 16-bit PCM at 16 or 48 kHz. Two
stateful per-stream objects convert between them:

* :class:`InputDecoder`: client bytes, in chunks of any size -> float32 samples at the model's rate;
* :class:`OutputEncoder`: float32 samples at the model's rate -> client bytes.

Both have ``push(...)`` and ``flush()`` (end of stream), and ``latency_samples`` (at the model's rate) /
``latency_s``: the worst-case delay the object adds between a sample going in and the same sample coming out
(resampler look-ahead and block buffering, Opus frame buffering and encoder look-ahead). PCM or G.711 at the
model's rate is the identity (no resampler, zero latency), so the codec's exactness carries through.

Formats (:data:`FORMATS`): ``pcm16`` and ``float32`` (little-endian), G.711 ``mulaw`` and ``alaw`` (one byte
a sample, ITU-T G.711 tables), ``opus`` (Opus in Ogg pages, RFC 7845) and ``webm`` (Opus in WebM, as
browsers record and play it), both through PyAV's libopus (the ``opus`` extra) with the containers written
and parsed here, incrementally. Rates are 8000-48000 Hz; G.711 is *not* restricted to 8 kHz (the companding
is sample by sample, so wideband G.711 works the same way) but 8000 is its default. Opus streams are 48 kHz
by definition: their ``sample_rate`` is 48000 whatever rate the model runs at.

Resampling is soxr's streaming resampler (:class:`soxr.ResampleStream`), whose output for any chunking is
bit-identical to soxr's whole-signal ``soxr.resample`` at the same quality. Default quality ``"HQ"`` (20-bit):
``"VHQ"`` (what file loading uses) holds back about twice as much audio, e.g. 154 ms instead of 74 ms worst
case between 8 and 24 kHz; see :func:`resampler_latency`.
"""

from __future__ import annotations

import functools
import math
import secrets
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import soxr

from .audio import float_to_pcm16

__all__ = [
    "FORMATS",
    "FormatInfo",
    "MIN_RATE",
    "MAX_RATE",
    "OPUS_RATE",
    "OPUS_BITRATES",
    "RESAMPLE_QUALITIES",
    "InputDecoder",
    "OutputEncoder",
    "available_formats",
    "check_format",
    "resampler_latency",
    "mulaw_encode",
    "mulaw_decode",
    "alaw_encode",
    "alaw_decode",
]

BytesLike = Union[bytes, bytearray, memoryview]

MIN_RATE, MAX_RATE = 8000, 48000
#: Ogg Opus is decoded at 48 kHz (RFC 7845); libopus also codes at these API rates.
OPUS_RATE = 48000
_OPUS_API_RATES = (8000, 12000, 16000, 24000, 48000)
#: Opus bitrates accepted, bits/s (libopus' useful range).
OPUS_BITRATES = (6000, 510000)
_OPUS_FRAME_MS = (10, 20, 40, 60)
_OPUS_APPLICATIONS = ("voip", "audio", "lowdelay")
_OPUS_FORMATS = ("opus", "webm")
RESAMPLE_QUALITIES = ("VHQ", "HQ", "MQ", "LQ")


@dataclass(frozen=True)
class FormatInfo:
    """One client audio format: what it is, its rates, what latency it adds."""

    name: str
    description: str
    bytes_per_sample: Optional[int]  # None: compressed
    rates: Tuple[int, int]  # allowed client rates, inclusive
    default_rate: Optional[int]  # None: the model's rate
    latency: str

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "description": self.description, "bytes_per_sample": self.bytes_per_sample,
                "rates": list(self.rates), "default_rate": self.default_rate, "latency": self.latency}


_RESAMPLE_NOTE = "none at the model's rate; otherwise soxr's streaming resampler (resampler_latency)"
FORMATS: Dict[str, FormatInfo] = {
    "pcm16": FormatInfo("pcm16", "signed 16-bit little-endian PCM, mono (scale 1/32768)", 2,
                        (MIN_RATE, MAX_RATE), None, _RESAMPLE_NOTE),
    "float32": FormatInfo("float32", "IEEE 32-bit float little-endian PCM, mono, finite", 4,
                          (MIN_RATE, MAX_RATE), None, _RESAMPLE_NOTE),
    "mulaw": FormatInfo("mulaw", "ITU-T G.711 mu-law, one byte a sample, mono (8 kHz telephony; any rate "
                        "accepted)", 1, (MIN_RATE, MAX_RATE), 8000, _RESAMPLE_NOTE),
    "alaw": FormatInfo("alaw", "ITU-T G.711 A-law, one byte a sample, mono (8 kHz telephony; any rate "
                       "accepted)", 1, (MIN_RATE, MAX_RATE), 8000, _RESAMPLE_NOTE),
    "opus": FormatInfo("opus", "Opus in Ogg pages (RFC 7845), one packet of frame_ms (20) a page; mono out, "
                       "mono or stereo in (averaged); bitrate 6-510 kbps (default 24)", None,
                       (OPUS_RATE, OPUS_RATE), OPUS_RATE,
                       "out: one frame (20 ms) of buffering + the encoder's look-ahead (6.5 ms; 2.5 ms with "
                       "application='lowdelay'), plus resampling unless the model's rate is an Opus rate "
                       "(8/12/16/24/48 kHz); in: 48 kHz -> model rate resampling, and the sender's page size"),
    "webm": FormatInfo("webm", "Opus in WebM (as browsers' MediaRecorder writes it and Media Source Extensions "
                       "play it): live segment and clusters, one block per packet; mono out, mono or stereo in; "
                       "bitrate as opus", None, (OPUS_RATE, OPUS_RATE), OPUS_RATE,
                       "as opus (no page buffering: each packet is sent as it is coded)"),
}


# ---- validation --------------------------------------------------------------------------------------------
def _check_rate(name: str, rate: Any) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
        raise ValueError(f"{name} must be an int in {MIN_RATE}..{MAX_RATE} Hz, got {rate!r}")
    if not MIN_RATE <= int(rate) <= MAX_RATE:
        raise ValueError(f"{name} {int(rate)} Hz is out of range: {MIN_RATE}..{MAX_RATE} Hz")
    return int(rate)


def check_format(fmt: str, sample_rate: Optional[int] = None, *, model_rate: Optional[int] = None) -> Tuple[str, int]:
    """Validate a client's ``(format, sample_rate)``; return them with the default rate filled in.

    ``sample_rate=None`` means the format's default: 8000 for G.711, 48000 for Opus, else ``model_rate``.
    Raises ``ValueError`` naming the problem (unknown format, rate out of 8000..48000, Opus not at 48 kHz).
    """
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ValueError(f"unknown audio format {fmt!r}; choose one of {', '.join(FORMATS)}")
    info = FORMATS[fmt]
    if sample_rate is None:
        sample_rate = info.default_rate if info.default_rate is not None else model_rate
        if sample_rate is None:
            raise ValueError(f"{fmt} needs a sample_rate (or the model's rate as model_rate)")
    rate = _check_rate("sample_rate", sample_rate)
    if fmt in _OPUS_FORMATS and rate != OPUS_RATE:
        raise ValueError(f"Opus streams are 48000 Hz by definition (RFC 7845, WebM's A_OPUS), got sample_rate "
                         f"{rate}; omit sample_rate or pass 48000")
    return fmt, rate


def available_formats() -> List[str]:
    """The names of :data:`FORMATS` this process can code now: Opus (``opus``, ``webm``) only with PyAV."""
    try:
        _import_av()
    except ImportError:
        return [name for name in FORMATS if name not in _OPUS_FORMATS]
    return list(FORMATS)


def _check_quality(quality: str) -> str:
    if quality not in RESAMPLE_QUALITIES:
        raise ValueError(f"unknown resample quality {quality!r}; choose one of {', '.join(RESAMPLE_QUALITIES)}")
    return quality


# ---- G.711 -----------------------------------------------------------------------------------------------
# The tables follow ITU-T G.711 as implemented by the reference code (Sun Microsystems' g711.c, also in ITU-T
# G.191's software tools): mu-law codes 14-bit magnitudes with bias 33, A-law 13-bit ones; code bytes are
# stored inverted (mu-law) or with even bits toggled (A-law, XOR 0x55), as on the wire.
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def _ulaw_tables() -> Tuple[np.ndarray, np.ndarray]:
    pcm = np.arange(-32768, 32768, dtype=np.int32)
    v = pcm >> 2
    mask = np.where(v < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(v), 8159) + 0x21
    seg = np.searchsorted(_ULAW_SEG_END, mag)
    code = ((np.minimum(seg, 7) << 4) | ((mag >> (np.minimum(seg, 7) + 1)) & 0xF)) ^ mask
    code = np.where(seg >= 8, 0x7F ^ mask, code)
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    linear = np.where(u & 0x80, 0x84 - t, t - 0x84)
    return code.astype(np.uint8), linear.astype(np.int16)


def _alaw_tables() -> Tuple[np.ndarray, np.ndarray]:
    pcm = np.arange(-32768, 32768, dtype=np.int32)
    v = pcm >> 3
    neg = v < 0
    mask = np.where(neg, 0x55, 0xD5)
    mag = np.where(neg, -v - 1, v)
    seg = np.searchsorted(_ALAW_SEG_END, mag)
    s = np.minimum(seg, 7)
    quant = np.where(s < 2, (mag >> 1) & 0xF, (mag >> s) & 0xF)
    code = np.where(seg >= 8, 0x7F ^ mask, ((s << 4) | quant) ^ mask)
    a = np.arange(256, dtype=np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    aseg = (a & 0x70) >> 4
    t = np.where(aseg == 0, t + 8, np.where(aseg == 1, t + 0x108, (t + 0x108) << np.maximum(aseg - 1, 0)))
    linear = np.where(a & 0x80, t, -t)
    return code.astype(np.uint8), linear.astype(np.int16)


_ULAW_ENCODE, _ULAW_DECODE = _ulaw_tables()
_ALAW_ENCODE, _ALAW_DECODE = _alaw_tables()


def _int16(pcm: Any) -> np.ndarray:
    arr = np.asarray(pcm)
    if arr.dtype != np.int16:
        raise TypeError(f"expected int16 samples, got {arr.dtype}")
    return arr


def mulaw_encode(pcm: np.ndarray) -> np.ndarray:
    """int16 linear samples -> G.711 mu-law code bytes (uint8)."""
    return _ULAW_ENCODE[_int16(pcm).astype(np.int32) + 32768]


def mulaw_decode(codes: Union[BytesLike, np.ndarray]) -> np.ndarray:
    """G.711 mu-law code bytes -> int16 linear samples (|x| <= 32124)."""
    return _ULAW_DECODE[np.frombuffer(codes, np.uint8) if not isinstance(codes, np.ndarray) else codes]


def alaw_encode(pcm: np.ndarray) -> np.ndarray:
    """int16 linear samples -> G.711 A-law code bytes (uint8)."""
    return _ALAW_ENCODE[_int16(pcm).astype(np.int32) + 32768]


def alaw_decode(codes: Union[BytesLike, np.ndarray]) -> np.ndarray:
    """G.711 A-law code bytes -> int16 linear samples (|x| <= 32256)."""
    return _ALAW_DECODE[np.frombuffer(codes, np.uint8) if not isinstance(codes, np.ndarray) else codes]


def _float_to_int16(samples: np.ndarray) -> np.ndarray:
    return np.frombuffer(float_to_pcm16(samples), dtype="<i2")


# ---- sample codecs (fixed bytes per sample) ------------------------------------------------------------------
def _bytes_to_float(fmt: str, raw: bytes) -> np.ndarray:
    if fmt == "pcm16":
        return np.frombuffer(raw, "<i2").astype(np.float32) / np.float32(32768.0)
    if fmt == "float32":
        x = np.frombuffer(raw, "<f4").astype(np.float32)
        if not np.isfinite(x).all():
            raise ValueError("float32 audio holds NaN or infinite samples")
        return x
    table = _ULAW_DECODE if fmt == "mulaw" else _ALAW_DECODE
    return table[np.frombuffer(raw, np.uint8)].astype(np.float32) / np.float32(32768.0)


def _float_to_bytes(fmt: str, x: np.ndarray) -> bytes:
    if fmt == "float32":
        return np.asarray(x, dtype="<f4").tobytes()
    if fmt == "pcm16":
        return float_to_pcm16(x)
    pcm = _float_to_int16(x).astype(np.int32) + 32768
    return (_ULAW_ENCODE if fmt == "mulaw" else _ALAW_ENCODE)[pcm].tobytes()


# ---- resampling ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def resampler_latency(in_rate: int, out_rate: int, quality: str = "HQ") -> int:
    """Worst-case output samples that soxr's streaming resampler holds back, measured once per setting.

    soxr releases output in blocks, so the delay between a sample going in and its resampled counterpart
    coming out varies between the filter's look-ahead and that plus one block; this is the maximum, measured by
    pushing one second in 0.5 ms chunks (plus one chunk of margin). 0 when the rates are equal. HQ: 1765
    (8 -> 24 kHz, 74 ms), 589 (24 -> 8 kHz, 74 ms), 889 (16 -> 24 kHz, 37 ms), 938 (48 -> 24 kHz, 39 ms).
    """
    if in_rate == out_rate:
        return 0
    _check_quality(quality)
    stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=quality)
    step = max(1, in_rate // 2000)
    chunk = np.zeros(step, np.float32)
    pushed = produced = 0
    worst = 0.0
    while pushed < in_rate:  # one second: the start-up and several blocks
        produced += stream.resample_chunk(chunk).shape[0]
        pushed += step
        worst = max(worst, pushed * out_rate / in_rate - produced)
    worst += (step - 1) * out_rate / in_rate  # a release may come up to one step later with 1-sample pushes
    return int(math.ceil(worst))


class _Resampler:
    """soxr's streaming resampler, or the identity when the rates are equal."""

    def __init__(self, in_rate: int, out_rate: int, quality: str) -> None:
        self.in_rate, self.out_rate = in_rate, out_rate
        self.stream = None
        if in_rate != out_rate:
            self.stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=quality)
        #: worst-case delay in output samples
        self.latency: int = resampler_latency(in_rate, out_rate, quality)

    def push(self, x: np.ndarray) -> np.ndarray:
        if self.stream is None or x.shape[0] == 0:
            return x
        return self.stream.resample_chunk(np.ascontiguousarray(x, np.float32), last=False)

    def flush(self) -> np.ndarray:
        if self.stream is None:
            return np.zeros(0, np.float32)
        return self.stream.resample_chunk(np.zeros(0, np.float32), last=True)


# ---- Ogg framing (RFC 3533) ---------------------------------------------------------------------------------
def _crc_table() -> List[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_OGG_CRC = _crc_table()


def _ogg_crc(data: bytes) -> int:
    crc = 0
    table = _OGG_CRC
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ byte]
    return crc


_OGG_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, flags, granule, serial, sequence, crc, segments
_CONTINUED, _BOS, _EOS = 0x01, 0x02, 0x04


def _ogg_page(packets: List[bytes], granule: int, serial: int, sequence: int, flags: int) -> bytes:
    lacing = bytearray()
    for packet in packets:
        lacing += b"\xff" * (len(packet) // 255) + bytes([len(packet) % 255])
    if len(lacing) > 255:
        raise ValueError("packets too large for one Ogg page")
    header = _OGG_HEADER.pack(b"OggS", 0, flags, granule, serial, sequence, 0, len(lacing))
    page = bytearray(header + bytes(lacing) + b"".join(packets))
    struct.pack_into("<I", page, 22, _ogg_crc(bytes(page)))
    return bytes(page)


class _OggReader:
    """Ogg bytes in any chunks -> (packet, granule of its page if it ends the page, page flags) one logical stream."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.partial = bytearray()  # a packet continued on the next page
        self.serial: Optional[int] = None
        self.pages = 0
        self.eos = False

    def push(self, data: bytes) -> List[Tuple[bytes, int, bool]]:
        """Return (packet, page granule, last packet of an EOS page) for each packet completed."""
        self.buffer += data
        out: List[Tuple[bytes, int, bool]] = []
        while len(self.buffer) >= 27:
            if self.buffer[:4] != b"OggS":
                raise ValueError(f"not an Ogg stream: page {self.pages} does not start with 'OggS' "
                                 f"(got {bytes(self.buffer[:4])!r})")
            capture, version, flags, granule, serial, _seq, crc, segments = _OGG_HEADER.unpack_from(self.buffer)
            if version != 0:
                raise ValueError(f"Ogg page {self.pages} has version {version}, expected 0")
            if len(self.buffer) < 27 + segments:
                break
            lacing = self.buffer[27:27 + segments]
            size = 27 + segments + sum(lacing)
            if len(self.buffer) < size:
                break
            page = bytes(self.buffer[:size])
            del self.buffer[:size]
            check = bytearray(page)
            check[22:26] = b"\0\0\0\0"
            if _ogg_crc(bytes(check)) != crc:
                raise ValueError(f"Ogg page {self.pages} fails its CRC check (corrupt or truncated data)")
            if self.eos:
                raise ValueError("data after the end-of-stream Ogg page (chained streams are not supported)")
            if self.serial is None:
                self.serial = serial
            elif serial != self.serial:
                raise ValueError("the Ogg stream multiplexes several logical streams; only one is supported")
            if not flags & _CONTINUED:
                self.partial.clear()  # a packet left unfinished by a lost page is dropped
            self.pages += 1
            body = memoryview(page)[27 + segments:]
            pos = 0
            ends = [i for i, lace in enumerate(lacing) if lace < 255]
            start = 0
            for i in ends:
                n = sum(lacing[start:i + 1])
                self.partial += body[pos:pos + n]
                pos += n
                start = i + 1
                out.append((bytes(self.partial), granule, False))
                self.partial.clear()
            if start < segments:  # the last packet continues on the next page
                self.partial += body[pos:]
            if flags & _EOS:
                self.eos = True
                if out:
                    out[-1] = (out[-1][0], out[-1][1], True)
        return out


# ---- Opus ----------------------------------------------------------------------------------------------------
def _import_av() -> Any:
    try:
        import av
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the opus and webm formats need PyAV: pip install 'snac-stream[opus]' (or pip install av)"
                          ) from exc
    return av


class _OpusEncoder:
    """float32 at ``api_rate`` -> Opus packets in a container; subclasses write the container.

    Frames of ``frame_ms`` are coded as they fill; :meth:`flush` pads the last one with zeros and drains the
    encoder. ``end48`` is where the audio ends, in 48 kHz samples from the start of the decoded stream
    (pre-skip included): what the container's end trimming must cut the decoded stream to.
    """

    def __init__(self, api_rate: int, bitrate: int, frame_ms: int, application: str) -> None:
        av = _import_av()
        self.av = av
        cc = av.CodecContext.create("libopus", "w")
        cc.sample_rate = api_rate
        cc.layout = "mono"
        cc.format = "flt"
        cc.bit_rate = bitrate
        cc.time_base = Fraction(1, api_rate)
        cc.options = {"frame_duration": str(frame_ms), "application": application}
        cc.open()
        self.cc = cc
        self.api_rate = api_rate
        self.frame_ms = frame_ms
        self.frame = api_rate * frame_ms // 1000
        self.frame48 = OPUS_RATE * frame_ms // 1000
        head = bytes(cc.extradata)
        if len(head) < 19 or head[:8] != b"OpusHead":
            raise RuntimeError("libopus did not produce an OpusHead header")
        self.head = head
        self.pre_skip = struct.unpack_from("<H", head, 10)[0]  # 48 kHz samples
        self.lookahead = self.pre_skip * api_rate // OPUS_RATE  # encoder look-ahead at api_rate
        self.pending = np.zeros(0, np.float32)
        self.samples_in = 0
        self.packets: List[bytes] = []  # coded, not yet written
        self.frames_in = 0  # frames given to the encoder
        self.written = 0  # packets written into the container
        self.header_sent = False

    @property
    def end48(self) -> int:
        return self.pre_skip + self.samples_in * (OPUS_RATE // self.api_rate)

    def _encode(self, frame: Optional[np.ndarray]) -> None:
        if frame is None:
            packets = self.cc.encode(None)
        else:
            af = self.av.AudioFrame.from_ndarray(frame[None, :], format="flt", layout="mono")
            af.sample_rate = self.api_rate
            af.time_base = Fraction(1, self.api_rate)
            af.pts = self.frames_in * self.frame
            packets = self.cc.encode(af)
            self.frames_in += 1
        self.packets.extend(bytes(p) for p in packets)

    def push(self, x: np.ndarray) -> bytes:
        head = b"" if self.header_sent else self._headers()
        self.header_sent = True
        self.samples_in += x.shape[0]
        buf = np.concatenate([self.pending, x]) if self.pending.shape[0] else x
        whole = buf.shape[0] - buf.shape[0] % self.frame
        for k in range(0, whole, self.frame):
            self._encode(np.ascontiguousarray(buf[k:k + self.frame], np.float32))
        self.pending = np.array(buf[whole:], np.float32)
        return head + self._write(final=False)

    def flush(self) -> bytes:
        head = b"" if self.header_sent else self._headers()
        self.header_sent = True
        if self.pending.shape[0]:
            frame = np.zeros(self.frame, np.float32)
            frame[:self.pending.shape[0]] = self.pending
            self._encode(frame)
            self.pending = self.pending[:0]
        self._encode(None)
        # FFmpeg counts the zero padding above as audio and may add a packet wholly past the end; keep the
        # packets that hold the end, so that the end trimming stays within the last packet (RFC 7845).
        del self.packets[max(0, -(-self.end48 // self.frame48) - self.written):]
        return head + self._write(final=True)

    def _headers(self) -> bytes:
        raise NotImplementedError

    def _write(self, final: bool) -> bytes:
        raise NotImplementedError


class _OggOpusEncoder(_OpusEncoder):
    """Ogg Opus (RFC 7845): one page per ``frames_per_page`` packets; the last page trims the end."""

    def __init__(self, api_rate: int, bitrate: int, frame_ms: int, application: str, serial: Optional[int],
                 frames_per_page: int) -> None:
        super().__init__(api_rate, bitrate, frame_ms, application)
        self.serial = secrets.randbits(32) if serial is None else int(serial) & 0xFFFFFFFF
        self.frames_per_page = frames_per_page
        self.sequence = 0

    def _page(self, packets: List[bytes], granule: int, flags: int) -> bytes:
        page = _ogg_page(packets, granule, self.serial, self.sequence, flags)
        self.sequence += 1
        return page

    def _headers(self) -> bytes:
        vendor = b"snac-stream"
        tags = b"OpusTags" + struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", 0)
        return self._page([self.head], 0, _BOS) + self._page([tags], 0, 0)

    def _write(self, final: bool) -> bytes:
        out = bytearray()
        if final and not self.packets and self.written == 0:
            return self._page([], self.pre_skip, _EOS)  # no audio at all: an empty stream still ends
        while len(self.packets) >= self.frames_per_page or (final and self.packets):
            group = self.packets[:self.frames_per_page]
            del self.packets[:len(group)]
            self.written += len(group)
            last = final and not self.packets
            # Granule: 48 kHz samples up to the end of the page's last packet; on the last page the true end.
            granule = self.end48 if last else self.written * self.frame48
            out += self._page(group, granule, _EOS if last else 0)
        return bytes(out)


# ---- WebM (a Matroska subset) --------------------------------------------------------------------------------
_EBML, _SEGMENT, _CLUSTER, _TRACKS = 0x1A45DFA3, 0x18538067, 0x1F43B675, 0x1654AE6B
_TIMECODE, _SIMPLE_BLOCK, _BLOCK_GROUP, _BLOCK, _DISCARD_PADDING = 0xE7, 0xA3, 0xA0, 0xA1, 0x75A2
_TRACK_ENTRY, _TRACK_NUMBER, _CODEC_ID, _CODEC_PRIVATE, _AUDIO, _CHANNELS = 0xAE, 0xD7, 0x86, 0x63A2, 0xE1, 0x9F
_UNKNOWN_SIZE = b"\x01\xff\xff\xff\xff\xff\xff\xff"


def _ebml_id(element: int) -> bytes:
    return element.to_bytes((element.bit_length() + 7) // 8, "big")


def _ebml_size(n: int) -> bytes:
    for length in range(1, 9):
        if n < (1 << (7 * length)) - 1:
            return (n | (1 << (7 * length))).to_bytes(length, "big")
    raise ValueError("EBML element too large")


def _ebml(element: int, payload: bytes) -> bytes:
    return _ebml_id(element) + _ebml_size(len(payload)) + payload


def _ebml_uint(element: int, value: int) -> bytes:
    return _ebml(element, value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def _ebml_sint(element: int, value: int) -> bytes:
    return _ebml(element, value.to_bytes(8, "big", signed=True))


class _WebMOpusEncoder(_OpusEncoder):
    """Opus in WebM for live streaming (as MediaRecorder writes it): segment and clusters of unknown size, one
    SimpleBlock per packet, the last packet in a BlockGroup whose DiscardPadding trims the end."""

    CLUSTER_MS = 5000

    def __init__(self, api_rate: int, bitrate: int, frame_ms: int, application: str) -> None:
        super().__init__(api_rate, bitrate, frame_ms, application)
        self.cluster_start: Optional[int] = None

    def _headers(self) -> bytes:
        header = _ebml(_EBML, _ebml_uint(0x4286, 1) + _ebml_uint(0x42F7, 1) + _ebml_uint(0x42F2, 4)
                       + _ebml_uint(0x42F3, 8) + _ebml(0x4282, b"webm") + _ebml_uint(0x4287, 4)
                       + _ebml_uint(0x4285, 2))
        info = _ebml(0x1549A966, _ebml_uint(0x2AD7B1, 1000000) + _ebml(0x4D80, b"snac-stream")
                     + _ebml(0x5741, b"snac-stream"))
        audio = _ebml(_AUDIO, _ebml(0xB5, struct.pack(">d", float(OPUS_RATE))) + _ebml_uint(_CHANNELS, 1))
        track = _ebml(_TRACK_ENTRY, _ebml_uint(_TRACK_NUMBER, 1) + _ebml_uint(0x73C5, 1) + _ebml_uint(0x83, 2)
                      + _ebml(_CODEC_ID, b"A_OPUS") + _ebml(_CODEC_PRIVATE, self.head)
                      + _ebml_uint(0x56AA, self.pre_skip * 1000000000 // OPUS_RATE)  # CodecDelay, ns
                      + _ebml_uint(0x56BB, 80000000) + audio)  # SeekPreRoll 80 ms
        return header + _ebml_id(_SEGMENT) + _UNKNOWN_SIZE + info + _ebml(_TRACKS, track)

    def _write(self, final: bool) -> bytes:
        out = bytearray()
        while self.packets:
            packet = self.packets.pop(0)
            ms = self.written * self.frame_ms
            if self.cluster_start is None or ms - self.cluster_start >= self.CLUSTER_MS:
                self.cluster_start = ms
                out += _ebml_id(_CLUSTER) + _UNKNOWN_SIZE + _ebml_uint(_TIMECODE, ms)
            self.written += 1
            block = b"\x81" + struct.pack(">h", ms - self.cluster_start)
            padding = self.written * self.frame48 - self.end48
            if final and not self.packets and padding > 0:
                discard = padding * 1000000000 // OPUS_RATE  # ns
                out += _ebml(_BLOCK_GROUP, _ebml(_BLOCK, block + b"\x00" + packet)
                             + _ebml_sint(_DISCARD_PADDING, discard))
            else:
                out += _ebml(_SIMPLE_BLOCK, block + b"\x80" + packet)  # flags: keyframe
        return bytes(out)


def _vint(buf: Union[bytes, bytearray], pos: int, keep_marker: bool) -> Optional[Tuple[int, int]]:
    """(value, length) of the EBML variable-size integer at ``pos``; None if the buffer ends inside it."""
    if pos >= len(buf):
        return None
    first = buf[pos]
    if first == 0:
        raise ValueError("not a WebM stream: invalid EBML variable-size integer")
    length = 9 - first.bit_length()
    if pos + length > len(buf):
        return None
    value = int.from_bytes(buf[pos:pos + length], "big")
    if not keep_marker:
        value &= (1 << (7 * length)) - 1
    return value, length


class _WebMReader:
    """WebM bytes in any chunks -> Opus packets (with their DiscardPadding in 48 kHz samples) of its first Opus
    track. Segment and clusters may have unknown sizes (live streams); other elements are skipped."""

    _ENTER = (_SEGMENT, _CLUSTER)

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.skip = 0  # bytes of a skipped element still to come
        self.head: Optional[bytes] = None
        self.track: Optional[int] = None
        self.seen_header = False

    def push(self, data: bytes) -> List[Tuple[bytes, int]]:
        out: List[Tuple[bytes, int]] = []
        self.buffer += data
        while True:
            if self.skip:
                n = min(self.skip, len(self.buffer))
                del self.buffer[:n]
                self.skip -= n
                if self.skip:
                    return out
            got_id = _vint(self.buffer, 0, keep_marker=True)
            if got_id is None:
                return out
            element, id_len = got_id
            if not self.seen_header:
                if element != _EBML:
                    raise ValueError(f"not a WebM stream: it starts with {bytes(self.buffer[:4])!r}, not an EBML "
                                     "header")
                self.seen_header = True
            got_size = _vint(self.buffer, id_len, keep_marker=False)
            if got_size is None:
                return out
            size, size_len = got_size
            unknown = size == (1 << (7 * size_len)) - 1
            start = id_len + size_len
            if element in self._ENTER:
                del self.buffer[:start]  # descend: its children follow
                continue
            if unknown:
                raise ValueError(f"WebM element 0x{element:X} has an unknown size (only segments and clusters may)")
            if element in (_TRACKS, _SIMPLE_BLOCK, _BLOCK_GROUP):
                if len(self.buffer) < start + size:
                    return out
                body = bytes(self.buffer[start:start + size])
                del self.buffer[:start + size]
                if element == _TRACKS:
                    self._tracks(body)
                else:
                    packet = self._block(body, element == _SIMPLE_BLOCK)
                    if packet is not None:
                        out.append(packet)
                continue
            del self.buffer[:start]  # anything else: skipped, without buffering it
            self.skip = size

    @staticmethod
    def _children(body: bytes) -> List[Tuple[int, bytes]]:
        children, pos = [], 0
        while pos < len(body):
            got_id = _vint(body, pos, keep_marker=True)
            got_size = _vint(body, pos + got_id[1], keep_marker=False) if got_id else None
            if got_id is None or got_size is None or pos + got_id[1] + got_size[1] + got_size[0] > len(body):
                raise ValueError("malformed WebM: a child element overruns its parent")
            start = pos + got_id[1] + got_size[1]
            children.append((got_id[0], body[start:start + got_size[0]]))
            pos = start + got_size[0]
        return children

    def _tracks(self, body: bytes) -> None:
        for element, entry in self._children(body):
            if element != _TRACK_ENTRY or self.track is not None:
                continue
            fields = dict(self._children(entry))
            if fields.get(_CODEC_ID) == b"A_OPUS":
                self.track = int.from_bytes(fields.get(_TRACK_NUMBER, b"\x01"), "big")
                self.head = fields.get(_CODEC_PRIVATE)
                if self.head is None:
                    raise ValueError("the WebM Opus track has no OpusHead (CodecPrivate)")
        if self.track is None:
            raise ValueError("the WebM stream has no Opus audio track")

    def _block(self, body: bytes, simple: bool) -> Optional[Tuple[bytes, int]]:
        discard = 0
        if not simple:
            fields = dict(self._children(body))
            if _BLOCK not in fields:
                return None
            if _DISCARD_PADDING in fields:
                ns = int.from_bytes(fields[_DISCARD_PADDING], "big", signed=True)
                discard = max(0, round(ns * OPUS_RATE / 1e9))
            body = fields[_BLOCK]
        got = _vint(body, 0, keep_marker=False)
        if got is None or self.track is None:
            raise ValueError("malformed WebM: a block before the track list, or a truncated block")
        track, length = got
        if track != self.track:
            return None  # another track (e.g. video)
        flags = body[length + 2]
        if flags & 0x06:
            raise ValueError("laced WebM blocks are not supported")
        return body[length + 3:], discard


class _OpusDecoder:
    """Opus packets -> mono float32 at 48 kHz (stereo averaged), pre-skip and end trimming applied."""

    def __init__(self, head: bytes, what: str) -> None:
        self.av = _import_av()
        if len(head) < 19 or head[:8] != b"OpusHead":
            raise ValueError(f"not an {what} stream: no OpusHead header")
        version, channels, pre_skip, _rate, _gain, family = struct.unpack_from("<BBHIhB", head, 8)
        if version >> 4:
            raise ValueError(f"unsupported Opus header version {version}")
        if channels not in (1, 2) or family != 0:
            raise ValueError(f"only mono or stereo Opus (mapping family 0) is supported, got {channels} channels "
                             f"with mapping family {family}")
        self.pre_skip = pre_skip
        name = "opus" if "opus" in self.av.codecs_available else "libopus"
        cc = self.av.CodecContext.create(name, "r")
        # FFmpeg's decoders drop the pre-skip themselves when the header announces it; it is trimmed here
        # instead (with the end trimming), so the decoder gets a header with pre-skip 0.
        cc.extradata = head[:10] + b"\0\0" + head[12:]
        cc.open()
        self.cc = cc
        self.decoded = 0  # samples (48 kHz) decoded, pre-skip included
        self.emitted = 0  # samples emitted

    def decode(self, packet: bytes, end: Optional[int] = None, discard: int = 0) -> np.ndarray:
        """The packet's new samples; ``end`` (absolute) or ``discard`` (from its end) trim the stream's end."""
        chunks = []
        for frame in self.cc.decode(self.av.Packet(packet)):
            a = frame.to_ndarray()
            if not frame.format.is_planar:
                a = a.reshape(-1, frame.layout.nb_channels).T
            a = a.astype(np.float32) / np.float32(32768.0) if a.dtype.kind == "i" else a.astype(np.float32)
            chunks.append(a.mean(axis=0, dtype=np.float32) if a.shape[0] > 1 else a[0])
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        start = self.decoded
        self.decoded += pcm.shape[0]
        stop = self.decoded - discard
        if end is not None:
            stop = min(stop, max(end, self.pre_skip))
        lo = max(self.pre_skip, self.emitted, start)
        if stop <= lo:
            return np.zeros(0, np.float32)
        self.emitted = stop
        return pcm[lo - start:stop - start]


class _OggOpusDecoder:
    """Ogg Opus bytes -> mono float32 at 48 kHz (RFC 7845: the end trimmed by the last page's granule)."""

    def __init__(self) -> None:
        _import_av()
        self.reader = _OggReader()
        self.packets = 0  # packets read, headers included
        self.opus: Optional[_OpusDecoder] = None

    def push(self, data: bytes) -> np.ndarray:
        out = []
        for packet, granule, eos_end in self.reader.push(data):
            self.packets += 1
            if self.packets == 1:
                self.opus = _OpusDecoder(packet, "Ogg Opus")
            elif self.packets == 2:
                if packet[:8] != b"OpusTags":
                    raise ValueError("not an Ogg Opus stream: the second packet is not an OpusTags header")
            else:
                assert self.opus is not None
                out.append(self.opus.decode(packet, end=granule if eos_end else None))
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def flush(self) -> None:
        if self.reader.buffer:
            raise ValueError(f"the Ogg stream ends inside a page: {len(self.reader.buffer)} bytes left over")
        if self.reader.partial:
            raise ValueError("the Ogg stream ends inside a packet that continues on a missing page")
        if 0 < self.packets < 2:
            raise ValueError("the Ogg Opus stream ends inside its headers")


class _WebMOpusDecoder:
    """WebM Opus bytes -> mono float32 at 48 kHz (the end trimmed by the last block's DiscardPadding)."""

    def __init__(self) -> None:
        _import_av()
        self.reader = _WebMReader()
        self.opus: Optional[_OpusDecoder] = None

    def push(self, data: bytes) -> np.ndarray:
        out = []
        for packet, discard in self.reader.push(data):
            if self.opus is None:
                assert self.reader.head is not None
                self.opus = _OpusDecoder(self.reader.head, "WebM Opus")
            out.append(self.opus.decode(packet, discard=discard))
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def flush(self) -> None:
        if self.reader.skip or self.reader.buffer:
            raise ValueError(f"the WebM stream ends inside an element "
                             f"({self.reader.skip or len(self.reader.buffer)} bytes missing or left over)")


# ---- public stream objects -----------------------------------------------------------------------------------
class _Base:
    def __init__(self, fmt: str, sample_rate: Optional[int], model_rate: int, quality: str) -> None:
        self.model_rate: int = _check_rate("model_rate", model_rate)
        self.format, self.sample_rate = check_format(fmt, sample_rate, model_rate=self.model_rate)
        self.quality = _check_quality(quality)
        self.info: FormatInfo = FORMATS[self.format]
        self.latency_samples: int = 0
        self.closed = False

    @property
    def latency_s(self) -> float:
        """:attr:`latency_samples` in seconds."""
        return self.latency_samples / self.model_rate

    @property
    def identity(self) -> bool:
        """True when samples pass through unchanged in time (no resampler, no frame buffering)."""
        return self.latency_samples == 0 and self.format not in _OPUS_FORMATS

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"this {type(self).__name__} was flushed; make a new one for a new stream")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(format={self.format!r}, sample_rate={self.sample_rate}, "
                f"model_rate={self.model_rate}, latency_samples={self.latency_samples})")


class InputDecoder(_Base):
    """Client audio bytes -> mono float32 samples at ``model_rate``, chunk by chunk.

    Args:
        fmt: one of :data:`FORMATS`.
        sample_rate: the client's rate (None: the format's default, see :func:`check_format`).
        model_rate: the model's rate, e.g. ``model.sampling_rate``.
        quality: soxr quality when resampling (:data:`RESAMPLE_QUALITIES`).

    ``push(data)`` takes bytes of any length: a sample split between two chunks is kept until its last byte
    arrives. ``flush()`` ends the stream and returns the resampler's tail; a partial sample (or Ogg page)
    left over is a ``ValueError``. The samples of all calls concatenated equal converting the whole input at
    once (for resampled rates: soxr's one-shot ``soxr.resample`` of it), whatever the chunking.

    ``latency_samples``: worst-case samples (at the model's rate) between a sample's bytes arriving and the
    sample being returned, from the resampler. Ogg Opus adds the sender's page duration on top.
    """

    def __init__(self, fmt: str, sample_rate: Optional[int] = None, *, model_rate: int,
                 quality: str = "HQ") -> None:
        super().__init__(fmt, sample_rate, model_rate, quality)
        self._opus: Any = {"opus": _OggOpusDecoder, "webm": _WebMOpusDecoder}.get(self.format, lambda: None)()
        self._width = self.info.bytes_per_sample or 0
        self._partial = b""
        self._resampler = _Resampler(self.sample_rate, self.model_rate, quality)
        self.latency_samples = self._resampler.latency
        self.bytes_in = 0
        self.samples_out = 0

    def push(self, data: BytesLike) -> np.ndarray:
        """Bytes (any number) -> float32 samples (n,) at the model's rate now available (n may be 0)."""
        self._check_open()
        if isinstance(data, np.ndarray):
            raise TypeError("InputDecoder.push takes bytes (the client's encoded audio), not an array")
        raw = bytes(memoryview(data).cast("B"))
        if self._opus is not None:
            x = self._opus.push(raw)
        else:
            joined = self._partial + raw if self._partial else raw
            whole = len(joined) - len(joined) % self._width
            x = _bytes_to_float(self.format, joined[:whole])
            self._partial = joined[whole:]
        self.bytes_in += len(raw)
        out = self._resampler.push(x)
        self.samples_out += out.shape[0]
        return out

    def flush(self) -> np.ndarray:
        """End of stream: the remaining samples. Raises ``ValueError`` if the input ends mid-sample or mid-page."""
        self._check_open()
        if self._partial:
            raise ValueError(f"{self.format} audio ends inside a sample: {len(self._partial)} byte(s) left over "
                             f"({self._width} bytes a sample)")
        if self._opus is not None:
            self._opus.flush()
        self.closed = True
        out = self._resampler.flush()
        self.samples_out += out.shape[0]
        return out


class OutputEncoder(_Base):
    """Mono float32 samples at ``model_rate`` -> client audio bytes, chunk by chunk.

    Args:
        fmt, sample_rate, model_rate, quality: as :class:`InputDecoder`.
        bitrate: Opus bitrate in bits/s (6000..510000, default 24000: transparent enough for speech).
        frame_ms: Opus frame duration (10, 20, 40 or 60 ms; default 20).
        application: libopus mode: ``"audio"`` (default: on speech at 24 kbps its waveform is closer to the
            input than ``"voip"``'s), ``"voip"`` or ``"lowdelay"`` (CELT only, 2.5 ms look-ahead, not 6.5 ms).
        frames_per_page: Opus packets per Ogg page (default 1: every frame is sent at once; each page costs
            28 bytes of framing, 11 kbps at 20 ms frames).
        serial: the Ogg stream serial number (default random, as RFC 3533 asks).

    ``push(samples)`` returns the bytes now complete (possibly none); ``flush()`` the rest. PCM and G.711
    bytes are the same for any chunking; so are Ogg Opus bytes (libopus is deterministic and sees the same
    20 ms frames), given the same ``serial``. Samples outside [-1, 1] clip in integer formats.

    Ogg Opus: the first push returns the two header pages; the last page carries the end-of-stream flag and
    the exact length (pre-skip + samples), so RFC 7845 decoders (and :class:`InputDecoder`) return exactly the
    pushed samples, resampled to 48 kHz, aligned at sample 0. libopus codes at the model's rate directly when
    it is one of its rates (8/12/16/24/48 kHz); otherwise the audio is resampled to 48 kHz first.

    ``latency_samples``: worst-case samples (model rate) between a sample being pushed and the bytes that
    carry it being returned: resampling, plus for Opus one frame of buffering and the encoder's look-ahead.
    """

    def __init__(self, fmt: str, sample_rate: Optional[int] = None, *, model_rate: int, quality: str = "HQ",
                 bitrate: int = 24000, frame_ms: int = 20, application: str = "audio", frames_per_page: int = 1,
                 serial: Optional[int] = None) -> None:
        super().__init__(fmt, sample_rate, model_rate, quality)
        self._opus: Optional[_OpusEncoder] = None
        codec_rate = self.sample_rate
        if self.format in _OPUS_FORMATS:
            if isinstance(bitrate, bool) or not isinstance(bitrate, int) or not (
                    OPUS_BITRATES[0] <= bitrate <= OPUS_BITRATES[1]):
                raise ValueError(f"Opus bitrate must be an int in {OPUS_BITRATES[0]}..{OPUS_BITRATES[1]} bits/s, "
                                 f"got {bitrate!r}")
            if frame_ms not in _OPUS_FRAME_MS:
                raise ValueError(f"Opus frame_ms must be one of {_OPUS_FRAME_MS}, got {frame_ms!r}")
            if application not in _OPUS_APPLICATIONS:
                raise ValueError(f"Opus application must be one of {', '.join(_OPUS_APPLICATIONS)}, got "
                                 f"{application!r}")
            if isinstance(frames_per_page, bool) or not isinstance(frames_per_page, int) or not (
                    1 <= frames_per_page <= 50):
                raise ValueError(f"frames_per_page must be an int in 1..50, got {frames_per_page!r}")
            codec_rate = self.model_rate if self.model_rate in _OPUS_API_RATES else OPUS_RATE
            if self.format == "opus":
                self._opus = _OggOpusEncoder(codec_rate, bitrate, frame_ms, application, serial, frames_per_page)
            else:
                frames_per_page = 1  # WebM: one block per packet
                self._opus = _WebMOpusEncoder(codec_rate, bitrate, frame_ms, application)
        self.codec_rate: int = codec_rate  # the rate the bytes are coded at (libopus' API rate for Opus)
        self.bitrate = bitrate if self._opus is not None else None
        self._resampler = _Resampler(self.model_rate, codec_rate, quality)
        held = self._resampler.latency  # in codec_rate samples
        if self._opus is not None:
            # A sample waits for its frame to fill (up to frame - 1 samples) and for the encoder's look-ahead.
            held += self._opus.frame * frames_per_page + self._opus.lookahead
        self.latency_samples = int(math.ceil(held * self.model_rate / codec_rate))
        self.samples_in = 0
        self.bytes_out = 0

    def push(self, samples: Any) -> bytes:
        """float samples (n,) at the model's rate -> bytes now complete."""
        self._check_open()
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if not np.isfinite(x).all():
            raise ValueError("audio holds NaN or infinite samples")
        self.samples_in += x.shape[0]
        y = self._resampler.push(x)
        out = self._opus.push(y) if self._opus is not None else _float_to_bytes(self.format, y)
        self.bytes_out += len(out)
        return out

    def flush(self) -> bytes:
        """End of stream: the remaining bytes (Opus: the last packets and the end-of-stream page)."""
        self._check_open()
        self.closed = True
        y = self._resampler.flush()
        if self._opus is not None:
            out = self._opus.push(y) + self._opus.flush()
        else:
            out = _float_to_bytes(self.format, y)
        self.bytes_out += len(out)
        return out
