"""Training options, the model config a run trains, and the errors a bad run setup raises."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from ..config import PRESETS, SNACConfig
from ..model.checkpoint import CheckpointError, read_config_file


class TrainingError(ValueError):
    """A training run cannot start or go on: bad data, config, checkpoint or device. One clear message."""


# A small 24 kHz model for speech: the official 24 kHz rates, strides and codebooks with narrow layers
# (encoder_dim 32, decoder_dim 256: about 4.0 M parameters against the official model's 19.8 M).
MINI_CONFIG = dataclasses.replace(PRESETS["24khz"], encoder_dim=32, decoder_dim=256)

# Names ``--config`` accepts besides paths: the official presets and the mini model.
CONFIG_NAMES: Dict[str, SNACConfig] = {**PRESETS, "mini": MINI_CONFIG}

ConfigSpec = Union[None, str, Path, SNACConfig, Mapping[str, Any]]


@dataclass
class TrainConfig:
    """Options of one training run (``train`` / ``snac-stream train``). Defaults follow DAC's recipe.

    Model:
        model_config: preset name (``24khz``, ``32khz``, ``44khz``, ``mini``), a config.json path, a checkpoint
            directory, a dict or an ``SNACConfig``. None: the ``init`` checkpoint's config, the resumed run's
            config, else ``24khz``.
        overrides: SNAC constructor arguments replacing those of ``model_config`` (e.g. ``{"encoder_dim": 32}``).
        init: fine-tune from this checkpoint (directory, hub id or preset name) instead of random weights.
    Data (at least one of ``data_dir`` / ``espeak``):
        data_dir: a directory of audio files (wav, flac, ogg; searched recursively; any rate, mixed to mono and
            resampled to the model rate). ``eval_dir``: held-out files; without it a few files of ``data_dir``
            are held out.
        espeak: synthesise English speech with espeak-ng into ``espeak_dir`` (default ``out/espeak``),
            ``espeak_utterances`` for training and ``eval_items`` held-out ones (other sentences).
    Output:
        out: run directory (``train_state.pt``, ``model/``, ``log.jsonl``); None keeps nothing on disk.
        resume: continue the run in ``out``.
    """

    # model
    model_config: ConfigSpec = None
    overrides: Dict[str, Any] = field(default_factory=dict)
    init: Optional[str] = None
    # data
    data_dir: Optional[str] = None
    eval_dir: Optional[str] = None
    espeak: bool = False
    espeak_utterances: int = 400
    espeak_dir: Optional[str] = None
    segment_length: int = 16384
    batch_size: int = 24
    # optimisation
    steps: int = 10000
    max_minutes: Optional[float] = None  # stop (evaluate and save) after this much training time
    lr: float = 6e-4
    betas: Tuple[float, float] = (0.8, 0.99)
    weight_decay: float = 0.01
    lr_decay: float = 1.0  # per-step exponential decay (DAC: 0.999996); 1.0 = constant
    grad_clip: float = 1000.0  # generator gradient norm clip (DAC: 1e3); 0 = off
    disc_grad_clip: float = 10.0  # discriminator gradient norm clip (DAC: 10); 0 = off
    # losses
    # DAC's weights (mel 15 against commitment 0.25, codebook 1); the waveform L1 at a tenth of the mel term.
    # With the mel term at 1 the VQ losses dominate and every codebook collapses to a single code.
    mel_weight: float = 15.0
    waveform_weight: float = 1.5
    commitment_weight: float = 0.25
    codebook_weight: float = 1.0
    mel_fft_sizes: Tuple[int, ...] = (512, 1024, 2048)
    n_mels: int = 80
    adversarial: bool = False
    adversarial_weight: float = 1.0
    feature_weight: float = 2.0
    gan_loss: str = "lsgan"  # or "hinge"
    disc_windows: Tuple[int, ...] = (2048, 1024, 512)
    # model noise during training: "torch" (fresh Gaussian noise, as the reference), "deterministic" or "off"
    noise_mode: str = "torch"
    # runtime
    device: str = "auto"
    bf16: bool = False
    seed: int = 0
    prefetch: int = 2  # batches read ahead in a background thread; 0 = read in the training loop
    # evaluation and logging
    eval_every: int = 500
    eval_items: int = 8
    eval_seconds: float = 4.0
    save_every: int = 1000
    log_every: int = 10
    progress: bool = True
    out: Optional[str] = None
    resume: bool = False

    def validate(self) -> None:
        positive = ("steps", "batch_size", "segment_length", "espeak_utterances", "eval_items", "n_mels")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "steps" else 1):
                raise TrainingError(f"{name} must be a {'non-negative' if name == 'steps' else 'positive'} "
                                    f"integer, got {value!r}")
        for name in ("eval_every", "save_every", "log_every", "prefetch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise TrainingError(f"{name} must be a non-negative integer (0 = never/off), got {value!r}")
        if self.max_minutes is not None and not (isinstance(self.max_minutes, (int, float)) and self.max_minutes > 0):
            raise TrainingError(f"max_minutes must be a positive number of minutes, got {self.max_minutes!r}")
        if not self.lr > 0:
            raise TrainingError(f"lr must be positive, got {self.lr!r}")
        if not 0 < self.lr_decay <= 1:
            raise TrainingError(f"lr_decay is a per-step factor in (0, 1], got {self.lr_decay!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise TrainingError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.gan_loss not in ("lsgan", "hinge"):
            raise TrainingError(f"gan_loss must be 'lsgan' or 'hinge', got {self.gan_loss!r}")
        if self.noise_mode not in ("torch", "deterministic", "off"):
            raise TrainingError(f"noise_mode must be 'torch', 'deterministic' or 'off', got {self.noise_mode!r}")
        if not self.eval_seconds > 0:
            raise TrainingError(f"eval_seconds must be positive, got {self.eval_seconds!r}")
        for name in ("mel_fft_sizes", "disc_windows"):
            sizes = getattr(self, name)
            if not sizes or not all(isinstance(n, int) and n >= 16 for n in sizes):
                raise TrainingError(f"{name} must be a non-empty list of FFT sizes >= 16, got {sizes!r}")
        if self.data_dir is None and not self.espeak:
            raise TrainingError("no training data: give a directory of audio files (--data DIR) and/or --espeak")
        if self.resume and self.out is None:
            raise TrainingError("resume needs the run directory (--out DIR) that holds train_state.pt")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly copy (for the train state and the log)."""
        d = dataclasses.asdict(self)
        spec = d["model_config"]
        if isinstance(spec, SNACConfig):
            d["model_config"] = spec.to_dict()
        elif isinstance(spec, Path):
            d["model_config"] = str(spec)
        return d


