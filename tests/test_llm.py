"""snac_stream.llm against a local server streaming vLLM's server-sent events."""

from __future__ import annotations

import asyncio
import json
import socket

import numpy as np
import pytest
import torch

import aiohttp  # noqa: E402,F401  (test extra: a missing install fails, never skips)

from helpers import settled_outcomes, settled_sessions  # noqa: E402
from sse_server import Script, SSEServer, signal_codes, tiny_model  # noqa: E402

from snac_stream.tokens import AudioTokenText  # noqa: E402
from snac_stream.llm import (  # noqa: E402
    PROMPT_FORMATS,
    LLMConnectionError,
    LLMHTTPError,
    LLMProtocolError,
    LLMServerError,
    LLMTokenError,
    LLMTruncatedError,
    SamplingParams,
    completions_url,
    get_prompt_format,
    speak,
    stream_speech,
)
from snac_stream.tokens import ORPHEUS_LLM_TOKEN_OFFSET, OrpheusLayout, format_custom_tokens  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def codes(model):
    return signal_codes(model)


def token_ids(codes):
    return OrpheusLayout().to_flat(codes)[0].tolist()


def split(text: str, seed: int, most: int = 23):
    """Pieces of 1..most characters: most cut a <custom_token_N> in the middle."""
    rng = np.random.default_rng(seed)
    pieces, pos = [], 0
    while pos < len(text):
        n = int(rng.integers(1, most + 1))
        pieces.append(text[pos:pos + n])
        pos += n
    return pieces


def offline(model, codes, frames=None):
    if frames is not None:
        codes = [c[:, : frames * r] for c, r in zip(codes, (1, 2, 4))]
    with torch.inference_mode():
        return model.decode(codes)[0, 0].numpy()


async def collect(server_url, model, **kwargs):
    chunks, error = [], None
    try:
        async for chunk in stream_speech(server_url, "orpheus-test", "Hello there.", model, **kwargs):
            chunks.append(chunk)
    except Exception as exc:  # noqa: BLE001 - the tests check the type
        error = exc
    audio = np.concatenate([c.audio for c in chunks]) if chunks else np.zeros(0, np.float32)
    return audio, chunks, error


def run(coro):
    return asyncio.run(coro)


# ---- the happy path ----------------------------------------------------------------------------------------
def test_streamed_audio_equals_offline_decode(model, codes):
    ids = token_ids(codes)
    text = "<custom_token_1>" + format_custom_tokens(ids) + "<custom_token_2><|eot_id|>"
    pieces = split(text, seed=1)
    assert any("<custom_tok" in p and ">" not in p.split("<custom_tok")[-1] for p in pieces)  # tokens are cut

    async def scenario():
        async with SSEServer(Script(pieces, pause_s=0.002, first_pause_s=0.05)) as server:
            params = SamplingParams(temperature=0.5, top_p=0.9, max_tokens=500, repetition_penalty=1.1,
                                    stop=["<custom_token_2>"])
            audio, chunks, error = await collect(server.url, model, voice="leo", params=params)
            return audio, chunks, error, server.records

    audio, chunks, error, records = run(scenario())
    assert error is None
    expected = offline(model, codes)
    assert audio.shape == expected.shape and np.abs(audio - expected).max() <= 1e-5
    stats = chunks[-1].stats
    assert stats.tokens == len(ids) and stats.frames == len(ids) // 7 and stats.samples == expected.shape[0]
    assert 0.05 <= stats.first_token_s <= stats.first_audio_token_s <= stats.first_audio_s <= stats.finished_s
    assert stats.finish_reason == "stop" and stats.skipped >= 2 and "<|eot_id|>" in stats.other_text
    assert chunks[-1].final and [c.start for c in chunks] == list(np.cumsum([0] + [len(c.audio) for c in chunks])[:-1])
    assert len(chunks) > 2  # audio came frame by frame, not at the end
    body = records[0].body
    assert body["stream"] is True and body["model"] == "orpheus-test"
    assert body["prompt"] == ("<custom_token_3><|begin_of_text|>leo: Hello there.<|eot_id|>"
                              "<custom_token_4><custom_token_5><custom_token_1>")
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["repetition_penalty"], body["stop"]) == \
        (0.5, 0.9, 500, 1.1, ["<custom_token_2>"])


