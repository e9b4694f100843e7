"""Speech from an OpenAI-compatible LLM server: stream a completion, decode SNAC frames as they complete.

A TTS language model such as Orpheus writes audio as ``<custom_token_N>`` text. Served by vLLM, SGLang or
llama.cpp's server behind ``/v1/completions`` with ``"stream": true``, the completion arrives as server-sent
events (``data: {json}`` lines, ended by ``data: [DONE]``). This module

* streams the completion (:func:`stream_completion`: text pieces, and token ids when the server sends them),
* pulls the audio tokens out of the text (:class:`AudioTokenText`), groups them into coarse frames with a
  :class:`~snac_stream.tokens.TokenLayout` parser, and
* decodes each coarse frame with the exact streaming decoder as soon as it is complete
  (:func:`stream_speech`), yielding float32 audio at the model's rate with the time to first token and the
  time to first audio measured separately.

Prompt formats are presets (:data:`PROMPT_FORMATS`) or any template with ``{voice}`` and ``{text}``.
``orpheus`` is the prompt Orpheus' own engine builds from token ids (start-of-human ``<custom_token_3>``,
``<|begin_of_text|>``, ``"{voice}: {text}"``, ``<|eot_id|>``, end-of-human ``<custom_token_4>``,
start-of-AI ``<custom_token_5>``, start-of-speech ``<custom_token_1>``), written as text that the server's
tokenizer maps back to those special tokens; ``orpheus-gguf`` is the shorter ``<|audio|>{voice}: {text}<|eot_id|>``
that quantised (GGUF) Orpheus builds served by llama.cpp or LM Studio expect.

Errors are :class:`LLMStreamError` subclasses, one per failure (unreachable endpoint, HTTP status, malformed
event, bad tokens, a stream ending inside a coarse frame). Audio decoded before a failure has been yielded
already, and the decoder's tail for the frames that did complete is yielded before the error is raised.

Needs ``aiohttp`` (``pip install 'snac-stream[llm]'``).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .tokens import (
    AudioTokenText,
    ORPHEUS_LLM_TOKEN_OFFSET,
    OrpheusLayout,
    TokenLayout,
)

__all__ = [
    "ORPHEUS_VOICES",
    "PROMPT_FORMATS",
    "PromptFormat",
    "SamplingParams",
    "CompletionPiece",
    "SpeechChunk",
    "SpeechStats",
    "LLMStreamError",
    "LLMConnectionError",
    "LLMHTTPError",
    "LLMProtocolError",
    "LLMServerError",
    "LLMTokenError",
    "LLMTruncatedError",
    "completions_url",
    "stream_completion",
    "stream_audio_tokens",
    "stream_speech",
    "speak",
]

#: Orpheus' English voices (canopylabs/orpheus-tts-0.1-finetune-prod).
ORPHEUS_VOICES: Tuple[str, ...] = ("tara", "leah", "jess", "leo", "dan", "mia", "zac", "zoe")


@dataclass(frozen=True)
class PromptFormat:
    """A prompt template with ``{text}`` and optionally ``{voice}``; ``voices`` empty means any voice."""

    name: str
    template: str
    voices: Tuple[str, ...] = ()
    default_voice: Optional[str] = None

    def format(self, text: str, voice: Optional[str] = None) -> str:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the text to speak is empty")
        voice = voice if voice is not None else self.default_voice
        if "{voice}" in self.template:
            if not voice:
                raise ValueError(f"prompt format {self.name!r} needs a voice")
            if self.voices and voice not in self.voices:
                raise ValueError(f"unknown voice {voice!r} for {self.name!r}; choose one of {', '.join(self.voices)}")
        return self.template.replace("{voice}", voice or "").replace("{text}", text)


PROMPT_FORMATS: Dict[str, PromptFormat] = {
    "orpheus": PromptFormat(
        "orpheus",
        "<custom_token_3><|begin_of_text|>{voice}: {text}<|eot_id|><custom_token_4><custom_token_5><custom_token_1>",
        ORPHEUS_VOICES, "tara"),
    "orpheus-gguf": PromptFormat("orpheus-gguf", "<|audio|>{voice}: {text}<|eot_id|>", ORPHEUS_VOICES, "tara"),
    "raw": PromptFormat("raw", "{text}"),
}


def get_prompt_format(spec: Union[str, PromptFormat]) -> PromptFormat:
    """A preset name from :data:`PROMPT_FORMATS`, a :class:`PromptFormat`, or a template holding ``{text}``."""
    if isinstance(spec, PromptFormat):
        return spec
    if spec in PROMPT_FORMATS:
        return PROMPT_FORMATS[spec]
    if isinstance(spec, str) and "{text}" in spec:
        return PromptFormat("custom", spec)
    raise ValueError(f"unknown prompt format {spec!r}: use one of {', '.join(PROMPT_FORMATS)} or a template with "
                     "{text} (and {voice})")


@dataclass
class SamplingParams:
    """Request fields of ``/v1/completions``; ``None`` leaves a field to the server. Defaults: Orpheus' own."""

    temperature: Optional[float] = 0.6
    top_p: Optional[float] = 0.8
    max_tokens: Optional[int] = 1200
    repetition_penalty: Optional[float] = 1.3  # vLLM, SGLang and llama.cpp accept it beside the OpenAI fields
    stop: Optional[Union[str, List[str]]] = None
    extra: Dict[str, Any] = field(default_factory=dict)  # anything else, e.g. {"seed": 0}

    def as_request(self) -> Dict[str, Any]:
        body = {name: getattr(self, name) for name in ("temperature", "top_p", "max_tokens", "repetition_penalty",
                                                       "stop")}
        body = {k: v for k, v in body.items() if v is not None}
        body.update(self.extra)
        return body


