"""A Pipecat text-to-speech service: an OpenAI-compatible TTS LLM (Orpheus) + the exact streaming SNAC decoder.

Text from the pipeline goes to the LLM server (vLLM, SGLang, llama.cpp) as an Orpheus prompt; its streamed
``<custom_token_N>`` tokens are decoded in this process as each coarse frame completes
(:func:`snac_stream.llm.stream_speech`), and the audio leaves as ``TTSAudioRawFrame`` (16-bit PCM at the
pipeline's output rate: the model's rate unchanged, or resampled by soxr's streaming resampler, see
:mod:`snac_stream.formats`).

Barge-in: an ``InterruptionFrame`` cancels the synthesis in progress (Pipecat cancels the task running
``run_tts``), which closes the HTTP stream at once, so the LLM server stops generating; the service also
closes any stream still open when it sees the interruption. Time to first byte (Pipecat's TTFB metric) runs
from the start of the utterance's audio context to its first audio frame.

Needs ``pipecat-ai`` (``pip install 'snac-stream[pipecat]'``)::

    from snac_stream import SNAC
    from snac_stream.integrations.pipecat import SNACOrpheusTTSService

    tts = SNACOrpheusTTSService(base_url="http://127.0.0.1:8000", llm_model="canopylabs/orpheus-3b-0.1-ft",
                                snac_model=SNAC.from_pretrained("24khz"), voice="tara")
    pipeline = Pipeline([transport.input(), stt, llm, tts, transport.output()])
"""

from __future__ import annotations

from typing import Any, AsyncGenerator, Optional, Set, Union

try:
    from pipecat.frames.frames import Frame, InterruptionFrame, TTSAudioRawFrame
    from pipecat.processors.frame_processor import FrameDirection
    from pipecat.services.settings import TTSSettings
    from pipecat.services.tts_service import TTSService
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("snac_stream.integrations.pipecat needs Pipecat: pip install 'snac-stream[pipecat]'") from exc

from ..formats import OutputEncoder
from ..llm import LLMStreamError, PromptFormat, SamplingParams, SpeechStats, get_prompt_format, stream_speech
from ..tokens import TokenLayout

__all__ = ["SNACOrpheusTTSService"]


class SNACOrpheusTTSService(TTSService):
    """Pipecat ``TTSService``: text -> OpenAI-compatible TTS LLM -> SNAC tokens -> audio frames.

    Args:
        base_url: the LLM server (``http://host:port``, ``.../v1`` or ``.../v1/completions``).
        llm_model: the model name the server serves (the request's ``model``).
        snac_model: a :class:`snac_stream.SNAC` (the 24 kHz model for Orpheus), in eval mode, decoding here.
        decoder_url: instead of ``snac_model``: decode on a ``snac-stream serve`` server (``ws://host:port``),
            one decode session per utterance.
        voice: the speaker (Orpheus: tara, leah, jess, leo, dan, mia, zac, zoe).
        prompt_format: a :data:`snac_stream.llm.PROMPT_FORMATS` name or a template with ``{text}``/``{voice}``.
        params: sampling parameters (default: Orpheus' own).
        layout, use_token_ids, lookahead_samples, on_partial_frame, api_key, read_timeout: as
            :func:`snac_stream.llm.stream_speech`; ``on_partial_frame`` defaults to ``"drop"`` here, since a
            reply cut by ``max_tokens`` should still play.
        aiohttp_session: a session to share (default: one per utterance).
        sample_rate: output rate (default: the pipeline's ``audio_out_sample_rate``).
        **kwargs: passed to ``TTSService``.

    ``last_stats`` holds the :class:`snac_stream.llm.SpeechStats` of the latest utterance (time to first token,
    time to first audio, tokens, frames).
    """

    def __init__(self, *, base_url: str, llm_model: str, snac_model: Any = None, voice: Optional[str] = "tara",
                 prompt_format: Union[str, PromptFormat] = "orpheus", params: Optional[SamplingParams] = None,
                 layout: Optional[TokenLayout] = None, use_token_ids: bool = False,
                 lookahead_samples: Optional[int] = None, on_partial_frame: str = "drop",
                 api_key: Optional[str] = None, read_timeout: float = 60.0, aiohttp_session: Any = None,
                 sample_rate: Optional[int] = None, decoder_url: Optional[str] = None, **kwargs: Any) -> None:
        if (snac_model is None) == (decoder_url is None):
            raise ValueError("pass snac_model (decode in this process) or decoder_url (a snac-stream server)")
        self._prompt_format = get_prompt_format(prompt_format)
        self._prompt_format.format("check", voice)  # an unknown voice fails here, not at the first reply
        super().__init__(sample_rate=sample_rate, push_start_frame=True, push_stop_frames=True,
                         settings=TTSSettings(model=llm_model, voice=voice, language=None), **kwargs)
        self._base_url = base_url
        self._llm_model = llm_model
        self._snac = snac_model
        self._voice = voice
        self._params = params
        self._layout = layout
        self._use_token_ids = use_token_ids
        self._lookahead = lookahead_samples
        self._on_partial_frame = on_partial_frame
        self._api_key = api_key
        self._read_timeout = read_timeout
        self._session = aiohttp_session
        self._decoder_url = decoder_url
        self._streams: Set[Any] = set()
        self.last_stats: Optional[SpeechStats] = None

    def can_generate_metrics(self) -> bool:
        return True

    @property
    def model_rate(self) -> int:
        return int(self._snac.sampling_rate) if self._snac is not None else 24000  # Orpheus: the 24 kHz model

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame, None]:
        """Stream ``text``'s speech: one ``TTSAudioRawFrame`` per decoded piece, as soon as it decodes."""
        # The base class opens the audio context (TTSStartedFrame) and starts the TTFB timer before this runs,
        # and pushes TTSStoppedFrame when the turn's audio is done.
        await self.start_tts_usage_metrics(text)
        encoder = OutputEncoder("pcm16", self.sample_rate, model_rate=self.model_rate)
        stats = SpeechStats(rate=self.model_rate)
        self.last_stats = stats
        stream = stream_speech(
            self._base_url, self._llm_model, text, self._snac, voice=self._voice,
            prompt_format=self._prompt_format, params=self._params, layout=self._layout,
            use_token_ids=self._use_token_ids, lookahead_samples=self._lookahead,
            on_partial_frame=self._on_partial_frame, api_key=self._api_key, session=self._session,
            read_timeout=self._read_timeout, stats=stats, decoder_url=self._decoder_url)
        self._streams.add(stream)
        first = True
        try:
            async for chunk in stream:
                pcm = encoder.push(chunk.audio)
                if chunk.final:
                    pcm += encoder.flush()
                if not pcm:
                    continue
                if first:
                    await self.stop_ttfb_metrics()
                    first = False
                yield TTSAudioRawFrame(audio=pcm, sample_rate=self.sample_rate, num_channels=1,
                                       context_id=context_id)
        except LLMStreamError as exc:
            await self.push_error(error_msg=f"{self}: speech synthesis failed: {exc}", exception=exc)
        finally:
            self._streams.discard(stream)
            await stream.aclose()  # closes the HTTP stream if we stop early (interrupted, cancelled)
            if first:
                await self.stop_ttfb_metrics()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InterruptionFrame):
            # Pipecat cancelled the task running run_tts; a stream left suspended is closed here, so its
            # HTTP connection (and the LLM's generation) stops now rather than when it is collected.
            for stream in list(self._streams):
                self._streams.discard(stream)
                try:
                    await stream.aclose()
                except RuntimeError:  # still running in the task being cancelled: that task closes it
                    pass
