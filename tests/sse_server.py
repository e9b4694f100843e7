"""A local stand-in for an OpenAI-compatible LLM server: ``POST /v1/completions`` streamed as vLLM streams it.

Each response follows a :class:`Script`: the text pieces to send (as ``data: {json}`` server-sent events in
vLLM's ``text_completion`` chunk format, the last with a ``finish_reason``, then ``data: [DONE]``), pauses
between them, and failures to inject (an HTTP error status at the start, the connection dropped after some
pieces, malformed JSON, an error event). The server records the request bodies and whether the client went
away before the end (``disconnected``), for tests of interruption.

Runs inside the test's event loop::

    async with SSEServer(Script(pieces)) as server:
        ... server.url ...
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from aiohttp import web


@dataclass
class Script:
    pieces: List[str]
    pause_s: float = 0.0  # between pieces
    first_pause_s: float = 0.0  # before the first piece (time to first token)
    status: int = 200  # != 200: answer with this status and error_body at once
    error_body: str = '{"object": "error", "message": "internal failure", "code": 500}'
    drop_after: Optional[int] = None  # abort the connection after this many pieces
    malformed_at: Optional[int] = None  # send broken JSON instead of piece i
    error_event_at: Optional[int] = None  # send an {"error": ...} event instead of piece i
    finish_reason: str = "stop"
    send_done: bool = True
    token_ids: Optional[List[List[int]]] = None  # per piece, sent as "token_ids" when the request asks
    usage_chunk: bool = True  # a final chunk with empty choices and usage, as vLLM's include_usage sends


@dataclass
class Record:
    body: Dict[str, Any]
    headers: Dict[str, str] = field(default_factory=dict)
    sent: int = 0  # pieces sent
    disconnected: bool = False  # the client closed the connection before the end
    completed: bool = False
    started_at: float = field(default_factory=time.monotonic)


class SSEServer:
    def __init__(self, script: Script, host: str = "127.0.0.1") -> None:
        self.script = script
        self.host = host
        self.records: List[Record] = []
        self.disconnected = asyncio.Event()
        self._runner: Optional[web.AppRunner] = None
        self.url = ""

    async def __aenter__(self) -> "SSEServer":
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{self.host}:{port}"
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @staticmethod
    def chunk(text: str, index: int, finish: Optional[str] = None, model: str = "test",
              token_ids: Optional[List[int]] = None) -> bytes:
        choice: Dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                                  "stop_reason": None}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        event = {"id": "cmpl-test", "object": "text_completion", "created": 1700000000 + index, "model": model,
                 "choices": [choice]}
        return f"data: {json.dumps(event)}\n\n".encode()

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        record = Record(body, dict(request.headers))
        self.records.append(record)
        script = self.script
        if script.status != 200:
            return web.Response(status=script.status, text=script.error_body, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        model = body.get("model", "test")
        want_ids = bool(body.get("return_token_ids"))
        try:
            if script.first_pause_s:
                await asyncio.sleep(script.first_pause_s)
            n = len(script.pieces)
            for i, text in enumerate(script.pieces):
                if i and script.pause_s:
                    await asyncio.sleep(script.pause_s)
                if script.drop_after is not None and i == script.drop_after:
                    assert request.transport is not None
                    request.transport.abort()  # no terminating chunk: the client sees a broken body
                    return response
                if script.malformed_at == i:
                    data = b'data: {"id": "cmpl-test", "choices": [{"text": "<custom_tok\n\n'
                elif script.error_event_at == i:
                    data = b'data: {"error": {"message": "out of KV cache", "code": 500}}\n\n'
                else:
                    ids = script.token_ids[i] if want_ids and script.token_ids is not None else None
                    data = self.chunk(text, i, script.finish_reason if i == n - 1 else None, model, ids)
                await response.write(data)
                record.sent = i + 1
            if script.usage_chunk:
                usage = {"id": "cmpl-test", "object": "text_completion", "created": 1700000000, "model": model,
                         "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": n + 10}}
                await response.write(f"data: {json.dumps(usage)}\n\n".encode())
            if script.send_done:
                await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            record.completed = True
        except asyncio.CancelledError:
            record.disconnected = True
            self.disconnected.set()
            raise
        except ConnectionError:  # the client went away: writing to its closed connection failed
            record.disconnected = True
            self.disconnected.set()
        return response


def tiny_model():
    """The small random-weight 24 kHz-structure model the LLM tests decode with."""
    import dataclasses

    import torch

    from snac_stream import PRESETS, SNAC

    torch.manual_seed(0)
    return SNAC.from_config(dataclasses.replace(PRESETS["24khz"], encoder_dim=16, decoder_dim=64)).eval()


def signal_codes(model):
    """Codes of 0.5 s of a two-tone test signal: 6 coarse frames, 42 Orpheus tokens."""
    import torch

    t = torch.arange(12000) / 24000
    audio = (0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.1 * torch.sin(2 * torch.pi * 1300 * t)).view(1, 1, -1)
    with torch.inference_mode():
        return model.encode(audio)
