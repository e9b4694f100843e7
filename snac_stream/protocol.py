"""The snac-stream websocket protocol, version 1: message types, binary frame layouts, error codes.

Shared by the server (:mod:`snac_stream.server`) and the client (:mod:`snac_stream.client`), so the encoding
of every message lives here once; it imports neither side (nor torch). The normative description is
``docs/protocol.md``.

Summary:

* The client opens with a JSON text ``hello`` (session kind, audio formats and rates, token layout, auth);
  the server answers ``ready`` (model, rates, step size, token layout, algorithmic latency, limits).
* Client -> server binary frames carry raw payload only: audio (PCM16 LE or float32 LE mono samples at the
  model's rate, or any of :data:`AUDIO_FORMATS` at 8-48 kHz, which the server converts) for ``encode`` /
  ``roundtrip``, int32 LE token ids for ``decode``. Their order gives their stream positions.
* Server -> client binary frames start with a 32-byte header (:data:`HEADER`): payload kind, the stream
  position of the first item, the input count that completed the step which produced it, and server-side
  timings; the payload is audio (in the session's output format) or int32 LE tokens.
* JSON text for control (``flush``, ``close``), ``done`` and ``error`` (then the server closes the socket
  with the close code of :data:`ERRORS`).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

PROTOCOL_VERSION = 1
KINDS: Tuple[str, ...] = ("encode", "decode", "roundtrip")
SAMPLE_FORMATS: Dict[str, np.dtype] = {"pcm16": np.dtype("<i2"), "float32": np.dtype("<f4")}
# Every client audio format a hello may name (snac_stream.formats converts them; this module only needs their
# wire view and must not import it, which brings torch): bytes per wire item. An item is a sample, except in the
# Opus containers, whose payloads, positions and counts are in bytes.
AUDIO_FORMATS: Dict[str, int] = {"pcm16": 2, "float32": 4, "mulaw": 1, "alaw": 1, "opus": 1, "webm": 1}
CONTAINER_FORMATS: Tuple[str, ...] = ("opus", "webm")
TOKEN_DTYPE = np.dtype("<i4")
DEFAULT_LAYOUT = "interleaved"
# The environment variable holding the shared auth token (``hello.auth``), read by the server and the clients.
TOKEN_ENV = "SNAC_STREAM_TOKEN"

# Server -> client binary frame header, little-endian:
#   u8  payload kind (PAYLOAD_AUDIO or PAYLOAD_TOKENS)
#   u8  flags: bit 0 (FLAG_FINAL) set on frames produced by the end-of-stream flush
#   2x  reserved (zero)
#   u64 start      stream position of the first item (output sample index, or output token index)
#   u64 input_end  input items (samples, or tokens for decode) received when the step that produced this
#                  frame became runnable: the frame depends on no input at or after this position
#   u32 count      items in the payload
#   u32 server_us  microseconds from the server receiving the input frame that completed that step to this
#                  frame being ready to send (queueing + compute)
#   u32 compute_us microseconds of engine compute in the pass that produced the frame
HEADER = struct.Struct("<BB2xQQIII")
HEADER_BYTES = HEADER.size  # 32: the payload stays 4-byte aligned
PAYLOAD_AUDIO = 1
PAYLOAD_TOKENS = 2
FLAG_FINAL = 1

# error code -> websocket close code. 1003: a data type the server does not accept here; 1007: payload
# that is malformed for its type; 1008: a protocol or policy violation; 1009: too big; 1011: internal;
# 1013: try again later (here or, behind a load balancer, on another server); 1001: going away (the server
# is shutting down).
ERRORS: Dict[str, int] = {
    "bad_data_type": 1003,      # text where binary is expected, binary before hello
    "bad_audio": 1007,          # odd PCM16 byte count, float32 not a multiple of 4 bytes, NaN/inf, bad Opus
    "bad_tokens": 1007,         # byte count not a multiple of 4, out-of-range or misplaced token ids
    "bad_hello": 1008,          # malformed hello, unknown kind/format/layout, message before hello
    "unsupported_version": 1008,
    "bad_sample_rate": 1008,    # a hello rate outside 8000..48000 Hz, or one its format does not take
    "unauthorized": 1008,       # missing or wrong auth token
    "unknown_message": 1008,    # JSON with an unknown type, or not an object
    "idle_timeout": 1008,       # nothing received for idle_timeout_s
    "slow_consumer": 1008,      # the client stopped reading; its output queue hit its bound
    "frame_too_big": 1009,      # a message over max_frame_bytes
    "internal_error": 1011,
    "server_full": 1013,        # every session slot is taken
    "draining": 1013,           # the server is shutting down: it takes no new session (open ones finish)
    "going_away": 1001,         # the server shut down before the session ended (drain timeout)
    "llm_not_allowed": 1008,    # a hello names an LLM endpoint the server is not allowed to call (--allow-llm)
    "llm_error": 1014,          # the LLM of an llm session failed (unreachable, HTTP error, bad or cut tokens)
}


class ProtocolError(Exception):
    """A failure the peer is told about: an ``error`` message with ``code``, then close code ``close_code``.

    ``fields`` are extra members of the ``error`` message (``llm_error``: ``reason``, and ``status`` for an
    HTTP error).
    """

    def __init__(self, code: str, message: str, **fields: Any):
        if code not in ERRORS:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = fields

    def __reduce__(self) -> Any:  # pickled as its fields (a server's processes pass errors to each other)
        return _protocol_error, (self.code, self.message, self.fields)

    @property
    def close_code(self) -> int:
        return ERRORS[self.code]

    def to_json(self) -> str:
        return json.dumps({"type": "error", "code": self.code, "message": self.message, **self.fields})


def _protocol_error(code: str, message: str, fields: Dict[str, Any]) -> ProtocolError:
    return ProtocolError(code, message, **fields)


# ---- JSON messages ----------------------------------------------------------------------------------
def dumps(message: Dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def parse_json(text: str) -> Dict[str, Any]:
    """A text frame -> its JSON object with a string ``type``; raises :class:`ProtocolError`."""
    try:
        message = json.loads(text)
    except ValueError:
        raise ProtocolError("bad_data_type", "text frames must be JSON control messages; send audio and tokens "
                                             "as binary frames") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("unknown_message", "a JSON message must be an object with a string 'type'")
    return message


@dataclass
class LLMHello:
    """``hello.llm``: the server streams a ``decode`` session's tokens from this LLM instead of the client.

    Names as ``snac-stream play-tokens --llm``'s options: ``url`` (``--llm``: the server's base URL, or its
    ``/v1`` or ``/v1/completions`` URL), ``model`` (``--llm-model``), ``prompt`` (the text to speak),
    ``voice``, ``prompt_format`` (a preset of :data:`snac_stream.llm.PROMPT_FORMATS` or a template with
    ``{text}``), ``temperature``, ``top_p``, ``max_tokens`` (``None``: :class:`snac_stream.llm.SamplingParams`'
    defaults) and ``api_key`` (``--llm-api-key``: the LLM's bearer key; never echoed, logged or shown in a repr).
    Names and types are checked here; the server checks the URL against its allow-list and the prompt format
    and voice.
    """

    url: str
    model: str
    prompt: str
    voice: Optional[str] = None
    prompt_format: Optional[str] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    max_tokens: Optional[int] = None
    api_key: Optional[str] = field(default=None, repr=False)

    def as_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def parse(cls, value: Any) -> "LLMHello":
        """``hello.llm`` as sent -> an :class:`LLMHello`; ``bad_hello`` on unknown fields or wrong types."""
        if not isinstance(value, dict):
            raise ProtocolError("bad_hello", "llm must be an object with url, model and prompt")
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ProtocolError("bad_hello", f"unknown llm field(s): {', '.join(unknown)}")
        for name in ("url", "model", "prompt"):
            if not isinstance(value.get(name), str) or not value[name].strip():
                raise ProtocolError("bad_hello", f"llm.{name} must be a non-empty string")
        for name in ("voice", "prompt_format", "api_key"):
            if value.get(name) is not None and not isinstance(value[name], str):
                raise ProtocolError("bad_hello", f"llm.{name} must be a string")
        for name, low, high in (("temperature", 0.0, None), ("top_p", 0.0, 1.0)):
            number = value.get(name)
            if number is None:
                continue
            if (not isinstance(number, (int, float)) or isinstance(number, bool) or not math.isfinite(number)
                    or number < low or (high is not None and number > high) or (name == "top_p" and number == 0)):
                bounds = "in (0, 1]" if name == "top_p" else ">= 0"
                raise ProtocolError("bad_hello", f"llm.{name} must be a number {bounds}, got {number!r}")
        tokens = value.get("max_tokens")
        if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1):
            raise ProtocolError("bad_hello", f"llm.max_tokens must be a positive integer, got {tokens!r}")
        return cls(**value)


@dataclass
class Hello:
    """The client's first message.

    ``sample_format`` and ``sample_rate`` (Hz) describe the client's audio both ways; ``input_format`` /
    ``input_rate`` and ``output_format`` / ``output_rate`` override one direction (a direction with its own
    format does not take ``sample_rate``). A rate left out is the format's default (G.711: 8000, Opus: 48000,
    PCM: the model's). Formats are :data:`AUDIO_FORMATS`, rates 8000..48000; the server converts anything but
    PCM at the model's rate (``docs/protocol.md``, "Formats and sample rates"). ``opus_bitrate`` (bits/s) sets
    the Opus encoder of an ``opus``/``webm`` output.
    ``token_offset`` is added to every token id (e.g. 128266 for raw Orpheus LLM ids). ``llm`` (``decode``
    only): the server streams the tokens from that LLM endpoint and the client sends none; the layout then
    defaults to ``orpheus``.
    """

    kind: str
    sample_format: str = "pcm16"
    sample_rate: Optional[int] = None
    token_layout: str = DEFAULT_LAYOUT
    token_offset: int = 0
    auth: Optional[str] = None
    protocol: int = PROTOCOL_VERSION
    input_format: Optional[str] = None
    input_rate: Optional[int] = None
    output_format: Optional[str] = None
    output_rate: Optional[int] = None
    opus_bitrate: Optional[int] = None
    llm: Optional[LLMHello] = None

    _FIELDS = ("type", "protocol", "kind", "sample_format", "sample_rate", "token_layout", "token_offset", "auth",
               "input_format", "input_rate", "output_format", "output_rate", "opus_bitrate", "llm")

    def to_json(self) -> str:
        message = {"type": "hello", **{k: v for k, v in asdict(self).items() if v is not None}}
        if self.llm is not None:
            message["llm"] = self.llm.as_dict()
        return dumps(message)

    def formats(self) -> Dict[str, Tuple[str, Optional[int]]]:
        """``{"input": (format, rate or None: the format's default), "output": ...}``: a direction's own fields,
        else the shared ones (its rate only while it takes the shared format too)."""
        def way(fmt: Optional[str], rate: Optional[int]) -> Tuple[str, Optional[int]]:
            if fmt is None:
                return self.sample_format, rate if rate is not None else self.sample_rate
            return fmt, rate

        return {"input": way(self.input_format, self.input_rate), "output": way(self.output_format, self.output_rate)}

    @classmethod
    def from_text(cls, text: str) -> "Hello":
        """The first message of a session; one that is not a JSON object with a type is a malformed hello."""
        try:
            message = parse_json(text)
        except ProtocolError as exc:
            raise ProtocolError("bad_hello", f"the first message must be a JSON hello: {exc.message}") from None
        return cls.parse(message)

    @classmethod
    def parse(cls, message: Dict[str, Any]) -> "Hello":
        """Validate a parsed ``hello`` object. Names and types only: the layout is checked against the model, and
        rates, bitrate and the formats' combinations against the formats, by the server."""
        if message.get("type") != "hello":
            raise ProtocolError("bad_hello", f"the first message must be a hello, got type {message.get('type')!r}")
        unknown = sorted(set(message) - set(cls._FIELDS))
        if unknown:
            raise ProtocolError("bad_hello", f"unknown hello field(s): {', '.join(unknown)}")
        protocol = message.get("protocol", PROTOCOL_VERSION)
        if protocol != PROTOCOL_VERSION:
            raise ProtocolError("unsupported_version",
                                f"protocol version {protocol!r} is not supported; this server speaks {PROTOCOL_VERSION}")
        kind = message.get("kind")
        if kind not in KINDS:
            raise ProtocolError("bad_hello", f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        formats = {}
        for name in ("sample_format", "input_format", "output_format"):
            fmt = message.get(name, "pcm16" if name == "sample_format" else None)
            if fmt is not None and fmt not in AUDIO_FORMATS:
                raise ProtocolError("bad_hello", f"{name} must be one of {', '.join(AUDIO_FORMATS)}, got {fmt!r}")
            formats[name] = fmt
        numbers = {}
        for name, unit in (("sample_rate", "Hz"), ("input_rate", "Hz"), ("output_rate", "Hz"),
                           ("opus_bitrate", "bits/s")):
            value = message.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ProtocolError("bad_hello", f"{name} must be a positive integer ({unit}), got {value!r}")
            numbers[name] = value
        llm = None
        if "llm" in message:
            if kind != "decode":
                raise ProtocolError("bad_hello", f"llm applies to decode sessions only, not {kind}")
            llm = LLMHello.parse(message["llm"])
        # An LLM speaks Orpheus' <custom_token_N> unless the hello says otherwise.
        layout = message.get("token_layout", "orpheus" if llm is not None else DEFAULT_LAYOUT)
        if not isinstance(layout, str):
            raise ProtocolError("bad_hello", f"token_layout must be a string, got {layout!r}")
        offset = message.get("token_offset", 0)
        if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < 2**30:
            raise ProtocolError("bad_hello", f"token_offset must be an integer in [0, 2**30), got {offset!r}")
        auth = message.get("auth")
        if auth is not None and not isinstance(auth, str):
            raise ProtocolError("bad_hello", "auth must be a string")
        return cls(kind=kind, token_layout=layout, token_offset=offset, auth=auth, protocol=protocol, llm=llm,
                   **formats, **numbers)


@dataclass
class Ready:
    """The server's answer to a valid hello: what the session streams and how fast.

    Sample counts are at ``sample_rate``, the model's; ``step_samples`` of input (``step_frames`` coarse
    frames, ``step_frames * frame_tokens`` tokens) is the unit the engine computes in.
    ``algorithmic_latency_samples`` is the worst case, over output positions, of (input needed before an output
    item can be computed) minus (its own position): the codec's look-ahead and the step granularity, with no
    compute time, plus what converting the client's audio adds (``input_latency_samples`` and
    ``output_latency_samples``, which are at the client's rates, ``input_rate`` and ``output_rate``).
    """

    kind: str
    model: str
    sample_rate: int
    sample_format: str
    hop_samples: int
    frame_samples: int
    step_samples: int
    step_frames: int
    n_codebooks: int
    codebook_size: int
    token_layout: Dict[str, Any]
    algorithmic_latency_samples: int
    limits: Dict[str, Any]
    session: int
    server: str
    protocol: int = PROTOCOL_VERSION
    header_bytes: int = HEADER_BYTES
    random_weights: bool = False
    server_id: Optional[str] = None  # which server instance took the session (behind a load balancer)
    extra: Dict[str, Any] = field(default_factory=dict)
    # The client's audio each way (None where the kind has none that way): its format, its rate (Hz) and the
    # worst-case delay converting it adds (samples at that rate); the Opus bitrate (bits/s) of an Opus output.
    input_format: Optional[str] = None
    input_rate: Optional[int] = None
    input_latency_samples: Optional[int] = None
    output_format: Optional[str] = None
    output_rate: Optional[int] = None
    output_latency_samples: Optional[int] = None
    opus_bitrate: Optional[int] = None
    # An llm session's LLM: {"endpoint": its /v1/completions URL, "model", "prompt_format"}; None otherwise.
    llm: Optional[Dict[str, Any]] = None

    def to_json(self) -> str:
        return dumps({"type": "ready", **asdict(self)})

    @classmethod
    def parse(cls, message: Dict[str, Any]) -> "Ready":
        if message.get("type") != "ready":
            raise ValueError(f"expected a ready message, got {message.get('type')!r}")
        fields = {k: v for k, v in message.items() if k != "type"}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in fields.items() if k in known})


# ---- binary frames ----------------------------------------------------------------------------------
@dataclass
class OutputFrame:
    """A server -> client binary frame: header fields plus the payload array (samples or token ids)."""

    payload_kind: int
    start: int
    input_end: int
    server_us: int
    compute_us: int
    data: np.ndarray
    flags: int = 0

    @property
    def final(self) -> bool:
        """Produced by the end-of-stream flush (padding and tail), not by a streaming step."""
        return bool(self.flags & FLAG_FINAL)

    def pack(self) -> bytes:
        return pack_output_frame(self.payload_kind, self.start, self.input_end, self.server_us, self.compute_us,
                                 self.data, self.flags)

    @classmethod
    def unpack(cls, frame: Union[bytes, bytearray, memoryview], sample_format: str) -> "OutputFrame":
        """Parse a frame; audio payloads in ``pcm16`` or ``float32`` are returned as float32 samples (T,) in
        [-1, 1], in the other :data:`AUDIO_FORMATS` as their bytes (uint8: G.711 codes, Opus container data)."""
        if len(frame) < HEADER_BYTES:
            raise ValueError(f"binary frame of {len(frame)} bytes is shorter than the {HEADER_BYTES}-byte header")
        kind, flags, start, input_end, count, server_us, compute_us = HEADER.unpack_from(frame)
        body = memoryview(frame)[HEADER_BYTES:]
        if kind == PAYLOAD_AUDIO:
            data = (decode_audio(body, sample_format) if sample_format in SAMPLE_FORMATS
                    else np.frombuffer(body, np.uint8))
        elif kind == PAYLOAD_TOKENS:
            data = decode_tokens(body)
        else:
            raise ValueError(f"unknown payload kind {kind}")
        if data.shape[0] != count:
            raise ValueError(f"frame header says {count} items, payload holds {data.shape[0]}")
        return cls(kind, start, input_end, server_us, compute_us, data, flags)


def pack_output_frame(payload_kind: int, start: int, input_end: int, server_us: int, compute_us: int,
                      data: np.ndarray, flags: int = 0) -> bytes:
    """:meth:`OutputFrame.pack` without building the frame object (a server packs thousands a step). The
    microsecond fields saturate at the header's 32 bits."""
    if not (type(server_us) is int and type(compute_us) is int  # noqa: E721 - exact ints pack as they are
            and 0 <= server_us < _U32_END and 0 <= compute_us < _U32_END):
        server_us, compute_us = _u32(server_us), _u32(compute_us)
    head = HEADER.pack(payload_kind, flags, start, input_end, data.shape[0], server_us, compute_us)
    return head + data.tobytes()


_U32_END = 2**32


def _u32(value: int) -> int:
    return max(0, min(int(value), 2**32 - 1))


def encode_audio(samples: np.ndarray, sample_format: str) -> bytes:
    """Float samples (T,) in [-1, 1] -> payload bytes: PCM16 LE (rounded, saturated) or float32 LE."""
    return audio_payload(np.asarray(samples).reshape(-1), sample_format).tobytes()


def audio_payload(samples: np.ndarray, sample_format: str) -> np.ndarray:
    """Float samples in [-1, 1], any shape (e.g. (B, T): many streams converted at once) -> the payload's
    little-endian array of the same shape: int16 PCM (rounded, saturated; NaN -> 0) or float32."""
    samples = np.asarray(samples, dtype=np.float32)
    if sample_format == "pcm16":
        # In float32, in place: scaling by 2**15 is exact, so this equals the float64 arithmetic, in a quarter of
        # the time (a server converts every stream's output every step). Out of range (inf too) saturates.
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = np.multiply(samples, np.float32(32768.0))
        np.copyto(scaled, np.float32(0.0), where=np.isnan(scaled))  # nan_to_num's other masks cost more than this
        np.rint(scaled, out=scaled)
        np.clip(scaled, -32768, 32767, out=scaled)
        return scaled.astype("<i2")
    if sample_format == "float32":
        return samples.astype("<f4")
    raise ValueError(f"unknown sample format {sample_format!r}")


def decode_audio(payload: Union[bytes, bytearray, memoryview], sample_format: str) -> np.ndarray:
    """Payload bytes -> float32 samples (T,); raises :class:`ProtocolError` ``bad_audio`` on malformed data.

    PCM16 is scaled by 1/32768 (-32768 -> -1.0), as :func:`snac_stream.audio.pcm16_to_float` does.
    """
    dtype = SAMPLE_FORMATS.get(sample_format)
    if dtype is None:
        raise ValueError(f"unknown sample format {sample_format!r}")
    nbytes = memoryview(payload).nbytes
    if nbytes % dtype.itemsize:
        raise ProtocolError("bad_audio", f"{sample_format} audio needs a multiple of {dtype.itemsize} bytes per "
                                         f"frame, got {nbytes}")
    raw = np.frombuffer(payload, dtype=dtype)
    if sample_format == "pcm16":
        return raw.astype(np.float32) / np.float32(32768.0)
    if not np.isfinite(raw).all():
        raise ProtocolError("bad_audio", "float32 audio holds NaN or infinite samples")
    return raw.astype(np.float32)


def encode_tokens(tokens: Any) -> bytes:
    """Token ids -> int32 LE payload bytes."""
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < -(2**31) or ids.max() >= 2**31):
        raise ValueError("token ids must fit in int32")
    return ids.astype(TOKEN_DTYPE).tobytes()


def decode_tokens(payload: Union[bytes, bytearray, memoryview]) -> np.ndarray:
    """int32 LE payload -> int64 token ids (N,); raises :class:`ProtocolError` ``bad_tokens`` on a ragged size."""
    nbytes = memoryview(payload).nbytes
    if nbytes % TOKEN_DTYPE.itemsize:
        raise ProtocolError("bad_tokens", f"tokens are int32: a frame needs a multiple of 4 bytes, got {nbytes}")
    return np.frombuffer(payload, dtype=TOKEN_DTYPE).astype(np.int64)
