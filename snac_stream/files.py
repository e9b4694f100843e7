"""Audio files of any length through the codec in bounded memory (what ``snac-stream encode``/``decode`` run).

Offline ``model.encode`` / ``model.decode`` hold the whole signal and every layer's activations for it: gigabytes
for minutes of audio. Here the file is read (or written) in blocks and runs through the exact streaming encoder
(or decoder), so memory stays at one block's activations whatever the length, and the result is what the offline
call gives on the whole signal: the same codes, and audio within float rounding (so a 16-bit file may differ
from the offline one by one quantisation step in rare samples). Codes are small (an hour of 24 kHz audio is
about 300 000 codes) and are kept in memory until the codes file is written at the end.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from tqdm import tqdm

from .audio import AudioReader, AudioWriter
from .streaming import SNAC

PathLike = Union[str, os.PathLike]

BLOCK_SECONDS = 2.0  # audio per push: long enough to keep each push efficient, short enough to keep memory low
PROGRESS_AFTER_S = 5.0  # shorter files get no progress bar


@dataclass
class EncodedAudio:
    """Codes of a file: ``codes`` per level (1, T_i) int64 on the CPU, coarse first; ``num_samples`` the
    audio's length at the model's rate (before padding); ``source_rate`` the file's own rate (Hz)."""

    codes: List[torch.Tensor]
    num_samples: int
    source_rate: int


def _progress(total_s: float, what: str, show: Optional[bool]) -> tqdm:
    """A progress bar in seconds of audio, on stderr when it is a terminal and the audio is long enough."""
    if show is None:
        show = sys.stderr.isatty() and total_s > PROGRESS_AFTER_S
    return tqdm(total=round(total_s, 2), unit="s", desc=what, disable=not show, leave=False,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}]")


def encode_file(model: SNAC, path: PathLike, *, block_seconds: float = BLOCK_SECONDS,
                progress: Optional[bool] = None) -> EncodedAudio:
    """Encode an audio file (any length, rate and channel count) in blocks of ``block_seconds``.

    Equals ``model.encode`` of the whole file as :func:`snac_stream.audio.load_audio` reads it.
    ``progress``: ``None`` shows a bar on a terminal for files longer than a few seconds.
    """
    rate = model.sampling_rate
    encoder = model.streaming_encoder()
    pieces: List[List[torch.Tensor]] = []
    num_samples = 0
    with AudioReader(path, rate, block_frames=max(1, round(block_seconds * rate))) as reader, \
            _progress(reader.duration_s, "encode", progress) as bar, torch.inference_mode():
        for block in reader.blocks():
            chunk = torch.from_numpy(block).to(model.device).view(1, 1, -1)
            pieces.append([c.cpu() for c in encoder.push(chunk)])
            num_samples += block.shape[0]
            bar.update(block.shape[0] / rate)
        pieces.append([c.cpu() for c in encoder.flush()])
        source_rate = reader.source_rate
    codes = [torch.cat(level, dim=-1) for level in zip(*pieces)]
    return EncodedAudio(codes, num_samples, source_rate)


def decode_file(model: SNAC, codes: Sequence[torch.Tensor], path: PathLike, *, num_samples: Optional[int] = None,
                subtype: Optional[str] = None, block_seconds: float = BLOCK_SECONDS,
                progress: Optional[bool] = None) -> int:
    """Decode ``codes`` (per level (1, T_i), coarse first) into the audio file ``path``, written in blocks.

    The output is trimmed to ``num_samples`` (default: all decoded samples) and equals ``model.decode(codes)``
    within float rounding. Returns the number of samples written.
    """
    codes = model.check_codes(list(codes))
    if codes[0].shape[0] != 1:
        raise ValueError(f"decode_file writes one audio file, so it needs a batch of 1, got {codes[0].shape[0]}")
    cfg = model.config
    frames = codes[0].shape[-1]
    total = frames * cfg.frame_samples if num_samples is None else min(num_samples, frames * cfg.frame_samples)
    # Push whole attention windows (32/44 kHz models attend over windows of several coarse frames).
    window_frames = math.lcm(cfg.coarse_stride, cfg.attn_window_size or 1) // cfg.coarse_stride
    step = max(window_frames, round(block_seconds * cfg.sampling_rate / cfg.frame_samples) // window_frames
               * window_frames)
    ratios = [c.shape[-1] // frames for c in codes]
    decoder = model.streaming_decoder()
    with AudioWriter(path, cfg.sampling_rate, subtype) as writer, \
            _progress(total / cfg.sampling_rate, "decode", progress) as bar, torch.inference_mode():

        def write(audio: torch.Tensor) -> None:
            samples = audio[0, 0].to("cpu", torch.float32).numpy()[: total - writer.samples_written]
            if samples.shape[0]:
                writer.write(samples)
                bar.update(samples.shape[0] / cfg.sampling_rate)

        for start in range(0, frames, step):
            chunk = [c[:, start * r: (start + step) * r].to(model.device) for c, r in zip(codes, ratios)]
            write(decoder.push(chunk))
        write(decoder.flush())
        return writer.samples_written