def test_token_ids_from_the_server(model, codes):
    ids = token_ids(codes)
    raw = [ORPHEUS_LLM_TOKEN_OFFSET + i for i in ids] + [128258]  # + end of speech
    groups = [raw[k:k + 5] for k in range(0, len(raw), 5)]
    pieces = ["x" * len(g) for g in groups]  # text that would not parse: ids must be used

    async def scenario():
        async with SSEServer(Script(pieces, token_ids=groups)) as server:
            return await collect(server.url, model, use_token_ids=True), server.records[0].body

    (audio, chunks, error), body = run(scenario())
    assert error is None and body["return_token_ids"] is True
    assert np.abs(audio - offline(model, codes)).max() <= 1e-5
    assert chunks[-1].stats.skipped == 1


def test_sync_entry_hands_audio_to_a_sink(model, codes):
    text = format_custom_tokens(token_ids(codes))
    received, firsts = [], []

    async def serve_and_speak():
        async with SSEServer(Script(split(text, seed=2))) as server:
            # speak() runs its own event loop: call it from a worker thread while this loop serves.
            return await asyncio.to_thread(speak, server.url, "m", "Hi.", model, received.append,
                                           on_first_audio=firsts.append, voice="tara")

    stats = run(serve_and_speak())
    assert np.abs(np.concatenate(received) - offline(model, codes)).max() <= 1e-5
    assert firsts == [stats] and stats.first_token_s <= stats.first_audio_s
    assert "first token" in stats.summary()


