"""snac_stream.llm against a local server streaming vLLM's server-sent events."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest
import torch

import aiohttp  # noqa: E402,F401  (test extra: a missing install fails, never skips)

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
