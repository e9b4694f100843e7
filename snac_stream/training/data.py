"""Training audio: a directory of files, read as random crops at the model's rate.

Files (``.wav``, ``.flac``, ``.ogg``, searched recursively) may have any sample rate and channel count:
channels are averaged to mono and crops are resampled with soxr (HQ) to the model's rate as they are read,
so nothing is decoded up front. Files soxr/libsndfile cannot open are skipped with a note; a directory with
none left is an error. Files shorter than a segment are used whole, zero-padded at the end. A file is picked
with probability proportional to its duration; a crop quieter than -60 dBFS RMS is redrawn (up to 8 times).

Batch ``k`` depends only on (seed, k), so a resumed run reads exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import soundfile as sf
import soxr

from .options import TrainingError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
SILENCE_RMS = 10 ** (-60 / 20)


@dataclass(frozen=True)
class AudioFile:
    path: Path
    frames: int
    sample_rate: int

    def length_at(self, sample_rate: int) -> int:
        """Samples after resampling to ``sample_rate``."""
        return self.frames * sample_rate // self.sample_rate


def scan_audio_dir(directory: str | Path, what: str = "data directory") -> Tuple[List[AudioFile], List[str]]:
    """The decodable audio files under ``directory`` (sorted) and a note per file skipped."""
    root = Path(directory)
    if not root.is_dir():
        raise TrainingError(f"{what} {root} does not exist or is not a directory")
    candidates = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    if not candidates:
        raise TrainingError(f"{what} {root} holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    files: List[AudioFile] = []
    skipped: List[str] = []
    for path in candidates:
        try:
            info = sf.info(str(path))
        except Exception as exc:  # libsndfile raises RuntimeError/LibsndfileError/TypeError for foreign files
            skipped.append(f"{path}: {exc}")
            continue
        if info.frames <= 0 or info.samplerate <= 0:
            skipped.append(f"{path}: no samples")
            continue
        files.append(AudioFile(path, int(info.frames), int(info.samplerate)))
    if not files:
        raise TrainingError(f"none of the {len(candidates)} audio files in {what} {root} can be decoded "
                            f"(first: {skipped[0]})")
    return files, skipped


def read_mono(path: Path, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Frames ``start:stop`` of a file as float32 mono (channels averaged)."""
    try:
        data, _ = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
    except Exception as exc:
        raise TrainingError(f"cannot read audio from {path}: {exc}") from exc
    return data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]


def read_resampled(file: AudioFile, sample_rate: int, start: int, length: int) -> np.ndarray:
    """Samples ``start .. start + length - 1`` of ``file`` at ``sample_rate`` (zero-padded past its end)."""
    if file.sample_rate == sample_rate:
        out = read_mono(file.path, start, min(start + length, file.frames))
    else:
        ratio = file.sample_rate / sample_rate
        margin = 64  # source samples either side, so the resampler's edge transients fall outside the crop
        src_start = math.floor(start * ratio)
        a = max(0, src_start - margin)
        b = min(file.frames, math.ceil((start + length) * ratio) + margin)
        chunk = read_mono(file.path, a, b)
        resampled = soxr.resample(chunk, file.sample_rate, sample_rate, quality="HQ").astype(np.float32)
        offset = max(0, round(start - a / ratio))
        out = resampled[offset:offset + length]
    if out.shape[0] < length:
        out = np.pad(out, (0, length - out.shape[0]))
    return np.ascontiguousarray(out, dtype=np.float32)


class SegmentSampler:
    """Random fixed-length crops from ``files`` at ``sample_rate``."""

    def __init__(self, files: Sequence[AudioFile], sample_rate: int, segment_length: int, seed: int = 0,
                 tries: int = 8):
        if not files:
            raise TrainingError("no training audio files")
        self.files = list(files)
        self.sample_rate = sample_rate
        self.segment_length = segment_length
        self.seed = seed
        self.tries = tries
        durations = np.array([max(f.length_at(sample_rate), 1) for f in self.files], dtype=np.float64)
        self.weights = durations / durations.sum()

    def crop(self, rng: np.random.Generator) -> np.ndarray:
        seg = self.segment_length
        audio = None
        for _ in range(self.tries):
            file = self.files[rng.choice(len(self.files), p=self.weights)]
            length = file.length_at(self.sample_rate)
            start = int(rng.integers(0, length - seg + 1)) if length > seg else 0
            audio = read_resampled(file, self.sample_rate, start, seg)
            if np.sqrt(np.mean(audio.astype(np.float64) ** 2)) > SILENCE_RMS:
                break
        return audio

    def batch(self, step: int, batch_size: int) -> np.ndarray:
        """The (batch_size, 1, segment_length) float32 batch of training step ``step``."""
        rng = np.random.default_rng([self.seed, step])
        return np.stack([self.crop(rng) for _ in range(batch_size)])[:, None, :]


def eval_clips(files: Sequence[AudioFile], sample_rate: int, seconds: float, limit: int) -> List[np.ndarray]:
    """The first ``seconds`` of each of the first ``limit`` files, at ``sample_rate``."""
    clips = []
    for file in list(files)[:limit]:
        length = min(file.length_at(sample_rate), int(seconds * sample_rate))
        if length > 0:
            clips.append(read_resampled(file, sample_rate, 0, length))
    return clips


def split_holdout(files: Sequence[AudioFile], count: int, seed: int) -> Tuple[List[AudioFile], List[AudioFile]]:
    """(train, held out): ``count`` files chosen at random held out, at most a twentieth of them (at least one),
    none when there is a single file (it then serves both)."""
    files = list(files)
    if len(files) < 2:
        return files, list(files)
    n = max(1, min(count, len(files) // 20))
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(files))
    held = set(order[:n].tolist())
    return ([f for i, f in enumerate(files) if i not in held], [f for i, f in enumerate(files) if i in held])


def batches(sampler: SegmentSampler, start: int, stop: int, batch_size: int,
            prefetch: int = 2) -> Iterator[np.ndarray]:
    """Batches of steps ``start .. stop - 1``; with ``prefetch`` > 0 read ahead in a background thread."""
    if prefetch <= 0:
        for step in range(start, stop):
            yield sampler.batch(step, batch_size)
        return
    q: "queue.Queue" = queue.Queue(maxsize=prefetch)
    done = threading.Event()

    def put(item) -> bool:
        while not done.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for step in range(start, stop):
                if not put(("batch", sampler.batch(step, batch_size))):
                    return
            put(("end", None))
        except BaseException as exc:  # handed to the training loop
            put(("error", exc))

    thread = threading.Thread(target=work, name="snac-train-data", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        done.set()
