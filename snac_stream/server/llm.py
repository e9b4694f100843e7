"""LLM sessions: a ``decode`` session whose tokens the server streams from an OpenAI-compatible LLM endpoint.

The hello names the endpoint, model and text (``hello.llm``, :class:`~snac_stream.protocol.LLMHello`); the
server checks the URL against its allow-list (``serve --allow-llm``, :func:`.options.llm_endpoint_allowed`),
streams the completion with :func:`snac_stream.llm.stream_audio_tokens` on the event loop, and the connection
side feeds the ids to the session exactly as a client's tokens (the same parser, backlog bound and engine
lane). This module holds what is particular to that: the request (:class:`LLMSource`), its errors as the
protocol's ``llm_error`` and the ``llm`` progress messages. The LLM's key is kept out of every message, log
line and repr.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional

from ..llm import (LLMConnectionError, LLMHTTPError, LLMProtocolError, LLMServerError, LLMStreamError,
                   LLMTokenError, LLMTruncatedError, SamplingParams, SpeechStats, get_prompt_format,
                   stream_audio_tokens)
from ..protocol import LLMHello, ProtocolError, dumps
from .options import ServerOptions, llm_endpoint_allowed

# llm_error's "reason", per failure of snac_stream.llm (subclasses before their bases).
REASONS = ((LLMHTTPError, "http"), (LLMConnectionError, "connection"), (LLMProtocolError, "protocol"),
           (LLMServerError, "server"), (LLMTruncatedError, "truncated"), (LLMTokenError, "tokens"))


@dataclass
class LLMSource:
    """One session's completion request: the allowed endpoint, the model, the formatted prompt, sampling.

    ``connect_timeout`` and ``read_timeout`` (seconds) bound the connection and the LLM's silence between two
    reads (the server's ``idle_timeout_s``).
    """

    endpoint: str
    model: str
    prompt: str
    prompt_format: str
    params: SamplingParams
    read_timeout: float
    connect_timeout: float = 10.0
    api_key: Optional[str] = field(default=None, repr=False)

    @classmethod
    def from_hello(cls, llm: LLMHello, options: ServerOptions) -> "LLMSource":
        """Check ``hello.llm`` against the server's settings: ``llm_not_allowed`` (LLM sessions off, or the URL
        not on the allow-list), ``bad_hello`` (an unknown prompt format or voice)."""
        if not options.allow_llm:
            raise ProtocolError("llm_not_allowed", "this server takes no llm sessions (it was started without "
                                                   "--allow-llm)")
        endpoint = llm_endpoint_allowed(options, llm.url)
        if endpoint is None:
            # A URL with credentials is refused without being repeated (in the error, or the log).
            shown = "(a URL holding credentials)" if "@" in llm.url else repr(llm.url[:200])
            raise ProtocolError("llm_not_allowed", f"the LLM endpoint {shown} is not on this server's allow-list "
                                                   "(--allow-llm)")
        try:
            prompt_format = get_prompt_format(llm.prompt_format or "orpheus")
            prompt = prompt_format.format(llm.prompt, llm.voice)
        except ValueError as exc:
            raise ProtocolError("bad_hello", f"llm: {exc}") from None
        defaults = SamplingParams()
        params = SamplingParams(
            temperature=defaults.temperature if llm.temperature is None else llm.temperature,
            top_p=defaults.top_p if llm.top_p is None else llm.top_p,
            max_tokens=defaults.max_tokens if llm.max_tokens is None else llm.max_tokens)
        return cls(endpoint, llm.model, prompt, prompt_format.name, params, read_timeout=options.idle_timeout_s,
                   api_key=llm.api_key or options.llm_api_key)

    def ready_fields(self) -> Dict[str, Any]:
        """What ``ready.llm`` tells the client (never the key)."""
        return {"endpoint": self.endpoint, "model": self.model, "prompt_format": self.prompt_format}

    def tokens(self, stats: SpeechStats) -> AsyncIterator[List[int]]:
        """The completion's audio token ids as they arrive (:func:`snac_stream.llm.stream_audio_tokens`)."""
        return stream_audio_tokens(self.endpoint, self.model, self.prompt, self.params, stats=stats,
                                   api_key=self.api_key, connect_timeout=self.connect_timeout,
                                   read_timeout=self.read_timeout)

    def error(self, exc: LLMStreamError) -> ProtocolError:
        """``exc`` as the session's ``llm_error``, its ``reason`` one of those of :data:`REASONS`."""
        reason = next((name for kind, name in REASONS if isinstance(exc, kind)), "connection")
        fields: Dict[str, Any] = {"reason": reason}
        if isinstance(exc, LLMHTTPError):
            fields["status"] = exc.status
        return ProtocolError("llm_error", self.scrub(f"the LLM failed: {exc}"), **fields)

    def scrub(self, text: str) -> str:
        """``text`` without the key, should an error (an LLM echoing its request) carry it."""
        return text.replace(self.api_key, "***") if self.api_key else text


def progress_message(event: str, stats: SpeechStats) -> str:
    """An ``llm`` message: ``first_tokens`` (the first audio tokens arrived) or ``end`` (the completion ended,
    or failed). Times in ms from the server sending the request."""
    def ms(seconds: Optional[float]) -> Optional[float]:
        return None if seconds is None else round(seconds * 1000, 1)

    message: Dict[str, Any] = {"type": "llm", "event": event, "first_token_ms": ms(stats.first_token_s),
                               "first_audio_token_ms": ms(stats.first_audio_token_s)}
    if event == "end":
        message.update(finished_ms=ms(stats.finished_s), tokens=stats.tokens, pieces=stats.pieces,
                       skipped=stats.skipped, finish_reason=stats.finish_reason)
    return dumps(message)
