"""Server settings and the security rules that read them: limits, the auth token, allowed browser origins;
and :class:`ServedModel`, what clients are told about the model.

Nothing here touches a socket or an engine; the connection side (:mod:`.connection`) and the HTTP side
(:mod:`.web`) both ask these functions, so the handshake and ``/config.json`` apply the same rules.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

import torch

from ..config import SNACConfig
from ..llm import completions_url
from ..protocol import TOKEN_ENV

# The environment variable holding the bearer key the server sends to allowed LLMs (serve --llm-api-key).
LLM_KEY_ENV = "SNAC_STREAM_LLM_API_KEY"
# Browsers send an Origin header; other clients do not (None). Default: pages served from this machine.
LOOPBACK_ORIGINS: Tuple[Union[str, re.Pattern, None], ...] = (
    re.compile(r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"), None)


@dataclass
class ServerOptions:
    """Limits and security settings.

    ``max_sessions``: concurrent sessions per device (engine set); a server on several devices takes
    ``max_sessions`` times their number. ``token``: a shared secret clients present in ``hello.auth`` or an
    ``Authorization: Bearer`` header;
    required when ``host`` is not a loopback address. ``allowed_origins``: exact Origin values (or ``"*"``)
    browsers may connect from, besides loopback pages. ``threads``: torch intra-op threads of the engine
    worker (``None``: :func:`default_engine_threads`). ``allow_llm``: the LLM endpoints a decode session's
    hello may name (``hello.llm``; none: such hellos are refused, ``llm_not_allowed``), each a URL (its
    ``/v1/completions`` endpoint, exactly) or a prefix ending in ``/*`` (:func:`llm_endpoint_allowed`).
    ``llm_api_key``: the bearer key sent to them when a hello gives none.
    """

    host: str = "127.0.0.1"
    port: int = 8765
    max_sessions: int = 8
    max_frame_bytes: int = 1 << 20
    idle_timeout_s: float = 30.0
    max_backlog_s: float = 2.0
    max_output_bytes: int = 4 << 20
    token: Optional[str] = None
    allowed_origins: Sequence[str] = ()
    backend: Optional[str] = None
    threads: Optional[int] = None
    web: bool = True  # serve the browser page (snac_stream/server/web.py) on plain HTTP GETs
    # Warn an audio-input session (encode, roundtrip) whose output answers input received more than this many
    # seconds earlier: the server is slower than that session's input. 0: never.
    behind_warning_s: float = 1.0
    # GET /healthz answers 503 while one engine tick has been running longer than this (a stuck worker).
    stuck_tick_s: float = 30.0
    # Told to clients in `ready` (which server of several took the session); None: "<hostname>:<port>".
    server_id: Optional[str] = None
    allow_llm: Sequence[str] = ()
    llm_api_key: Optional[str] = field(default=None, repr=False)

    def check(self) -> None:
        """Raise ``ValueError`` on a setting out of range, or a non-loopback bind without a token."""
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.max_frame_bytes < 1024:
            raise ValueError(f"max_frame_bytes must be >= 1024, got {self.max_frame_bytes}")
        if self.idle_timeout_s <= 0 or self.max_backlog_s <= 0:
            raise ValueError("idle_timeout_s and max_backlog_s must be positive")
        if not self.behind_warning_s >= 0:
            raise ValueError(f"behind_warning_s must be >= 0, got {self.behind_warning_s}")
        if not self.stuck_tick_s > 0:
            raise ValueError(f"stuck_tick_s must be positive, got {self.stuck_tick_s}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {self.threads!r}")
        for entry in self.allow_llm:
            llm_allow_rule(entry)
        if self.allow_llm:
            try:
                import aiohttp  # noqa: F401
            except ImportError:
                raise ValueError("LLM sessions (allow_llm, --allow-llm) need aiohttp: "
                                 "pip install 'snac-stream[llm]'") from None
        if not is_loopback(self.host) and not self.token:
            raise ValueError(f"binding to {self.host!r} (not a loopback address) requires an auth token: pass "
                             f"--token or set {TOKEN_ENV}")


def default_engine_threads(devices: Sequence[torch.device] = ()) -> int:
    """Torch intra-op threads for the engine workers. With every engine on a GPU, one: their CPU work is
    bookkeeping (joining inputs, checks, conversions) that more threads barely speed up, while the idle
    ones spin for a while after each parallel op, on cores the front ends need. Otherwise (the CPU computes
    the steps) torch's default less one core for the event loop."""
    if devices and all(device.type == "cuda" for device in devices):
        return 1
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1))


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname, "" or "0.0.0.0"-like wildcard: assume reachable from outside


def token_accepted(options: ServerOptions, presented: Optional[str]) -> bool:
    """Whether ``presented`` (from the hello or the bearer header) opens a session; any does without a token."""
    if not options.token:
        return True
    # Constant time: the comparison reveals nothing about how much of a guess was right.
    return hmac.compare_digest((presented or "").encode(), options.token.encode())


def handshake_origins(options: ServerOptions) -> Optional[List[Union[str, re.Pattern, None]]]:
    """The Origin values the websocket handshake accepts (``websockets``' ``origins``); None: any."""
    if "*" in options.allowed_origins:
        return None
    return [*LOOPBACK_ORIGINS, *options.allowed_origins]


def origin_allowed(options: ServerOptions, origin: str) -> bool:
    """Whether a browser page at ``origin`` passes the websocket Origin check (the handshake's rule)."""
    allowed = options.allowed_origins
    if "*" in allowed or origin in allowed:
        return True
    return any(isinstance(p, re.Pattern) and p.fullmatch(origin) for p in LOOPBACK_ORIGINS)


# An LLM endpoint's path: what /v1/completions URLs hold. Nothing percent-encoded, no "." or ".." segment, so
# that an allowed prefix cannot be walked out of.
_LLM_PATH = re.compile(r"(/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)*/?")