# ---- errors ------------------------------------------------------------------------------------------------
class LLMStreamError(Exception):
    """Base of every failure of a streamed completion or its decoding."""


class LLMConnectionError(LLMStreamError):
    """The endpoint cannot be reached, or the connection dropped / timed out mid-stream."""


class LLMHTTPError(LLMStreamError):
    """The server answered with an HTTP error status; ``status`` and a ``body`` excerpt are kept."""

    def __init__(self, url: str, status: int, body: str) -> None:
        self.url, self.status, self.body = url, status, body
        super().__init__(f"{url} answered HTTP {status}: {body[:300]!r}")


class LLMProtocolError(LLMStreamError):
    """The response is not the expected event stream (malformed JSON, an unexpected shape)."""


class LLMServerError(LLMStreamError):
    """The server reported an error inside the stream (``data: {"error": ...}``)."""


class LLMTokenError(LLMStreamError):
    """The tokens are not a valid audio token stream (an id out of range for its frame position, ...)."""


class LLMTruncatedError(LLMStreamError):
    """The completion ended inside a coarse frame (``tokens_left`` tokens of it arrived)."""

    def __init__(self, message: str, tokens_left: int) -> None:
        super().__init__(message)
        self.tokens_left = tokens_left


# ---- the completion stream ---------------------------------------------------------------------------------
@dataclass
class CompletionPiece:
    """One streamed chunk: its text, token ids if the server sent them, the finish reason on the last one."""

    text: str
    token_ids: Optional[List[int]] = None
    finish_reason: Optional[str] = None


def completions_url(url: str) -> str:
    """``http://host:port``, ``.../v1`` or ``.../v1/completions`` -> the ``/v1/completions`` endpoint."""
    if not isinstance(url, str) or not re.match(r"https?://", url):
        raise ValueError(f"LLM endpoint must be an http(s):// URL, got {url!r}")
    base = url.rstrip("/")
    if base.endswith("/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/completions"
    return base + "/v1/completions"


def _aiohttp() -> Any:
    try:
        import aiohttp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("streaming from an LLM server needs aiohttp: pip install 'snac-stream[llm]'") from exc
    return aiohttp


def _piece(event: Dict[str, Any], url: str) -> Optional[CompletionPiece]:
    """An SSE JSON event (vLLM / SGLang / llama.cpp shapes) -> a piece, or None for an event without choices."""
    if not isinstance(event, dict):
        raise LLMProtocolError(f"{url} sent an event that is not a JSON object: {str(event)[:200]!r}")
    if "error" in event:
        error = event["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise LLMServerError(f"{url} reported an error mid-stream: {str(message)[:300]}")
    choices = event.get("choices")
    if not choices:  # e.g. a final usage-only chunk
        return None
    choice = choices[0]
    if not isinstance(choice, dict):
        raise LLMProtocolError(f"{url} sent a choice that is not an object: {str(choice)[:200]!r}")
    text = choice.get("text")
    if text is None and isinstance(choice.get("delta"), dict):  # chat-style chunks
        text = choice["delta"].get("content")
    if text is not None and not isinstance(text, str):
        raise LLMProtocolError(f"{url} sent a non-string text: {str(text)[:200]!r}")
    ids = choice.get("token_ids")  # vLLM with "return_token_ids": true
    if ids is None:
        ids = event.get("tokens")  # llama.cpp with "return_tokens": true
    if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, int) for i in ids)):
        raise LLMProtocolError(f"{url} sent token ids that are not a list of ints: {str(ids)[:200]!r}")
    return CompletionPiece(text or "", ids, choice.get("finish_reason"))