# ---- errors ------------------------------------------------------------------------------------------------
def test_unreachable_endpoint(model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    audio, chunks, error = run(collect(f"http://127.0.0.1:{port}", model, connect_timeout=2.0))
    assert isinstance(error, LLMConnectionError) and "cannot connect" in str(error) and not chunks


def test_http_error_at_start(model):
    async def scenario():
        async with SSEServer(Script([], status=500, error_body='{"message": "model overloaded"}')) as server:
            return await collect(server.url + "/v1", model)

    audio, chunks, error = run(scenario())
    assert isinstance(error, LLMHTTPError) and error.status == 500 and "model overloaded" in str(error)
    assert not chunks


@pytest.mark.parametrize("failure", ["drop", "malformed", "error_event"])
def test_mid_stream_failure_keeps_the_audio_of_whole_frames(model, codes, failure):
    ids = token_ids(codes)
    pieces = [format_custom_tokens([i]).strip() for i in ids]  # one token per event
    cut = 7 * 3 + 4  # 3 whole frames and 4 tokens of the next
    # The pause lets the client read each piece before the next (a token still in flight when the connection
    # breaks is lost: aiohttp drops what it buffered once the connection fails).
    script = Script(pieces, pause_s=0.01, **{"drop": {"drop_after": cut}, "malformed": {"malformed_at": cut},
                                              "error_event": {"error_event_at": cut}}[failure])

    async def scenario():
        async with SSEServer(script) as server:
            return await collect(server.url, model)

    audio, chunks, error = run(scenario())
    expected_type = {"drop": LLMConnectionError, "malformed": LLMProtocolError, "error_event": LLMServerError}
    assert isinstance(error, expected_type[failure]), error
    assert chunks and chunks[-1].final
    expected = offline(model, codes, frames=3)
    assert audio.shape == expected.shape and np.abs(audio - expected).max() <= 1e-5


def test_stream_ending_inside_a_frame(model, codes):
    ids = token_ids(codes)[:7 * 4 + 3]
    pieces = split(format_custom_tokens(ids), seed=3)

    async def scenario(**kwargs):
        async with SSEServer(Script(pieces, finish_reason="length")) as server:
            return await collect(server.url, model, **kwargs)

    audio, chunks, error = run(scenario())
    assert isinstance(error, LLMTruncatedError) and error.tokens_left == 3 and "'length'" in str(error)
    assert np.abs(audio - offline(model, codes, frames=4)).max() <= 1e-5
    audio, chunks, error = run(scenario(on_partial_frame="drop"))
    assert error is None and chunks[-1].stats.dropped_tokens == 3
    assert np.abs(audio - offline(model, codes, frames=4)).max() <= 1e-5


def test_token_out_of_range_for_its_position(model, codes):
    ids = token_ids(codes)
    ids[7 * 2 + 1] = ids[7 * 2 + 2]  # frame 2: position 1 gets an id of position 2's range
    pieces = split(format_custom_tokens(ids), seed=4)

    async def scenario():
        async with SSEServer(Script(pieces)) as server:
            return await collect(server.url, model)

    audio, chunks, error = run(scenario())
    assert isinstance(error, LLMTokenError) and "frame position 1" in str(error)
    assert np.abs(audio - offline(model, codes, frames=2)).max() <= 1e-5


def test_missing_done_and_finish_reason_is_a_dropped_connection(model, codes):
    pieces = split(format_custom_tokens(token_ids(codes)), seed=5)

    async def scenario(finish):
        script = Script(pieces, send_done=False, usage_chunk=False, finish_reason=finish)
        async with SSEServer(script) as server:
            return await collect(server.url, model)

    assert run(scenario("stop"))[2] is None  # a finish reason without [DONE] is accepted
    assert isinstance(run(scenario(None))[2], LLMConnectionError)


def test_closing_the_stream_early_closes_the_connection(model, codes):
    pieces = [format_custom_tokens([i]).strip() for i in token_ids(codes)]

    async def scenario():
        async with SSEServer(Script(pieces, pause_s=0.02)) as server:
            stream = stream_speech(server.url, "m", "Hi.", model)
            first = await stream.__anext__()
            await stream.aclose()
            await asyncio.wait_for(server.disconnected.wait(), 2.0)
            return first, server.records[0]

    first, record = run(scenario())
    assert first.audio.shape[0] > 0 and record.disconnected and not record.completed
    assert record.sent < len(pieces)


# ---- pieces ------------------------------------------------------------------------------------------------
def test_token_text_any_split():
    text = "<custom_token_3>a <custom_token_10><custom_token_4106>\n<custom_token_2><|eot_id|><custom_token_28682>"
    expected = [0, 4096, 28672]
    for cut in range(len(text) + 1):
        parser = AudioTokenText()
        ids = parser.feed(text[:cut]) + parser.feed(text[cut:]) + parser.feed("", final=True)
        assert ids == expected, cut
    parser = AudioTokenText()
    assert parser.feed(text) == expected and parser.skipped == 4 and parser.other_text == "a <|eot_id|>"


def test_prompt_formats_and_urls():
    assert PROMPT_FORMATS["orpheus-gguf"].format("Hi.", "zoe") == "<|audio|>zoe: Hi.<|eot_id|>"
    assert PROMPT_FORMATS["orpheus"].format("Hi.").startswith("<custom_token_3><|begin_of_text|>tara: Hi.")
    assert get_prompt_format("[{voice}] {text}").format("Hi.", "x") == "[x] Hi."
    with pytest.raises(ValueError, match="unknown voice 'bob'"):
        PROMPT_FORMATS["orpheus"].format("Hi.", "bob")
    with pytest.raises(ValueError, match="unknown prompt format"):
        get_prompt_format("chatml")
    with pytest.raises(ValueError, match="empty"):
        PROMPT_FORMATS["raw"].format("  ")
    assert completions_url("http://h:8000") == "http://h:8000/v1/completions"
    assert completions_url("http://h:8000/v1/") == "http://h:8000/v1/completions"
    assert completions_url("https://h/v1/completions") == "https://h/v1/completions"
    with pytest.raises(ValueError, match="http"):
        completions_url("h:8000")


# ---- decoding on a snac-stream server ----------------------------------------------------------------------
def test_decoding_on_a_snac_stream_server(model, codes):
    from snac_stream.server import ServerOptions, SNACServer

    ids = token_ids(codes)
    whole = split(format_custom_tokens(ids), seed=6)
    cut = split(format_custom_tokens(ids[:7 * 3 + 2]), seed=7)  # ends inside a frame

    async def scenario():
        results = []
        async with SNACServer(model, ServerOptions(port=0, threads=1, web=False, max_sessions=1)) as snac:
            for pieces in (whole, cut):
                assert await settled_sessions(snac) == 0  # the one slot is free again
                async with SSEServer(Script(pieces)) as llm:
                    results.append(await collect(llm.url, None, decoder_url=f"ws://127.0.0.1:{snac.port}"))
        return results

    (audio, chunks, error), (cut_audio, _, cut_error) = run(scenario())
    assert error is None
    expected = offline(model, codes)
    assert audio.shape == expected.shape and np.abs(audio - expected).max() <= 1e-5
    assert chunks[-1].stats.frames == len(ids) // 7 and chunks[-1].stats.rate == 24000
    # The whole frames are decoded by the server, then the error.
    assert isinstance(cut_error, LLMTruncatedError)
    assert np.abs(cut_audio - offline(model, codes, frames=3)).max() <= 1e-5


# ---- llm sessions: the server streams the completion itself (hello.llm, serve --allow-llm) --------------------
KEY = "sk-test-key-0123456789"


def llm_session(model, script, test, allow=None, **options):
    """Run ``test(snac, llm)``: a local LLM serving ``script`` behind a real SNACServer whose allow-list is
    ``allow(llm.url)`` (default: that URL)."""
    from snac_stream.server import ServerOptions, SNACServer

    async def scenario():
        async with SSEServer(script) as llm:
            allowed = [llm.url] if allow is None else allow(llm.url)
            opts = ServerOptions(port=0, threads=1, web=False, max_sessions=2, allow_llm=allowed, **options)
            async with SNACServer(model, opts) as snac:
                return await asyncio.wait_for(test(snac, llm), 120)

    return run(scenario())


async def speech(snac, llm_fields, **hello):
    """(audio frames, stats, the ServerError or None) of one llm session through snac_stream.client."""
    from snac_stream.client import LLMSessionStats, ServerError, llm_speech

    stats, frames, error = LLMSessionStats(), [], None
    try:
        async for frame in llm_speech(f"ws://127.0.0.1:{snac.port}", llm_fields, stats=stats, **hello):
            frames.append(frame)
    except ServerError as exc:
        error = exc
    return frames, stats, error


def samples(frames):
    return np.concatenate([f.data for f in frames]) if frames else np.zeros(0, np.float32)


def test_llm_session_audio_equals_offline_decode(model, codes, caplog):
    ids = token_ids(codes)
    text = "<custom_token_1>" + format_custom_tokens(ids) + "<custom_token_2><|eot_id|>"
    pieces = split(text, seed=11)
    fields = {"model": "orpheus-test", "prompt": "Hello there.", "voice": "leo", "temperature": 0.4, "top_p": 0.9,
              "max_tokens": 321, "api_key": KEY}

    async def test(snac, llm):
        from websockets.asyncio.client import connect

        # The whole conversation, raw, to see that the key is in none of the server's messages.
        async with connect(f"ws://127.0.0.1:{snac.port}") as ws:
            await ws.send(json.dumps({"type": "hello", "kind": "decode", "sample_format": "float32",
                                      "llm": {"url": llm.url + "/v1", **fields}}))
            raw = [m async for m in ws]
        through_client = await speech(snac, {"url": llm.url, **fields, "api_key": None})
        return raw, through_client, llm.records, llm.url

    with caplog.at_level("DEBUG"):
        raw, (frames, stats, error), records, url = llm_session(
            model, Script(pieces, pause_s=0.002, first_pause_s=0.05), test)
    assert error is None
    expected = offline(model, codes)
    audio = samples(frames)
    assert audio.shape == expected.shape and np.abs(audio - expected).max() <= 1e-5
    assert len(frames) > 2 and frames[-1].final and not frames[0].final  # frame by frame, then the tail
    # The raw session: ready (Orpheus layout by default, the endpoint, not the key), llm messages, audio, done.
    from snac_stream.protocol import OutputFrame

    ready = json.loads(raw[0])
    assert ready["type"] == "ready" and ready["token_layout"]["name"] == "orpheus"
    assert ready["llm"] == {"endpoint": url + "/v1/completions", "model": "orpheus-test", "prompt_format": "orpheus"}
    texts = [json.loads(m) for m in raw if isinstance(m, str)]
    assert [m["type"] for m in texts] == ["ready", "llm", "llm", "done"]
    assert texts[1]["event"] == "first_tokens" and texts[2]["event"] == "end" and texts[2]["tokens"] == len(ids)
    assert 50 <= texts[1]["first_token_ms"] <= texts[1]["first_audio_token_ms"]
    assert texts[3]["input_items"] == len(ids) and texts[3]["output_samples"] == expected.shape[0]
    raw_audio = np.concatenate([OutputFrame.unpack(m, "float32").data for m in raw if isinstance(m, bytes)])
    assert np.abs(raw_audio - expected).max() <= 1e-5
    # The request the LLM got: the hello's fields, the key as its bearer header -- and nowhere else.
    body = records[0].body
    assert body["model"] == "orpheus-test" and body["stream"] is True
    assert body["prompt"] == ("<custom_token_3><|begin_of_text|>leo: Hello there.<|eot_id|>"
                              "<custom_token_4><custom_token_5><custom_token_1>")
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.4, 0.9, 321)
    assert records[0].headers["Authorization"] == f"Bearer {KEY}" and "Authorization" not in records[1].headers
    assert not any(KEY in (m if isinstance(m, str) else m.decode("latin-1")) for m in raw)
    assert KEY not in caplog.text
    # Through the client: its stats.
    assert stats.tokens == len(ids) and stats.samples == expected.shape[0] and stats.finish_reason == "stop"
    assert 0.05 <= stats.first_token_s <= stats.first_audio_token_s and stats.first_audio_s <= stats.finished_s