def llm_endpoint(url: str) -> str:
    """An LLM URL (base, ``/v1`` or ``/v1/completions``) -> its ``/v1/completions`` endpoint, scheme and host in
    lower case. ``ValueError`` for a URL an allow-list cannot judge: not http(s), no host, credentials, a
    query or fragment, a path with ``.``/``..`` segments or percent-escapes."""
    endpoint = completions_url(url)
    return _normalised(endpoint, url)


def _normalised(url: str, given: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a malformed port
    except ValueError:
        raise ValueError(f"malformed URL {given!r}") from None
    if not parts.hostname:
        raise ValueError(f"URL {given!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"URL {given!r} holds credentials: give the LLM's key as api_key (--llm-api-key)")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(f"URL {given!r} has a query or fragment")
    if not _LLM_PATH.fullmatch(parts.path):
        raise ValueError(f"URL {given!r} has a path with '.' or '..' segments or escapes")
    host = parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme.lower()}://{host}{'' if port is None else f':{port}'}{parts.path}"


def llm_allow_rule(entry: str) -> Tuple[str, bool]:
    """An ``--allow-llm`` entry -> (endpoint or prefix, is a prefix). ``URL`` allows its ``/v1/completions``
    endpoint only (``http://h:8000``, ``http://h:8000/v1`` and ``http://h:8000/v1/completions`` are the same);
    ``http(s)://HOST[:PORT]/PATH/*`` allows every endpoint under ``/PATH/`` of that host and port (the prefix
    ends at a ``/``, so ``http://h:8000/*`` does not allow ``http://h:8000.example``)."""
    if not isinstance(entry, str) or not re.match(r"https?://", entry):
        raise ValueError(f"an LLM allow-list entry must be an http(s):// URL, got {entry!r}")
    if entry.endswith("/*"):
        return _normalised(entry[:-1], entry), True
    if "*" in entry:
        raise ValueError(f"in an LLM allow-list entry '*' may only end a prefix, as in http://host:8000/*; "
                         f"got {entry!r}")
    return llm_endpoint(entry), False


def llm_endpoint_allowed(options: ServerOptions, url: str) -> Optional[str]:
    """The endpoint a hello's ``llm.url`` names if ``options.allow_llm`` allows it, else None (also for a URL
    :func:`llm_endpoint` refuses)."""
    try:
        endpoint = llm_endpoint(url)
    except ValueError:
        return None
    for entry in options.allow_llm:
        rule, prefix = llm_allow_rule(entry)
        if (endpoint.startswith(rule) if prefix else endpoint == rule):
            return endpoint
    return None


@dataclass(frozen=True)
class ServedModel:
    """What clients are told about the served model (``ready``, ``/config.json``).

    ``latency``: the algorithmic latency in samples of each session kind; ``step_samples`` of audio
    (``step_frames`` coarse frames) is the unit the engines compute in. ``devices``: the devices of the engine
    sets, in placement order (``cpu`` may repeat).
    """

    name: str
    config: SNACConfig
    step_frames: int
    step_samples: int
    latency: Dict[str, int]
    devices: Tuple[str, ...]
    random_weights: bool = False