def _load_config_spec(spec: Union[str, Path]) -> SNACConfig:
    key = str(spec).lower().removeprefix("snac_")
    if key in CONFIG_NAMES:
        return CONFIG_NAMES[key]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise TrainingError(f"{spec} is a directory without config.json")
    if not path.is_file():
        raise TrainingError(f"unknown model config {str(spec)!r}: expected one of {', '.join(CONFIG_NAMES)}, "
                            "a config.json file or a checkpoint directory")
    try:
        return read_config_file(path)
    except CheckpointError as exc:
        raise TrainingError(f"invalid model config: {exc}") from exc


def _make_config(values: Mapping[str, Any], where: str) -> SNACConfig:
    try:
        return SNACConfig.from_dict(dict(values))
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"invalid model config ({where}): {exc}") from exc


def resolve_model_config(spec: ConfigSpec, overrides: Optional[Mapping[str, Any]] = None,
                         default: Optional[SNACConfig] = None) -> SNACConfig:
    """The SNACConfig of ``spec`` (see ``TrainConfig.model_config``) with ``overrides`` applied.

    ``spec`` None means ``default`` (else the 24 kHz preset). Raises ``TrainingError`` for unknown names,
    unreadable or invalid JSON and configs the model cannot be built from.
    """
    if spec is None:
        base = default if default is not None else PRESETS["24khz"]
    elif isinstance(spec, SNACConfig):
        base = spec
    elif isinstance(spec, Mapping):
        base = _make_config(spec, "dict")
    elif isinstance(spec, (str, Path)):
        base = _load_config_spec(spec)
    else:
        raise TrainingError(f"model_config must be a name, path, dict or SNACConfig, got {type(spec).__name__}")
    overrides = dict(overrides or {})
    if not overrides:
        return base
    unknown = set(overrides) - set(SNACConfig.__dataclass_fields__)
    if unknown:
        raise TrainingError(f"unknown model config keys: {sorted(unknown)}")
    values = base.to_dict()
    if "latent_dim" not in overrides and ("encoder_dim" in overrides or "encoder_rates" in overrides):
        values["latent_dim"] = None  # follows the encoder's width again
    values.update(overrides)
    return _make_config(values, "with overrides " + ", ".join(f"{k}={v}" for k, v in overrides.items()))


def config_differences(a: SNACConfig, b: SNACConfig) -> Dict[str, Tuple[Any, Any]]:
    """Fields where ``a`` and ``b`` differ: name -> (a's value, b's value)."""
    da, db = a.to_dict(), b.to_dict()
    return {k: (da[k], db[k]) for k in da if da[k] != db[k]}


def resolve_device(spec: str, bf16: bool) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``, checked; bf16 needs CUDA."""
    if spec == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(spec)
        except (RuntimeError, ValueError) as exc:
            raise TrainingError(f"device {spec!r} is not a torch device ({exc}); use auto, cpu or cuda") from exc
        if device.type not in ("cpu", "cuda"):
            raise TrainingError(f"device {spec!r}: training runs on cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError(f"device {spec!r}: CUDA is not available here; use --device cpu")
    if bf16 and device.type != "cuda":
        raise TrainingError("bf16 autocast needs a CUDA device (training runs on the CPU here); "
                            "drop --bf16 to train in fp32")
    return device
