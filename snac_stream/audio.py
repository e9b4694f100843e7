"""Audio file input/output and PCM conversions for the command line and the streaming server.

Files are read and written with ``soundfile``, whose wheels bundle libsndfile (WAV, FLAC, Ogg Vorbis/Opus and
more), so no system audio library is needed. Audio is always returned as mono float32 samples in [-1, 1].

Resampling uses ``soxr`` at its "VHQ" setting: a proper band-limited (windowed-sinc, linear-phase) resampler,
so speech resampled to the model rate keeps its spectrum below the new Nyquist frequency without aliasing.
Its wheel is small and self-contained, and torchaudio is not an option: there is no CPU build of torchaudio
for the torch version this project pins.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple, Union

import numpy as np
import soundfile as sf
import soxr
import torch

# Suffix -> (libsndfile container, default subtype when writing).
WRITE_FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
}
SUPPORTED_FORMATS = "wav, flac, ogg (Vorbis/Opus)"
RESAMPLE_QUALITY = "VHQ"

PathLike = Union[str, os.PathLike]


class AudioReader:
    """An audio file read in blocks: mono float32 samples resampled to ``target_rate`` as they are read.

    Memory stays at one block however long the file is. The blocks concatenate to exactly what
    :func:`load_audio` returns (soxr's streaming resampler gives the same samples as its whole-signal call).

    Args:
        path: a wav, flac or ogg file (any other format libsndfile reads also works).
        target_rate: output rate in Hz; ``None`` keeps the file's own rate.
        block_frames: frames of the file read per block.

    Raises (on opening):
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not readable audio or holds no samples.
    """

    def __init__(self, path: PathLike, target_rate: Optional[int] = None, block_frames: int = 1 << 18) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"audio file not found: {self.path}")
        if self.path.is_dir():
            raise ValueError(f"{self.path} is a directory, not an audio file")
        try:
            self._file = sf.SoundFile(str(self.path))
        except (sf.LibsndfileError, RuntimeError) as exc:  # libsndfile errors are RuntimeErrors
            reason = str(exc).rstrip(". ")
            raise ValueError(f"cannot read audio from {self.path}: {reason}. Supported formats: {SUPPORTED_FORMATS}"
                             ) from exc
        if self._file.frames == 0 or self._file.channels == 0:
            self._file.close()
            raise ValueError(f"{self.path} holds no audio samples")
        self.source_rate: int = int(self._file.samplerate)
        self.target_rate: int = self.source_rate if target_rate is None else int(target_rate)
        self.source_frames: int = int(self._file.frames)
        self.block_frames = block_frames

    @property
    def duration_s(self) -> float:
        return self.source_frames / self.source_rate

    def blocks(self) -> Iterator[np.ndarray]:
        """Mono float32 blocks (n,) at ``target_rate``; the last one ends the resampler's output."""
        resampler = None
        if self.target_rate != self.source_rate:
            resampler = soxr.ResampleStream(self.source_rate, self.target_rate, 1, dtype="float32",
                                            quality=RESAMPLE_QUALITY)
        produced = 0
        self._file.seek(0)
        while True:
            data = self._file.read(self.block_frames, dtype="float32", always_2d=True)  # (n, C)
            last = data.shape[0] < self.block_frames or self._file.tell() >= self.source_frames
            block = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
            if not np.isfinite(block).all():
                raise ValueError(f"{self.path} holds NaN or infinite samples")
            if resampler is not None:
                block = resampler.resample_chunk(np.ascontiguousarray(block), last=last)
            produced += block.shape[0]
            if last and produced == 0:
                raise ValueError(f"{self.path} is too short to resample from {self.source_rate} Hz to "
                                 f"{self.target_rate} Hz")
            if block.shape[0]:
                yield np.ascontiguousarray(block, dtype=np.float32)
            if last:
                return

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "AudioReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load_audio(path: PathLike, target_rate: Optional[int] = None) -> Tuple[np.ndarray, int]:
    """Read a whole audio file as mono float32 samples, resampled to ``target_rate``.

    Returns ``(audio, original_rate)``: audio is float32 of shape (T,) samples at ``target_rate`` (channels
    are averaged), ``original_rate`` is the file's sample rate in Hz. Long files: :class:`AudioReader`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not readable audio, holds no samples, or holds NaN/infinite samples.
    """
    with AudioReader(path, target_rate) as reader:
        return np.concatenate(list(reader.blocks())), reader.source_rate


def resample(audio: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """Band-limited resampling of mono float audio (T,) samples from ``in_rate`` to ``out_rate`` Hz.

    The output has ``round(T * out_rate / in_rate)`` samples (soxr's whole-signal length).
    """
    if in_rate <= 0 or out_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"resample expects mono audio of shape (T,), got {audio.shape}")
    if in_rate == out_rate:
        return audio
    return soxr.resample(audio, in_rate, out_rate, quality=RESAMPLE_QUALITY).astype(np.float32, copy=False)


class AudioWriter:
    """Mono audio written to ``path`` block by block; the container follows the suffix (.wav, .flac or .ogg).

    Args:
        rate: sample rate in Hz.
        subtype: libsndfile subtype; default ``PCM_16`` for wav and flac, ``VORBIS`` for ogg. Pass
            ``"FLOAT"`` for 32-bit float wav (no quantisation, no clipping).

    Integer subtypes clip to [-1, 1] first: libsndfile would otherwise wrap out-of-range samples around.
    Blocks are converted sample by sample, so the file is the same however the audio is cut into blocks.
    """

    def __init__(self, path: PathLike, rate: int, subtype: Optional[str] = None) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in WRITE_FORMATS:
            raise ValueError(
                f"cannot write {self.path}: unsupported suffix {self.path.suffix or '(none)'!r}; use one of "
                + ", ".join(WRITE_FORMATS)
            )
        container, default_subtype = WRITE_FORMATS[suffix]
        self.subtype = (subtype or default_subtype).upper()
        if not sf.check_format(container, self.subtype):
            raise ValueError(f"cannot write {self.path}: {container} files do not support sample format "
                             f"{self.subtype}")
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
            raise ValueError(f"sample rate must be a positive int, got {rate!r}")
        self.samples_written = 0
        try:
            self._file = sf.SoundFile(str(self.path), "w", int(rate), 1, subtype=self.subtype, format=container)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise OSError(f"cannot write {self.path}: {exc}") from exc

    def write(self, samples: np.ndarray) -> None:
        """Append float samples (T,) in [-1, 1]."""
        if self.subtype == "PCM_16":
            # Quantise here rather than in libsndfile so that load_audio(save_audio(x)) == pcm16_to_float(x).
            data: np.ndarray = np.frombuffer(float_to_pcm16(samples), dtype="<i2")
        elif self.subtype in ("FLOAT", "DOUBLE"):
            data = np.asarray(samples, dtype=np.float32)
        else:
            data = np.clip(samples, -1.0, 1.0)
        try:
            self._file.write(data)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise OSError(f"cannot write {self.path}: {exc}") from exc
        self.samples_written += data.shape[0]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "AudioWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def save_audio(path: PathLike, audio: Any, rate: int, subtype: Optional[str] = None) -> Path:
    """Write mono audio (T,), (1, T) or (1, 1, T) in [-1, 1] to ``path`` at ``rate`` Hz; see :class:`AudioWriter`."""
    samples = _as_mono(audio)
    with AudioWriter(path, rate, subtype) as writer:
        writer.write(samples)
    return writer.path


def to_tensor(audio: np.ndarray) -> torch.Tensor:
    """Mono samples (T,) -> float32 tensor (1, 1, T), the model's (B, C, T) layout."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"to_tensor expects mono audio of shape (T,), got {audio.shape}")
    return torch.from_numpy(np.ascontiguousarray(audio)).view(1, 1, -1)


def pcm16_to_float(data: Union[bytes, bytearray, memoryview, np.ndarray]) -> np.ndarray:
    """Little-endian signed 16-bit PCM bytes (or an int16 array) -> float32 samples (T,) in [-1, 1).

    Scales by 1/32768, as libsndfile does when reading, so -32768 maps to exactly -1.0.
    """
    if isinstance(data, np.ndarray):
        if data.dtype.kind != "i" or data.dtype.itemsize != 2:
            raise TypeError(f"expected an int16 array, got {data.dtype}")
        pcm = data.reshape(-1)
    else:
        raw = memoryview(data).cast("B")
        if raw.nbytes % 2:
            raise ValueError(f"16-bit PCM needs an even number of bytes, got {raw.nbytes}")
        pcm = np.frombuffer(raw, dtype="<i2")
    return pcm.astype(np.float32) / np.float32(32768.0)


def float_to_pcm16(audio: Any) -> bytes:
    """Float samples (T,) -> little-endian signed 16-bit PCM bytes (2 bytes per sample).

    Rounds ``x * 32768`` to the nearest integer and saturates to [-32768, 32767], so that
    ``float_to_pcm16(pcm16_to_float(b)) == b`` exactly; samples outside [-1, 1] clip.
    """
    samples = np.asarray(audio, dtype=np.float32).reshape(-1)
    scaled = np.rint(samples.astype(np.float64) * 32768.0)
    scaled = np.nan_to_num(scaled, nan=0.0)
    return np.clip(scaled, -32768, 32767).astype("<i2").tobytes()


def _as_mono(audio: Any) -> np.ndarray:
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().to("cpu", torch.float32).numpy()
    samples = np.asarray(audio, dtype=np.float32)
    if samples.ndim > 1 and all(n == 1 for n in samples.shape[:-1]):
        samples = samples.reshape(-1)  # (1, T) or (1, 1, T)
    if samples.ndim != 1:
        raise ValueError(f"expected mono audio of shape (T,), (1, T) or (1, 1, T), got {samples.shape}")
    if samples.shape[0] == 0:
        raise ValueError("refusing to write an empty audio file")
    return samples
