"""Adapters to voice-agent frameworks; each needs its framework installed (see the extras in pyproject.toml).

* :mod:`snac_stream.integrations.pipecat`: a Pipecat ``TTSService`` speaking through an OpenAI-compatible TTS
  LLM (Orpheus) and the exact streaming SNAC decoder (``pip install 'snac-stream[pipecat]'``).
"""
