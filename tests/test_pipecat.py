"""snac_stream.integrations.pipecat in a real Pipecat pipeline, the local SSE server standing in for the LLM."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import soxr
import torch

import aiohttp  # noqa: E402,F401  (test extra: a missing install fails, never skips)
import pipecat  # noqa: E402,F401

from pipecat.frames.frames import (  # noqa: E402
    EndFrame,
    Frame,
    InterruptionFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData  # noqa: E402
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402
from sse_server import Script, SSEServer, signal_codes, tiny_model  # noqa: E402

from snac_stream.integrations.pipecat import SNACOrpheusTTSService  # noqa: E402
from snac_stream.tokens import OrpheusLayout, format_custom_tokens  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def codes(model):
    return signal_codes(model)


@pytest.fixture(scope="module")
def offline(model, codes):
    with torch.inference_mode():
        return model.decode(codes)[0, 0].numpy()


def pieces(codes, per_piece: int = 1):
    ids = OrpheusLayout().to_flat(codes)[0].tolist()
    text = format_custom_tokens(ids, per_line=10 ** 6).strip()
    size = len("<custom_token_12345>") * per_piece
    return [text[k:k + size - 3] for k in range(0, len(text), size - 3)]  # cuts tokens in the middle


class Collector(FrameProcessor):
    """Records the frames reaching the end of the pipeline; optionally interrupts at the first audio frame."""

    def __init__(self, on_first_audio=None):
        super().__init__()
        self.frames = []
        self.on_first_audio = on_first_audio

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        self.frames.append(frame)
        if isinstance(frame, TTSAudioRawFrame) and self.on_first_audio is not None:
            callback, self.on_first_audio = self.on_first_audio, None
            await callback()
        await self.push_frame(frame, direction)


def pcm(frames):
    audio = [f for f in frames if isinstance(f, TTSAudioRawFrame)]
    return np.frombuffer(b"".join(f.audio for f in audio), "<i2").astype(np.float32) / 32768


async def start_pipeline(tts, collector, params):
    """A running pipeline ``tts -> collector``: (worker, runner task), once its StartFrame went through."""
    worker = PipelineWorker(Pipeline([tts, collector]), params=params, cancel_on_idle_timeout=False)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def on_started(worker, frame):
        started.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    await asyncio.wait_for(started.wait(), 5.0)
    return worker, running


@pytest.mark.parametrize("out_rate", [24000, 16000])
def test_pipeline_audio_equals_offline_decode(model, codes, offline, out_rate):
    async def scenario():
        async with SSEServer(Script(pieces(codes), pause_s=0.002)) as server:
            tts = SNACOrpheusTTSService(base_url=server.url, llm_model="orpheus-test", snac_model=model,
                                        voice="tara")
            collector = Collector()
            params = PipelineParams(audio_out_sample_rate=out_rate, enable_metrics=True)
            worker, running = await start_pipeline(tts, collector, params)
            await worker.queue_frames([TTSSpeakFrame("Hello there."), EndFrame()])
            await asyncio.wait_for(running, 20.0)
            return tts, collector.frames, server.records

    tts, frames, records = asyncio.run(scenario())
    audio_frames = [f for f in frames if isinstance(f, TTSAudioRawFrame)]
    assert len(audio_frames) > 2 and all(f.sample_rate == out_rate and f.num_channels == 1 for f in audio_frames)
    kinds = [type(f) for f in frames if isinstance(f, (TTSStartedFrame, TTSAudioRawFrame, TTSStoppedFrame))]
    assert kinds[0] is TTSStartedFrame and kinds[-1] is TTSStoppedFrame and kinds.count(TTSStoppedFrame) == 1
    expected = offline if out_rate == 24000 else soxr.resample(offline, 24000, out_rate, quality="HQ")
    got = pcm(frames)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1.5 / 32768  # 16-bit rounding of audio equal within 1e-5
    assert "tara: Hello there." in records[0].body["prompt"]
    ttfb = [d for f in frames if isinstance(f, MetricsFrame) for d in f.data
            if isinstance(d, TTFBMetricsData) and d.value > 0]  # (the pipeline starts with zeros)
    assert len(ttfb) == 1 and ttfb[0].processor == tts.name and ttfb[0].model == "orpheus-test"
    assert ttfb[0].value < 10
    stats = tts.last_stats
    assert stats.first_token_s <= stats.first_audio_s and stats.frames == len(codes[0][0])


def test_interruption_stops_audio_and_closes_the_llm_stream(model, codes):
    async def scenario():
        async with SSEServer(Script(pieces(codes), pause_s=0.03)) as server:
            tts = SNACOrpheusTTSService(base_url=server.url, llm_model="orpheus-test", snac_model=model,
                                        voice="tara")
            holder = {}

            async def interrupt():
                holder["at"] = len(collector.frames)
                await holder["worker"].queue_frame(InterruptionFrame())

            collector = Collector(on_first_audio=interrupt)
            worker, running = await start_pipeline(tts, collector, PipelineParams(audio_out_sample_rate=24000))
            holder["worker"] = worker
            await worker.queue_frame(TTSSpeakFrame("Hello there, this is a long answer."))
            await asyncio.wait_for(server.disconnected.wait(), 5.0)
            await asyncio.sleep(0.3)  # time for any further audio to show up
            await worker.queue_frame(EndFrame())
            await asyncio.wait_for(running, 10.0)
            return collector.frames, server.records[0], holder["at"]

    frames, record, at = asyncio.run(scenario())
    assert record.disconnected and not record.completed and record.sent < len(pieces(codes))
    positions = [i for i, f in enumerate(frames) if isinstance(f, InterruptionFrame)]
    assert positions, "the interruption reached the end of the pipeline"
    after = [f for f in frames[positions[0]:] if isinstance(f, TTSAudioRawFrame)]
    assert not after, f"{len(after)} audio frames after the interruption"


def test_decoding_on_a_snac_stream_server(model, codes, offline):
    from snac_stream.server import ServerOptions, SNACServer

    async def scenario():
        async with SSEServer(Script(pieces(codes))) as server, \
                SNACServer(model, ServerOptions(port=0, threads=1, web=False, max_sessions=1)) as snac:
            tts = SNACOrpheusTTSService(base_url=server.url, llm_model="orpheus-test",
                                        decoder_url=f"ws://127.0.0.1:{snac.port}")
            collector = Collector()
            worker, running = await start_pipeline(tts, collector, PipelineParams(audio_out_sample_rate=24000))
            await worker.queue_frames([TTSSpeakFrame("Hello there."), EndFrame()])
            await asyncio.wait_for(running, 30.0)
            return collector.frames

    got = pcm(asyncio.run(scenario()))
    assert got.shape == offline.shape and np.abs(got - offline).max() <= 1.5 / 32768
    with pytest.raises(ValueError, match="snac_model .* or decoder_url"):
        SNACOrpheusTTSService(base_url="http://127.0.0.1:1", llm_model="m")
