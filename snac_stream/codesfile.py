"""SNAC codes on disk: one ``.npz`` file per encoded recording.

Layout (format version 1), all entries plain arrays, readable with ``np.load(path)`` (no pickles):

* ``codes_0`` .. ``codes_{n-1}``: the code levels, coarse first, shape (B, T_i) frames. Stored as ``uint16``
  when ``codebook_size <= 65536`` (every official model: 4096 entries, 12 bits), else ``int32``; codes are
  never negative, and 16 bits quarter the size of int64. ``load_codes`` returns int64 tensors again.
* ``meta``: a 0-d unicode array holding a JSON object::

      {"format": "snac-stream-codes", "version": 1,
       "model_name": "hubertsiuzdak/snac_24khz" | "/abs/checkpoint/dir" | null,
       "config": {...SNACConfig fields...},
       "sample_rate": 24000,          # Hz of the audio the codes stand for (= config.sampling_rate)
       "num_samples": 63000,          # input length in samples at sample_rate, before the encoder's padding
       "source_sample_rate": 22050}   # Hz of the original input file (information only), or null

The full config travels with the codes so that a decoder can refuse weights of another architecture, and
``num_samples`` lets it trim the decoded audio (a whole number of frames) back to the input's length.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .config import SNACConfig

FORMAT_NAME = "snac-stream-codes"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


@dataclass
class CodesFile:
    """The contents of a codes file.

    ``codes``: ``config.n_codebooks`` int64 tensors (B, T_i) frames, coarse first. ``sample_rate`` (Hz) is the
    model's rate; ``num_samples`` is the original length in samples at that rate.
    """

    codes: List[torch.Tensor]
    config: SNACConfig
    model_name: Optional[str]
    sample_rate: int
    num_samples: int
    source_sample_rate: Optional[int] = None
    version: int = FORMAT_VERSION

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate


def code_dtype(codebook_size: int) -> np.dtype:
    """The smallest integer dtype this format uses for codes in [0, codebook_size)."""
    return np.dtype(np.uint16) if codebook_size <= 2**16 else np.dtype(np.int32)


def save_codes(
    path: PathLike,
    codes: Sequence[torch.Tensor],
    config: SNACConfig,
    *,
    model_name: Optional[str],
    num_samples: int,
    source_sample_rate: Optional[int] = None,
) -> Path:
    """Write ``codes`` (list of (B, T_i) integer tensors, coarse first) and their metadata to ``path``.

    ``num_samples``: length of the encoded audio in samples at ``config.sampling_rate``, before padding.
    The file is written exactly at ``path`` (no ``.npz`` suffix is appended).
    """
    arrays = _validate_codes([torch.as_tensor(c).detach().cpu() for c in codes], config, where="codes")
    _validate_length(num_samples, arrays, config, where="num_samples")
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model_name": model_name,
        "config": config.to_dict(),
        "sample_rate": config.sampling_rate,
        "num_samples": int(num_samples),
        "source_sample_rate": None if source_sample_rate is None else int(source_sample_rate),
    }
    dtype = code_dtype(config.codebook_size)
    entries: Dict[str, np.ndarray] = {f"codes_{i}": a.numpy().astype(dtype) for i, a in enumerate(arrays)}
    entries["meta"] = np.array(json.dumps(meta))
    path = Path(path)
    # A file object stops numpy from appending ".npz" to names that lack it.
    with open(path, "wb") as f:
        np.savez_compressed(f, **entries)
    return path


def load_codes(path: PathLike) -> CodesFile:
    """Read a codes file written by ``save_codes``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a codes file, is corrupt, or is internally inconsistent; the message
            says which.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"codes file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a codes file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # every .npz is a zip archive
        what = "it holds a single .npy array" if magic == b"\x93NUM" else f"it starts with {magic!r}"
        raise ValueError(f"{path} is not a readable .npz codes file ({what}; `snac-stream encode` writes them)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array
            raise ValueError("it holds a single .npy array")
        with loaded:
            entries = {name: loaded[name] for name in loaded.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"{path} is not a readable .npz codes file ({exc})") from exc
    meta = _read_meta(path, entries)
    try:
        config = SNACConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: invalid model config in metadata: {exc}") from exc
    sample_rate = _int_field(path, meta, "sample_rate")
    if sample_rate != config.sampling_rate:
        raise ValueError(
            f"{path}: sample_rate {sample_rate} disagrees with the config's sampling_rate {config.sampling_rate}"
        )
    num_samples = _int_field(path, meta, "num_samples")
    source_rate = meta.get("source_sample_rate")
    if source_rate is not None and (isinstance(source_rate, bool) or not isinstance(source_rate, int)
                                    or source_rate <= 0):
        raise ValueError(f"{path}: source_sample_rate must be a positive int or null, got {source_rate!r}")
    model_name = meta.get("model_name")
    if model_name is not None and not isinstance(model_name, str):
        raise ValueError(f"{path}: model_name must be a string or null, got {model_name!r}")

    names = [f"codes_{i}" for i in range(config.n_codebooks)]
    missing = [n for n in names if n not in entries]
    if missing:
        raise ValueError(f"{path}: the config has {config.n_codebooks} code levels but {', '.join(missing)} "
                         "is missing")
    extra = sorted(n for n in entries if n.startswith("codes_") and n not in names)
    if extra:
        raise ValueError(f"{path}: unexpected entries {', '.join(extra)} for a {config.n_codebooks}-level config")
    tensors = []
    for name in names:
        array = entries[name]
        if array.dtype.kind not in "iu":
            raise ValueError(f"{path}: {name} must hold integers, got {array.dtype}")
        tensors.append(torch.from_numpy(array.astype(np.int64)))
    tensors = _validate_codes(tensors, config, where=str(path))
    _validate_length(num_samples, tensors, config, where=f"{path}: num_samples")
    return CodesFile(codes=tensors, config=config, model_name=model_name, sample_rate=sample_rate,
                     num_samples=num_samples, source_sample_rate=source_rate, version=meta["version"])


def config_differences(expected: SNACConfig, actual: SNACConfig) -> List[str]:
    """Human-readable ``field: expected X, got Y`` for every config field that differs (empty if equal)."""
    a, b = expected.to_dict(), actual.to_dict()
    return [f"{key}: {a[key]!r} vs {b[key]!r}" for key in a if a[key] != b[key]]


# ---- validation ---------------------------------------------------------------------------------------
def _read_meta(path: Path, entries: Dict[str, np.ndarray]) -> Dict[str, Any]:
    if "meta" not in entries:
        raise ValueError(f"{path} is an .npz file but not a snac-stream codes file (no 'meta' entry)")
    raw = entries["meta"]
    if raw.shape != () or raw.dtype.kind != "U":
        raise ValueError(f"{path}: 'meta' must be a JSON string, got a {raw.dtype} array of shape {raw.shape}")
    try:
        meta = json.loads(raw.item())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: 'meta' is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a snac-stream codes file (metadata lacks format {FORMAT_NAME!r})")
    version = meta.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{path}: metadata has no integer format version")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} uses codes format version {version}; this snac-stream reads up to "
                         f"{FORMAT_VERSION} (upgrade snac-stream)")
    if version < 1:
        raise ValueError(f"{path}: invalid format version {version}")
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{path}: metadata has no model config")
    return meta


