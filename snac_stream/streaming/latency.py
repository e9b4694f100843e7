"""Latencies of the streaming codec, derived from the stream ops' emission counts (nothing hard-coded).

All figures are in samples at ``model.sampling_rate``. They depend on the architecture alone (weights do not
move an emission), so each is computed once per model config and cached.

* :func:`encoder_latency`: the streaming encoder's look-ahead and worst-case latency;
* :func:`decoder_latency_samples`: how far the exact streaming decoder's output trails the received codes;
* :func:`decoder_dial`: a decoder latency dial checked and capped at that;
* :func:`roundtrip_latency_samples`: streaming encoder then decoder in one process, any chunking;
* :func:`algorithmic_latency`: a server session's worst case, its input arriving in whole steps.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, TypeVar

from ..model.snac import SNACModel
from .build import decoder_op, encoder_op

_Result = TypeVar("_Result")


def _per_config(fn: Callable[..., _Result]) -> Callable[..., _Result]:
    """Cache ``fn(model, *args)`` by the model's config and ``args`` (the results hold no weights)."""
    cache: Dict[Tuple[Any, ...], _Result] = {}

    @functools.wraps(fn)
    def cached(model: SNACModel, *args: Any) -> _Result:
        key = (json.dumps(model.config.to_dict(), sort_keys=True), *args)
        if key not in cache:
            cache[key] = fn(model, *args)
        return cache[key]

    return cached


def _first_input_count(emitted: Callable[[int], int], target: int, upper: int) -> int:
    """Smallest ``n`` with ``emitted(n) >= target`` (``emitted`` is non-decreasing; ``upper`` a first guess)."""
    lo, hi = 0, upper
    while emitted(hi) < target:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if emitted(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True)
class EncoderLatency:
    """The streaming encoder's delays, in samples, over every chunking of its input."""

    lookahead_samples: int  # samples beyond the end of a coarse frame that must arrive before its codes come out
    latency_samples: int  # worst case from the first sample of a coarse frame to the emission of its codes


@_per_config
def encoder_latency(model: SNACModel) -> EncoderLatency:
    """The streaming encoder's look-ahead and latency, from the input count at which each coarse frame's codes
    come out (the pattern repeats every attention window; two periods and the start cover it)."""
    cfg = model.config
    F = cfg.frame_samples
    frames = encoder_op(model).emitted  # coarse frames final after n samples
    period = math.lcm(cfg.coarse_stride, cfg.attn_window_size or 1) // cfg.coarse_stride
    starts = [_first_input_count(frames, j + 1, F) for j in range(2 * period + 2)]
    return EncoderLatency(lookahead_samples=max(n - (j + 1) * F for j, n in enumerate(starts)),
                          latency_samples=max(n - j * F for j, n in enumerate(starts)))


@_per_config
def decoder_latency_samples(model: SNACModel) -> int:
    """Audio samples that received codes describe but the exact streaming decoder cannot emit yet (the worst
    case over the number of coarse frames received)."""
    cfg = model.config
    dec = decoder_op(model)
    return max(k * cfg.frame_samples - dec.emitted(k * cfg.coarse_stride) for k in range(1, 64))


def decoder_dial(model: SNACModel, lookahead_samples: Optional[int]) -> Optional[int]:
    """The decoder's latency dial (samples its output may run behind the received codes) checked and capped at
    :func:`decoder_latency_samples`, beyond which it changes nothing; ``None`` is exact decoding."""
    if lookahead_samples is None:
        return None
    if not isinstance(lookahead_samples, int) or lookahead_samples < 0:
        raise ValueError(f"lookahead_samples must be a non-negative int or None, got {lookahead_samples!r}")
    return min(lookahead_samples, decoder_latency_samples(model))


def roundtrip_latency_samples(model: SNACModel, lookahead_samples: Optional[int] = None) -> int:
    """Streaming encoder then decoder in one process: the encoder's look-ahead plus the decoder's latency, or
    its dial ``lookahead_samples`` when given."""
    dial = decoder_dial(model, lookahead_samples)
    return encoder_latency(model).lookahead_samples + (decoder_latency_samples(model) if dial is None else dial)


@_per_config
def algorithmic_latency(model: SNACModel, kind: str, step_frames: int) -> int:
    """Worst-case algorithmic delay in samples of a session ``kind`` whose input arrives in whole steps of
    ``step_frames`` coarse frames.

    * ``decode``: how far an output sample trails the audio its received coarse frames describe
      (``input_end * frame_samples / frame_tokens - (i + 1)``);
    * ``encode``: from the end of a coarse frame to the input count at which its tokens come out;
    * ``roundtrip``: from capturing sample ``i`` to the input count at which output sample ``i`` comes out.
    """
    cfg = model.config
    F, cs, S = cfg.frame_samples, cfg.coarse_stride, step_frames * cfg.frame_samples
    horizon = 64 // step_frames + 8  # steps; the emission pattern is periodic long before this
    enc_frames = encoder_op(model).emitted  # coarse frames final after n samples
    dec = decoder_op(model)
    dec_samples = lambda k: dec.emitted(k * cs)  # noqa: E731  samples final after k coarse frames
    worst = 0
    if kind == "decode":
        for m in range(1, horizon):
            before, after = dec_samples((m - 1) * step_frames), dec_samples(m * step_frames)
            if after > before:
                worst = max(worst, m * S - before - 1)
    elif kind == "encode":
        done = 0
        for m in range(1, horizon):
            frames = enc_frames(m * S)
            for j in range(done, frames):
                worst = max(worst, m * S - (j + 1) * F)
            done = frames
    elif kind == "roundtrip":
        before = 0
        for m in range(1, horizon):
            after = dec_samples(enc_frames(m * S) // step_frames * step_frames)
            if after > before:
                worst = max(worst, m * S - before - 1)
            before = after
    else:
        raise ValueError(f"unknown session kind {kind!r}")
    return worst