async def stream_completion(url: str, model: str, prompt: str, params: Optional[SamplingParams] = None, *,
                            api_key: Optional[str] = None, request_token_ids: bool = False,
                            session: Any = None, connect_timeout: float = 10.0, read_timeout: float = 60.0,
                            ) -> AsyncIterator[CompletionPiece]:
    """Stream ``prompt``'s completion from an OpenAI-compatible ``/v1/completions`` endpoint.

    Yields :class:`CompletionPiece` as the events arrive; returns at ``data: [DONE]`` (or, for servers that
    do not send it, at the end of a stream whose last choice had a finish reason). ``request_token_ids``
    asks for token ids beside the text (vLLM ``return_token_ids``, llama.cpp ``return_tokens``).
    ``read_timeout`` bounds the silence between two reads. Closing the generator (``aclose()``, or
    cancelling the task iterating it) closes the HTTP connection, which makes vLLM and SGLang abort the
    request.

    Raises :class:`LLMConnectionError`, :class:`LLMHTTPError`, :class:`LLMProtocolError`,
    :class:`LLMServerError`.
    """
    aiohttp = _aiohttp()
    endpoint = completions_url(url)
    body: Dict[str, Any] = {"model": model, "prompt": prompt, "stream": True}
    body.update((params or SamplingParams()).as_request())
    if request_token_ids:
        body.setdefault("return_token_ids", True)
        body.setdefault("return_tokens", True)
    headers = {"Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    own = session is None
    if own:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout))
    try:
        try:
            response = await session.post(endpoint, json=body, headers=headers)
        except aiohttp.ClientConnectorError as exc:
            raise LLMConnectionError(f"cannot connect to {endpoint}: {exc}") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise LLMConnectionError(f"request to {endpoint} failed: {exc!r}") from exc
        async with response:
            if response.status >= 400:
                try:
                    text = (await response.content.read(4096)).decode("utf-8", "replace")
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    text = ""
                raise LLMHTTPError(endpoint, response.status, text.strip())
            kind = response.headers.get("Content-Type", "")
            if "text/event-stream" not in kind:
                if "json" in kind:  # a server that ignored "stream": true answers with one JSON object
                    try:
                        event = json.loads(await response.text())
                    except (ValueError, aiohttp.ClientError) as exc:
                        raise LLMProtocolError(f"{endpoint} sent malformed JSON: {exc}") from exc
                    piece = _piece(event, endpoint)
                    if piece is not None:
                        yield piece
                    return
                raise LLMProtocolError(f"{endpoint} answered with Content-Type {kind!r}, not an event stream")
            async for piece in _read_events(response, endpoint):
                yield piece
    finally:
        if own:
            await session.close()