def test_llm_session_refused_unless_its_url_is_allowed(model, codes):
    from websockets.asyncio.client import connect

    from snac_stream.server import web

    ids = token_ids(codes)
    script = Script([format_custom_tokens(ids)])

    async def refused(snac, llm_fields):
        frames, _, error = await speech(snac, llm_fields)
        assert not frames and error is not None
        return error

    async def test(snac, llm):
        errors = [await refused(snac, {"url": url, "model": "m", "prompt": "Hi.", "api_key": KEY})
                  for url in ("http://127.0.0.1:9", llm.url.replace("127.0.0.1", "localhost"), llm.url + "/x/v1",
                              llm.url + "/v1/../v1", "http://user:pw@" + llm.url[7:])]
        # A bad voice is the hello's fault; llm in an encode session too.
        errors.append(await refused(snac, {"url": llm.url, "model": "m", "prompt": "Hi.", "voice": "bob"}))
        async with connect(f"ws://127.0.0.1:{snac.port}") as ws:
            await ws.send(json.dumps({"type": "hello", "kind": "encode", "llm": {"url": llm.url, "model": "m",
                                                                                   "prompt": "Hi."}}))
            encode_error = json.loads(await ws.recv())
        # The server goes on: an allowed session is exact, and no refusal reached the LLM.
        frames, _, error = await speech(snac, {"url": llm.url, "model": "m", "prompt": "Hi."})
        config = web.config(snac.served, snac.options, None)
        return errors, encode_error, error, samples(frames), len(llm.records), dict(snac.stats["refusals"]), config

    errors, encode_error, error, audio, requests, refusals, config = llm_session(model, script, test)
    assert config["llm_sessions"] is True and not any("127.0.0.1" in str(v) for v in config.values())
    assert [e.code for e in errors] == ["llm_not_allowed"] * 5 + ["bad_hello"]
    assert all(e.close_code == 1008 for e in errors) and "allow-list" in errors[0].message
    assert not any(KEY in e.message for e in errors) and "unknown voice 'bob'" in errors[-1].message
    assert "pw" not in errors[4].message and "credentials" in errors[4].message
    assert encode_error["code"] == "bad_hello" and "decode sessions only" in encode_error["message"]
    assert error is None and np.abs(audio - offline(model, codes)).max() <= 1e-5 and requests == 1
    assert refusals["llm_not_allowed"] == 5

    # Off unless the server is started with an allow-list.
    async def off(snac, llm):
        error = (await speech(snac, {"url": llm.url, "model": "m", "prompt": "Hi."}))[2]
        return error, web.config(snac.served, snac.options, None)["llm_sessions"]

    error, llm_sessions = llm_session(model, script, off, allow=lambda url: [])
    assert error.code == "llm_not_allowed" and "without --allow-llm" in error.message and llm_sessions is False
    # A prefix rule: every endpoint under it; the server's own key when the hello gives none.
    async def prefixed(snac, llm):
        return await speech(snac, {"url": llm.url + "/v1", "model": "m", "prompt": "Hi."}), llm.records[0].headers

    (frames, _, error), headers = llm_session(model, script, prefixed, allow=lambda url: [url + "/*"],
                                              llm_api_key="sk-server-key")
    assert error is None and samples(frames).shape == offline(model, codes).shape
    assert headers["Authorization"] == "Bearer sk-server-key"


