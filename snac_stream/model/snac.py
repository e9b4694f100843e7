"""The SNAC codec's offline model: encode / decode, checkpoint-compatible with the official weights.

The user-facing ``snac_stream.SNAC`` adds the streaming encoder and decoder on top of this class (in
``snac_stream.streaming``): the model layer knows nothing of streaming.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, ContextManager, List, Optional, Sequence, Tuple, Type, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PRESETS, SNACConfig, check_non_negative_int
from . import checkpoint
from ..kernels.precision import DEFAULT_PRECISION, check_precision
from .functional import BACKENDS, resolve_backend, use_backend
from .layers import NOISE_MODES, Decoder, Encoder, NoiseBlock
from .vq import ResidualVectorQuantize

_Model = TypeVar("_Model", bound="SNACModel")


class SNACModel(nn.Module):
    """Multi-Scale Neural Audio Codec, offline (whole signals in, whole signals out).

    Takes the reference ``snac.SNAC`` keyword arguments. Audio is (B, 1, T) float at ``sampling_rate``;
    codes are a list of ``n_codebooks`` int64 tensors (B, T_i), coarse first, ``T_i = T_latent / vq_strides[i]``.

    ``noise_mode`` chooses how the decoder's noise blocks draw noise: ``"deterministic"`` (default; keyed by
    ``noise_seed`` and absolute sample position, so streaming equals offline), ``"torch"`` (``torch.randn``
    as the reference), or ``"off"``.

    ``backend`` picks the compute path: ``"auto"`` (default: the Triton kernels on CUDA, PyTorch elsewhere),
    ``"triton"`` or ``"torch"`` (the reference arithmetic, bit for bit). ``precision`` sets the products of
    the Triton kernels (dense convs and codebook search): ``"tf32x3"`` (default, about fp32), ``"ieee"`` or
    ``"tf32"`` (fastest, about 1e-3 relative error; PyTorch's own default for cuDNN convs). The PyTorch backend follows PyTorch's TF32 flags.
    """

    def __init__(
        self,
        sampling_rate: int = 44100,
        encoder_dim: int = 64,
        encoder_rates: Sequence[int] = (3, 3, 7, 7),
        latent_dim: Optional[int] = None,
        decoder_dim: int = 1536,
        decoder_rates: Sequence[int] = (7, 7, 3, 3),
        attn_window_size: Optional[int] = 32,
        codebook_size: int = 4096,
        codebook_dim: int = 8,
        vq_strides: Sequence[int] = (8, 4, 2, 1),
        noise: bool = True,
        depthwise: bool = True,
        *,
        noise_mode: str = "deterministic",
        noise_seed: int = 0,
        backend: str = "auto",
        precision: str = DEFAULT_PRECISION,
    ):
        super().__init__()
        self.config = SNACConfig(
            sampling_rate=sampling_rate, encoder_dim=encoder_dim, encoder_rates=list(encoder_rates),
            latent_dim=latent_dim, decoder_dim=decoder_dim, decoder_rates=list(decoder_rates),
            attn_window_size=attn_window_size, codebook_size=codebook_size, codebook_dim=codebook_dim,
            vq_strides=list(vq_strides), noise=noise, depthwise=depthwise,
        )
        cfg = self.config
        self.sampling_rate = cfg.sampling_rate
        self.encoder_dim = cfg.encoder_dim
        self.encoder_rates = cfg.encoder_rates
        self.decoder_dim = cfg.decoder_dim
        self.decoder_rates = cfg.decoder_rates
        self.latent_dim = cfg.resolved_latent_dim
        self.hop_length = cfg.hop_length
        self.n_codebooks = cfg.n_codebooks
        self.codebook_size = cfg.codebook_size
        self.codebook_dim = cfg.codebook_dim
        self.vq_strides = cfg.vq_strides
        self.attn_window_size = cfg.attn_window_size
        self.encoder = Encoder(cfg.encoder_dim, cfg.encoder_rates, depthwise=cfg.depthwise,
                               attn_window_size=cfg.attn_window_size)
        self.quantizer = ResidualVectorQuantize(self.latent_dim, cfg.codebook_size, cfg.codebook_dim, cfg.vq_strides)
        self.decoder = Decoder(self.latent_dim, cfg.decoder_dim, cfg.decoder_rates, cfg.noise,
                               depthwise=cfg.depthwise, attn_window_size=cfg.attn_window_size)
        self.noise_mode = noise_mode
        self.noise_seed = noise_seed
        self.backend = backend
        self.precision = precision
        self.name: Optional[str] = None  # where the weights came from, if loaded

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls: Type[_Model], config: SNACConfig | dict | str | os.PathLike, **kwargs: Any) -> _Model:
        """Build with random weights from a config object, dict, preset name (``"24khz"``) or config.json path."""
        if isinstance(config, (str, os.PathLike)):
            key = str(config).lower().removeprefix("snac_")
            if key in PRESETS:
                config = PRESETS[key]
            else:
                config = checkpoint.read_config(Path(config).parent if Path(config).is_file() else Path(config))
        if isinstance(config, dict):
            config = SNACConfig.from_dict(config)
        return cls(**config.to_dict(), **kwargs)

    @classmethod
    def from_pretrained(cls: Type[_Model], name_or_dir: str | os.PathLike, *, revision: Optional[str] = None,
                        cache_dir: Optional[str] = None, map_location: str | torch.device = "cpu",
                        **kwargs: Any) -> _Model:
        """Load official-format weights from a local directory, a hub id or a preset name, in eval mode.

        Directories hold ``config.json`` and ``pytorch_model.bin`` or ``model.safetensors``; weight norm in
        either key style is folded into plain weights. Hub ids (``hubertsiuzdak/snac_24khz``, ``_32khz``,
        ``_44khz``, or the short ``24khz``) go through ``huggingface_hub`` and its cache; offline with no
        cache, the error explains how to point at a local directory instead.
        """
        config, weights_path = checkpoint.locate(name_or_dir, revision=revision, cache_dir=cache_dir)
        model = cls(**config.to_dict(), **kwargs)
        state = checkpoint.fold_weight_norm(checkpoint.read_weights(weights_path))
        # Non-persistent buffers (rotary scale) are rebuilt by the constructor; everything else must match.
        _check_shapes(model, state, weights_path)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise checkpoint.CheckpointError(
                f"{weights_path} does not fit its config.json: "
                + (f"missing {_preview(result.missing_keys)}" if result.missing_keys else "")
                + ("; " if result.missing_keys and result.unexpected_keys else "")
                + (f"unexpected {_preview(result.unexpected_keys)}" if result.unexpected_keys else "")
            )
        model.name = str(name_or_dir)
        return model.to(map_location).eval()

    def save_pretrained(self, directory: str | os.PathLike, key_style: str = "legacy") -> Path:
        """Write ``config.json`` and ``pytorch_model.bin`` in the official format (weight norm split again)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        torch.save(checkpoint.unfold_weight_norm(self, key_style), directory / "pytorch_model.bin")
        return directory

    # ---- backend --------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self._backend = backend

    def resolved_backend(self, backend: Optional[str] = None) -> str:
        """The backend calls run on now: ``backend`` (or the model's) resolved against the model's device."""
        return resolve_backend(backend or self._backend, self.device)

    @property
    def precision(self) -> str:
        return self._precision

    @precision.setter
    def precision(self, precision: str) -> None:
        self._precision = check_precision(precision)

    def on_backend(self, backend: Optional[str] = None) -> ContextManager[None]:
        """The context every model call runs in: ``backend`` (or the model's), resolved against the model's
        device, with the model's precision."""
        return use_backend(self.resolved_backend(backend), self._precision)

    # ---- noise ----------------------------------------------------------------------------------
    @property
    def noise_mode(self) -> str:
        return self._noise_mode

    @noise_mode.setter
    def noise_mode(self, mode: str) -> None:
        if mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {mode!r}")
        self._noise_mode = mode
        for block in self._noise_blocks():
            block.mode = mode

    @property
    def noise_seed(self) -> int:
        return self._noise_seed

    @noise_seed.setter
    def noise_seed(self, seed: int) -> None:
        self._noise_seed = check_non_negative_int("noise_seed", seed)
        for block in self._noise_blocks():
            block.seed = seed

    def _noise_blocks(self) -> List[NoiseBlock]:
        return [m for m in self.decoder.modules() if isinstance(m, NoiseBlock)]

    # ---- offline codec --------------------------------------------------------------------------
    def preprocess(self, audio: torch.Tensor) -> torch.Tensor:
        """Right-pad (B, 1, T) with zeros to a multiple of ``config.pad_multiple`` samples, as the reference."""
        length = audio.shape[-1]
        multiple = self.config.pad_multiple
        return F.pad(audio, (0, -length % multiple))

    def encode(self, audio: torch.Tensor) -> List[torch.Tensor]:
        """(B, 1, T) float audio -> codes: ``n_codebooks`` int64 tensors (B, T_i), coarse first."""
        audio = self.check_audio(audio)
        return self._run_offline("encode", self._encode_padded, [self.preprocess(audio)])

    def decode(self, codes: Sequence[torch.Tensor]) -> torch.Tensor:
        """Codes (as ``encode`` returns) -> (B, 1, T_latent * hop_length) audio in [-1, 1]."""
        return self._run_offline("decode", self._decode_checked, self.check_codes(codes))

    def _encode_padded(self, audio: torch.Tensor) -> List[torch.Tensor]:
        with self.on_backend():
            _, codes = self.quantizer(self.encoder(audio))
        return codes

    def _decode_checked(self, *codes: torch.Tensor) -> torch.Tensor:
        with self.on_backend():
            return self.decoder(self.quantizer.from_codes(list(codes)))

    def _run_offline(self, name: str, fn: Any, inputs: List[torch.Tensor]) -> Any:
        """How ``encode`` / ``decode`` run their checked inputs: here, as called (``snac_stream.SNAC`` replays
        CUDA graphs of repeated shapes)."""
        return fn(*inputs)

    def forward(self, audio: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(B, 1, T) audio -> (reconstruction trimmed to T samples, codes)."""
        audio = self.check_audio(audio)
        length = audio.shape[-1]
        with self.on_backend():
            z = self.encoder(self.preprocess(audio))
            z_q, codes = self.quantizer(z)
            return self.decoder(z_q)[..., :length], codes

    # ---- input checks ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._first_parameter().device

    @property
    def dtype(self) -> torch.dtype:
        return self._first_parameter().dtype

    def _first_parameter(self) -> nn.Parameter:
        """The model's first parameter (``next(self.parameters())``), read from its place."""
        module, name = self._parameter_places()[0]
        return module._parameters[name]  # type: ignore[return-value]

    def _parameter_places(self) -> List[Tuple[nn.Module, str]]:
        """Where each parameter lives, (module, name) in ``parameters()`` order, found once: walking the modules
        takes about 14 us for the first parameter (a streaming push asks for the device five times) and 0.2 ms
        for all of them, while reading the places still sees a parameter replaced rather than updated
        (``load_state_dict(assign=True)``). Kept in ``__dict__``, so nothing is registered on the model."""
        places = self.__dict__.get("_places_of_parameters")
        if places is None:
            places = [(module, name) for module in self.modules()
                      for name, p in module._parameters.items() if p is not None]
            if not places:
                raise RuntimeError("the model has no parameters")
            self.__dict__["_places_of_parameters"] = places
        return places

    def check_audio(self, audio: Any, device: Optional[torch.device] = None) -> torch.Tensor:
        """Validate (B, 1, T) float audio and move it to ``device`` (default: the model's) and the model's
        dtype."""
        self.check_audio_shape(audio)
        audio = audio.to(device=self.device if device is None else device, dtype=self.dtype)
        if audio.numel():
            # The extremes are finite exactly when every sample is (NaN propagates): one reduction, without
            # isfinite's mask, an order of magnitude faster on the CPU, where a server checks every tick's input.
            # They are tested on the host: on a GPU, isfinite there launches several small kernels per call.
            low, high = torch.aminmax(audio)
            if not all(map(math.isfinite, torch.stack((low, high)).tolist())):
                raise ValueError("audio contains NaN or infinite samples")
        return audio

    @staticmethod
    def check_audio_shape(audio: Any, allow_empty: bool = False) -> None:
        """The type and shape half of :meth:`check_audio` (no pass over the samples): a float (B, 1, T)
        tensor; ``allow_empty``: T may be 0."""
        if not isinstance(audio, torch.Tensor):
            raise TypeError(f"audio must be a torch.Tensor of shape (B, 1, T), got {type(audio).__name__}")
        if not audio.is_floating_point():
            raise TypeError(
                f"audio must be floating point in [-1, 1], got {audio.dtype}; convert integer PCM first "
                "(e.g. pcm16.float() / 32768)"
            )
        if audio.dim() != 3:
            raise ValueError(f"audio must have shape (B, 1, T), got {audio.dim()} dims {tuple(audio.shape)}")
        if audio.shape[1] != 1:
            raise ValueError(
                f"audio must be mono with shape (B, 1, T), got {audio.shape[1]} channels; mix down first "
                "(audio.mean(dim=1, keepdim=True))"
            )
        if audio.shape[0] < 1 or (audio.shape[-1] < 1 and not allow_empty):
            raise ValueError(f"audio is empty: shape {tuple(audio.shape)}")

    def _check_code_range(self, codes: List[torch.Tensor]) -> None:
        """Raise if a code lies outside [0, codebook_size): checked where the codes are (on the host for codes
        from the host), with one device sync for codes on a GPU rather than two per level."""
        nonempty = [c.reshape(-1) for c in codes if c.numel()]
        if not nonempty:
            return
        if len({c.device for c in nonempty}) == 1:
            low, high = torch.stack(torch.aminmax(torch.cat(nonempty).long())).tolist()
            if 0 <= low and high < self.codebook_size:
                return
        for level, c in enumerate(codes):
            outside = (c < 0) | (c >= self.codebook_size)
            if outside.any():
                raise ValueError(f"codes[{level}] holds {c[outside][0].item()}, outside the codebook range "
                                 f"[0, {self.codebook_size})")

    def check_codes(self, codes: Any, *, whole_windows: bool = True, allow_empty: bool = False,
                    device: Optional[torch.device] = None) -> List[torch.Tensor]:
        """Validate a list of (B, T_i) integer codes with consistent lengths; move them to ``device`` (default:
        the model's).

        ``whole_windows``: with local attention, the decoder needs a whole number of attention windows.
        ``allow_empty``: accept zero frames (a streaming push may carry none).
        """
        if isinstance(codes, torch.Tensor) or not isinstance(codes, (list, tuple)):
            raise TypeError(f"codes must be a list of {self.n_codebooks} tensors (B, T_i), got {type(codes).__name__}")
        if len(codes) != self.n_codebooks:
            raise ValueError(f"this model has {self.n_codebooks} codebook levels, got {len(codes)} code tensors")
        checked = []
        for level, c in enumerate(codes):
            if not isinstance(c, torch.Tensor):
                raise TypeError(f"codes[{level}] must be a torch.Tensor, got {type(c).__name__}")
            if c.is_floating_point() or c.is_complex() or c.dtype == torch.bool:
                raise TypeError(f"codes[{level}] must be an integer tensor, got {c.dtype}")
            if c.dim() != 2:
                raise ValueError(f"codes[{level}] must have shape (B, T_{level}), got {tuple(c.shape)}")
            checked.append(c)
        batch, frames = checked[0].shape
        coarse = self.vq_strides[0]
        for level, (c, stride) in enumerate(zip(checked, self.vq_strides)):
            expected = frames * coarse // stride
            if c.shape != (batch, expected):
                raise ValueError(
                    f"codes[{level}] has shape {tuple(c.shape)}, expected ({batch}, {expected}): level {level} "
                    f"holds {coarse // stride} codes per coarse frame and codes[0] has {frames} coarse frames"
                )
        self._check_code_range(checked)
        if frames == 0 and not allow_empty:
            raise ValueError("codes hold no frames")
        target = self.device if device is None else device
        checked = [c.to(device=target, dtype=torch.int64) for c in checked]
        window = self.attn_window_size
        if whole_windows and window and (frames * coarse) % window:
            step = math.lcm(coarse, window) // coarse
            raise ValueError(
                f"this model's decoder attends over windows of {window} latent frames: the number of coarse "
                f"frames must be a multiple of {step}, got {frames}"
            )
        return checked


def _check_shapes(model: nn.Module, state: dict, path: Path) -> None:
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise checkpoint.CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)} but config.json implies {tuple(own[key].shape)}"
            )


def _preview(keys: List[str], limit: int = 4) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