async def _read_events(response: Any, endpoint: str) -> AsyncIterator[CompletionPiece]:
    """Server-sent events (data lines joined until a blank line) -> pieces, until ``[DONE]``."""
    aiohttp = _aiohttp()
    data: List[str] = []
    finished = False
    count = 0
    while True:
        try:
            raw = await response.content.readline()
        except asyncio.TimeoutError as exc:
            raise LLMConnectionError(f"{endpoint} sent nothing for too long (after {count} events)") from exc
        except aiohttp.ClientError as exc:
            raise LLMConnectionError(f"the connection to {endpoint} failed after {count} events: {exc!r}") from exc
        if not raw:  # end of the body
            if data:
                raise LLMConnectionError(f"the stream from {endpoint} ended inside an event")
            if finished:
                return  # a finish reason was sent; [DONE] is missing (tolerated)
            raise LLMConnectionError(f"the stream from {endpoint} ended after {count} events without [DONE] or a "
                                     "finish reason (connection dropped?)")
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line:
            if line.startswith(":"):
                continue  # comment / keep-alive
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value[1:] if value.startswith(" ") else value)
            continue  # "event:", "id:", "retry:" carry nothing we use
        if not data:
            continue
        payload = "\n".join(data)
        data = []
        if payload.strip() == "[DONE]":
            return
        try:
            event = json.loads(payload)
        except ValueError as exc:
            raise LLMProtocolError(f"{endpoint} sent malformed JSON in event {count}: {payload[:200]!r} ({exc})"
                                   ) from None
        count += 1
        piece = _piece(event, endpoint)
        if piece is None:
            continue
        finished = finished or piece.finish_reason is not None
        yield piece


# ---- speech --------------------------------------------------------------------------------------------------
@dataclass
class SpeechStats:
    """Timings (seconds from sending the request) and counts of one :func:`stream_speech` run."""

    rate: int
    requested_at: float = 0.0  # time.monotonic() when the request was sent
    first_token_s: Optional[float] = None  # first completion text or id received
    first_audio_token_s: Optional[float] = None  # first audio token parsed
    first_audio_s: Optional[float] = None  # first audio samples decoded
    finished_s: Optional[float] = None
    pieces: int = 0
    tokens: int = 0  # audio tokens
    frames: int = 0  # coarse frames decoded
    samples: int = 0
    finish_reason: Optional[str] = None
    dropped_tokens: int = 0  # a partial last frame dropped (on_partial_frame="drop")
    skipped: int = 0  # control tokens and other text skipped
    other_text: str = ""

    @property
    def audio_s(self) -> float:
        return self.samples / self.rate

    def summary(self) -> str:
        def ms(v: Optional[float]) -> str:
            return "-" if v is None else f"{1000 * v:.0f} ms"
        return (f"first token {ms(self.first_token_s)}, first audio {ms(self.first_audio_s)}, {self.tokens} tokens, "
                f"{self.frames} frames, {self.audio_s:.2f} s of audio in {ms(self.finished_s)}"
                f" ({self.finish_reason or 'no finish reason'})")


@dataclass
class SpeechChunk:
    """Decoded audio: mono float32 samples at ``stats.rate``, starting at sample ``start`` of the utterance."""

    audio: np.ndarray
    start: int
    stats: SpeechStats
    final: bool = False  # the decoder's tail at the end of the stream (or before an error)


def _samples(audio: torch.Tensor) -> np.ndarray:
    return audio[0, 0].detach().to("cpu", torch.float32).numpy()


class _FrameDecoder:
    """Layout parser + exact streaming decoder: ids in, audio of each completed coarse frame out."""

    def __init__(self, model: Any, layout: TokenLayout, lookahead_samples: Optional[int]) -> None:
        self.model = model
        self.parser = layout.parser()
        self.decoder = model.streaming_decoder(lookahead_samples=lookahead_samples)
        self.frames = 0

    def push(self, ids: Sequence[int]) -> np.ndarray:
        with torch.inference_mode():
            try:
                codes = self.parser.push(torch.tensor(list(ids), dtype=torch.int64))
            except ValueError as exc:
                raise LLMTokenError(f"bad audio tokens from the LLM: {exc}") from None
            if codes[0].shape[-1] == 0:
                return np.zeros(0, np.float32)
            self.frames += codes[0].shape[-1]
            return _samples(self.decoder.push([c.to(self.model.device) for c in codes]))

    def flush(self) -> np.ndarray:
        with torch.inference_mode():
            return _samples(self.decoder.flush())

    def close(self) -> None:
        pass