@pytest.mark.parametrize("failure", ["drop", "error_event", "truncated", "bad_token"])
def test_llm_session_failure_mid_stream_comes_after_the_audio_of_whole_frames(model, codes, failure):
    ids = token_ids(codes)
    pieces = [format_custom_tokens(ids[i:i + 7]) for i in range(0, 42, 7)]  # one frame a piece
    script, reason = {
        "drop": (Script(pieces, pause_s=0.01, drop_after=3), "connection"),
        "error_event": (Script(pieces, error_event_at=3), "server"),
        "truncated": (Script(pieces[:3] + [format_custom_tokens(ids[21:25])]), "truncated"),
        "bad_token": (Script(pieces[:3] + ["<custom_token_5000>" + pieces[3]]), "tokens"),  # 4990 at position 0
    }[failure]

    async def test(snac, llm):
        result = await speech(snac, {"url": llm.url, "model": "m", "prompt": "Hi."})
        after = await speech(snac, {"url": llm.url, "model": "m", "prompt": "Hi."})  # the server goes on
        return result, after, await settled_outcomes(snac, 2)

    (frames, stats, error), (_, _, again), outcomes = llm_session(model, script, test)
    assert error is not None and error.code == "llm_error" and error.close_code == 1014
    assert error.fields["reason"] == reason, error
    # The 3 whole frames' audio, their tail included (flagged FINAL), exactly as offline decode of them.
    assert frames and frames[-1].final
    assert np.abs(samples(frames) - offline(model, codes, frames=3)).max() <= 1e-5
    assert stats.llm["event"] == "end" and again is not None and again.code == "llm_error"
    assert outcomes[("decode", "llm_error")] == 2