def _int_field(path: Path, meta: Dict[str, Any], key: str) -> int:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{path}: metadata field {key!r} must be a positive int, got {value!r}")
    return value


def _validate_codes(codes: List[torch.Tensor], config: SNACConfig, where: str) -> List[torch.Tensor]:
    """Check level count, (B, T_i) shapes consistent with vq_strides, and the codebook range."""
    if len(codes) != config.n_codebooks:
        raise ValueError(f"{where}: expected {config.n_codebooks} code levels, got {len(codes)}")
    for level, c in enumerate(codes):
        if c.is_floating_point() or c.is_complex() or c.dtype == torch.bool:
            raise ValueError(f"{where}: level {level} must hold integers, got {c.dtype}")
        if c.dim() != 2:
            raise ValueError(f"{where}: level {level} must have shape (B, T_{level}), got {tuple(c.shape)}")
    batch, frames = codes[0].shape
    if batch < 1 or frames < 1:
        raise ValueError(f"{where}: level 0 holds no codes (shape {tuple(codes[0].shape)})")
    coarse = config.coarse_stride
    for level, (c, stride) in enumerate(zip(codes, config.vq_strides)):
        expected = (batch, frames * coarse // stride)
        if tuple(c.shape) != expected:
            raise ValueError(f"{where}: level {level} has shape {tuple(c.shape)}, expected {expected} "
                             f"({coarse // stride} codes per coarse frame, {frames} coarse frames)")
        low, high = int(c.min()), int(c.max())
        if low < 0 or high >= config.codebook_size:
            bad = low if low < 0 else high
            raise ValueError(f"{where}: level {level} holds code {bad}, outside [0, {config.codebook_size})")
    return [c.to(torch.int64) for c in codes]


def _validate_length(num_samples: int, codes: Sequence[Any], config: SNACConfig, where: str) -> None:
    capacity = codes[0].shape[1] * config.frame_samples
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"{where} must be a positive int, got {num_samples!r}")
    if num_samples > capacity:
        raise ValueError(f"{where} {num_samples} exceeds the {capacity} samples the codes decode to")