class _TransportFrames:
    """Ids checked by a local layout parser, whole coarse frames handed to a token transport (an object with
    ``push(ids) -> samples`` and ``flush() -> samples``, e.g. :class:`snac_stream.remote.WebSocketTokenDecoder`
    decoding on a ``snac-stream serve`` server, or :class:`snac_stream.live.InProcessTokenDecoder`)."""

    def __init__(self, transport: Any, layout: TokenLayout) -> None:
        self.transport = transport
        self.parser = layout.parser()
        self.frame_tokens = layout.frame_tokens
        self.held: List[int] = []  # ids of the current partial frame
        self.frames = 0

    def _call(self, fn: Callable[..., np.ndarray], *args: Any) -> np.ndarray:
        try:
            return np.asarray(fn(*args), dtype=np.float32)
        except ValueError as exc:  # the decoder refused the tokens
            raise LLMTokenError(f"the decoder refused the tokens: {exc}") from None
        except OSError as exc:  # ConnectionError and snac_stream.remote.RemoteError
            raise LLMConnectionError(f"the decoder failed: {exc}") from None

    def push(self, ids: Sequence[int]) -> np.ndarray:
        try:
            codes = self.parser.push(torch.tensor(list(ids), dtype=torch.int64))
        except ValueError as exc:
            raise LLMTokenError(f"bad audio tokens from the LLM: {exc}") from None
        joined = self.held + [int(i) for i in ids]
        whole = len(joined) - len(joined) % self.frame_tokens
        self.held = joined[whole:]
        self.frames += codes[0].shape[-1]
        return self._call(self.transport.push, joined[:whole]) if whole else np.zeros(0, np.float32)

    def flush(self) -> np.ndarray:
        return self._call(self.transport.flush)

    def close(self) -> None:
        close = getattr(self.transport, "close", None)
        if close is not None:
            close()


async def stream_audio_tokens(url: str, model_name: str, prompt: str, params: Optional[SamplingParams] = None, *,
                              stats: SpeechStats, use_token_ids: bool = False, api_key: Optional[str] = None,
                              session: Any = None, connect_timeout: float = 10.0, read_timeout: float = 60.0,
                              ) -> AsyncIterator[List[int]]:
    """The audio token ids of ``prompt``'s streamed completion, a list per piece that brings any.

    The ids are a :class:`~snac_stream.tokens.TokenLayout` parser's input: ``<custom_token_N>`` in the text is
    ``N - 10`` (:class:`~snac_stream.tokens.AudioTokenText`, which also takes tokens a piece cuts in half), or
    with ``use_token_ids`` the raw ids the server sends less ``ORPHEUS_LLM_TOKEN_OFFSET`` (smaller ids, control
    and text tokens, are skipped). ``stats`` is updated as the pieces arrive: ``requested_at`` when the request
    goes out, ``first_token_s`` and ``first_audio_token_s`` (seconds from it), ``pieces``, ``tokens``,
    ``finish_reason``, ``skipped``, ``other_text``. Both :func:`stream_speech` and the server's LLM sessions
    (:mod:`snac_stream.server.llm`) read completions through it. Closing the generator closes the HTTP
    connection.

    Raises what :func:`stream_completion` raises, and :class:`LLMProtocolError` when ``use_token_ids`` is set
    but the server sends no ids.
    """
    extractor = AudioTokenText()
    stats.requested_at = time.monotonic()
    completion = stream_completion(url, model_name, prompt, params, api_key=api_key,
                                   request_token_ids=use_token_ids, session=session,
                                   connect_timeout=connect_timeout, read_timeout=read_timeout)

    def account(ids: List[int]) -> List[int]:
        if ids:
            if stats.first_audio_token_s is None:
                stats.first_audio_token_s = time.monotonic() - stats.requested_at
            stats.tokens += len(ids)
        return ids

    try:
        async for piece in completion:
            if stats.first_token_s is None and (piece.text or piece.token_ids):
                stats.first_token_s = time.monotonic() - stats.requested_at
            stats.pieces += 1
            if piece.finish_reason is not None:
                stats.finish_reason = piece.finish_reason
            if use_token_ids:
                if piece.token_ids is None:
                    if piece.text:
                        raise LLMProtocolError("use_token_ids is set but the server sends no token ids (vLLM: "
                                               "return_token_ids; llama.cpp: return_tokens)")
                    continue
                # Raw vocabulary ids: <custom_token_N> is 128256 + N, so audio ids N - 10 are raw - 128266.
                ids = [i - ORPHEUS_LLM_TOKEN_OFFSET for i in piece.token_ids if i >= ORPHEUS_LLM_TOKEN_OFFSET]
                stats.skipped += len(piece.token_ids) - len(ids)
            else:
                ids = extractor.feed(piece.text)
            if account(ids):
                yield ids
        if not use_token_ids:
            ids = account(extractor.feed("", final=True))  # a last token the stream's end completes
            if ids:
                yield ids
    finally:
        stats.skipped += extractor.skipped
        stats.other_text = extractor.other_text
        await completion.aclose()