def test_llm_session_errors_before_any_audio(model, codes):
    async def test(snac, llm):
        return await speech(snac, {"url": llm.url, "model": "m", "prompt": "Hi."})

    frames, _, error = llm_session(model, Script([], status=503, error_body='{"message": "overloaded"}'), test)
    assert not frames and error.code == "llm_error" and error.fields == {"reason": "http", "status": 503}
    assert "HTTP 503" in error.message and "overloaded" in error.message
    # Unreachable (an allowed port nobody listens on).
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{port.getsockname()[1]}"
    port.close()
    frames, _, error = llm_session(
        model, Script([]), lambda snac, llm: speech(snac, {"url": dead, "model": "m", "prompt": "Hi."}),
        allow=lambda url: [dead])
    assert not frames and error.code == "llm_error" and error.fields["reason"] == "connection"
    assert "cannot connect" in error.message
    # A completion without audio tokens: the model is not speaking SNAC.
    frames, _, error = llm_session(model, Script(["I am a chat model."]), test)
    assert not frames and error.fields["reason"] == "tokens" and "no audio tokens" in error.message


def test_closing_an_llm_session_early_closes_the_llm_stream(model, codes):
    from snac_stream.client import llm_speech

    pieces = [format_custom_tokens(token_ids(codes)[i:i + 7]) for i in range(0, 42, 7)] * 20

    async def test(snac, llm):
        async for frame in llm_speech(f"ws://127.0.0.1:{snac.port}", {"url": llm.url, "model": "m", "prompt": "Hi."}):
            break  # the listener leaves after the first audio
        await asyncio.wait_for(llm.disconnected.wait(), 10)
        await snac.wait_sessions(0)
        return llm.records[0]

    record = llm_session(model, Script(pieces, pause_s=0.05), test)
    assert record.disconnected and not record.completed and record.sent < len(pieces)