async def stream_speech(url: str, model_name: str, text: str, snac_model: Any, *, voice: Optional[str] = None,
                        prompt_format: Union[str, PromptFormat] = "orpheus",
                        params: Optional[SamplingParams] = None, layout: Optional[TokenLayout] = None,
                        use_token_ids: bool = False, lookahead_samples: Optional[int] = None,
                        on_partial_frame: str = "error", api_key: Optional[str] = None, session: Any = None,
                        decode_in_thread: bool = True, connect_timeout: float = 10.0,
                        read_timeout: float = 60.0, stats: Optional[SpeechStats] = None,
                        decoder: Any = None, decoder_url: Optional[str] = None,
                        ) -> AsyncIterator[SpeechChunk]:
    """Speak ``text`` through a TTS LLM at ``url`` (model ``model_name``) and ``snac_model``'s decoder.

    Yields :class:`SpeechChunk` as soon as each coarse frame decodes (the exact decoder holds back
    ``decoder.latency_samples``; pass ``lookahead_samples`` to trade exactness for latency), then the tail.
    Their audio concatenated equals ``snac_model.decode`` of the codes the tokens carry (within float
    rounding). ``chunk.stats`` is updated in place: ``first_token_s`` / ``first_audio_s`` are the time to
    first token / first audio from sending the request.

    Args:
        prompt_format: a :data:`PROMPT_FORMATS` name, a :class:`PromptFormat`, or a template with ``{text}``
            and ``{voice}``.
        layout: how tokens map to codes; default :class:`~snac_stream.tokens.OrpheusLayout` (24 kHz model).
        use_token_ids: take audio tokens from the token ids the server sends instead of the text, and ask
            for them: raw Orpheus vocabulary ids (audio ids from 128266 = ``<custom_token_10>``; smaller ids,
            control and text tokens, are skipped).
        on_partial_frame: ``"error"`` (:class:`LLMTruncatedError` after the audio) or ``"drop"`` when the
            completion ends inside a coarse frame (e.g. at ``max_tokens``).
        decode_in_thread: run each decoder step in a worker thread so that the event loop (other sessions,
            a voice pipeline) keeps running while it computes.
        stats: a :class:`SpeechStats` to fill in (default: a new one, reachable as ``chunk.stats``).
        decoder: decode somewhere else than in this process: a token transport (``push(ids) -> samples``,
            ``flush() -> samples``, optional ``close()``), fed whole coarse frames; ``snac_model`` may then be
            None (the layout defaults to Orpheus', the rate to the transport's ``sample_rate``).
        decoder_url: shorthand for ``decoder=WebSocketTokenDecoder(decoder_url, "orpheus")``: a decode
            session on a ``snac-stream serve`` server (``ws://host:port``).
    """
    if on_partial_frame not in ("error", "drop"):
        raise ValueError(f"on_partial_frame must be 'error' or 'drop', got {on_partial_frame!r}")
    prompt = get_prompt_format(prompt_format).format(text, voice)
    if layout is None:
        layout = OrpheusLayout(snac_model.config if snac_model is not None else None)
    if decoder_url is not None:
        if decoder is not None:
            raise ValueError("pass decoder or decoder_url, not both")
        from .remote import RemoteError, WebSocketTokenDecoder

        try:
            decoder = await asyncio.to_thread(WebSocketTokenDecoder, decoder_url, layout.name,
                                              token_offset=layout.token_offset)
        except (RemoteError, OSError) as exc:
            raise LLMConnectionError(f"cannot open a decode session on {decoder_url}: {exc}") from exc
    if decoder is None and snac_model is None:
        raise ValueError("stream_speech needs snac_model, or a decoder / decoder_url that decodes elsewhere")
    frames: Any = (_FrameDecoder(snac_model, layout, lookahead_samples) if decoder is None
                   else _TransportFrames(decoder, layout))
    rate = snac_model.sampling_rate if snac_model is not None else getattr(decoder, "sample_rate", 24000)
    if stats is None:
        stats = SpeechStats(rate=rate)
    run: Callable[..., Any] = asyncio.to_thread if decode_in_thread else _call
    stats.requested_at = time.monotonic()  # again when the request goes out (stream_audio_tokens)
    position = 0

    def elapsed() -> float:
        return time.monotonic() - stats.requested_at

    def chunk(audio: np.ndarray, final: bool = False) -> SpeechChunk:
        nonlocal position
        out = SpeechChunk(audio, position, stats, final)
        position += audio.shape[0]
        stats.samples = position
        if audio.shape[0] and stats.first_audio_s is None:
            stats.first_audio_s = elapsed()
        return out

    tokens = stream_audio_tokens(url, model_name, prompt, params, stats=stats, use_token_ids=use_token_ids,
                                 api_key=api_key, session=session, connect_timeout=connect_timeout,
                                 read_timeout=read_timeout)
    # A reader task drains the HTTP stream while the decoder computes, so that pieces are read (and their
    # arrival timed) as they come, not when the decoder is free. (A piece still in aiohttp's buffer when the
    # connection breaks is lost: aiohttp raises the error before handing out what it buffered.)
    queue: "asyncio.Queue[Any]" = asyncio.Queue()

    async def read() -> None:
        try:
            async for ids in tokens:
                queue.put_nowait(ids)
            queue.put_nowait(None)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there in order
            queue.put_nowait(exc)
        finally:
            await tokens.aclose()  # on cancellation too: closes the HTTP connection at once

    try:
        reader = asyncio.create_task(read())
        failure: Optional[BaseException] = None
        try:
            while True:
                ids = await queue.get()
                if ids is None:
                    break
                if isinstance(ids, BaseException):
                    raise ids
                audio = await run(frames.push, ids)
                stats.frames = frames.frames
                if audio.shape[0]:
                    yield chunk(audio)
            left = frames.parser.pending
            if left and on_partial_frame == "error":
                raise LLMTruncatedError(
                    f"the completion ended inside a coarse frame: {left} of its {layout.frame_tokens} tokens arrived "
                    f"(finish reason {stats.finish_reason!r}); the audio of the {frames.frames} whole frames was "
                    "delivered", left)
            stats.dropped_tokens = left
        except LLMStreamError as exc:
            failure = exc
        finally:
            if not reader.done():
                reader.cancel()  # we stop early (closed, cancelled, bad tokens): drop the connection
            try:
                await reader
            except asyncio.CancelledError:
                pass
        # The frames that did complete: their tail (the stream as if it ended there), then any error.
        if frames.frames:
            try:
                tail = await run(frames.flush)
            except LLMStreamError as exc:
                failure = failure or exc
            else:
                stats.finished_s = elapsed()
                yield chunk(tail, final=True)
        stats.finished_s = elapsed()
        if failure is not None:
            raise failure
    finally:
        if decoder is not None:  # a remote session: leave it (at once when stopped early)
            await asyncio.to_thread(frames.close)


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def speak(url: str, model_name: str, text: str, snac_model: Any, sink: Callable[[np.ndarray], None], *,
          on_first_audio: Optional[Callable[[SpeechStats], None]] = None, **kwargs: Any) -> SpeechStats:
    """Synchronous entry: run :func:`stream_speech` and hand each audio chunk to ``sink(samples)``.

    For the command line (``snac-stream play-tokens --llm URL``): ``sink`` can be a sound device's or file
    writer's ``write``. ``on_first_audio(stats)`` is called once, after the first samples went to ``sink``.
    Returns the stats; errors propagate after the audio of the frames that completed reached ``sink``.
    """

    stats = SpeechStats(rate=snac_model.sampling_rate)

    async def main() -> SpeechStats:
        told = False
        async for piece in stream_speech(url, model_name, text, snac_model, stats=stats, **kwargs):
            if piece.audio.shape[0]:
                sink(piece.audio)
                if not told and on_first_audio is not None:
                    on_first_audio(stats)
                told = True
        return stats

    return asyncio.run(main())
