"""Model configurations: the official presets and the arithmetic that follows from a config.

Every figure here (hop, token rates, bitrate) is derived from the config, never typed in.
"""

from __future__ import annotations

import dataclasses

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple



def check_non_negative_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 0 (not a bool), else a ValueError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value

@dataclass(frozen=True)
class SNACConfig:
    """The keyword arguments of the reference ``snac.SNAC`` constructor, with its defaults."""

    sampling_rate: int = 44100
    encoder_dim: int = 64
    encoder_rates: List[int] = field(default_factory=lambda: [3, 3, 7, 7])
    latent_dim: Optional[int] = None
    decoder_dim: int = 1536
    decoder_rates: List[int] = field(default_factory=lambda: [7, 7, 3, 3])
    attn_window_size: Optional[int] = 32
    codebook_size: int = 4096
    codebook_dim: int = 8
    vq_strides: List[int] = field(default_factory=lambda: [8, 4, 2, 1])
    noise: bool = True
    depthwise: bool = True

    def __post_init__(self) -> None:
        # Lists arrive from JSON or callers; freeze them as lists of ints for hashing-free equality.
        for name in ("encoder_rates", "decoder_rates", "vq_strides"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"{name} must be a non-empty list of positive ints, got {value!r}")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
                raise ValueError(f"{name} must hold positive ints, got {value!r}")
            object.__setattr__(self, name, [int(v) for v in value])
        for name in ("sampling_rate", "encoder_dim", "decoder_dim", "codebook_size", "codebook_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.attn_window_size is not None and (
            not isinstance(self.attn_window_size, int) or self.attn_window_size < 1
        ):
            raise ValueError(f"attn_window_size must be a positive int or None, got {self.attn_window_size!r}")
        encoder_out = self.encoder_dim * 2 ** len(self.encoder_rates)
        if self.latent_dim is not None and self.latent_dim != encoder_out:
            raise ValueError(
                f"latent_dim {self.latent_dim} must equal encoder_dim * 2**len(encoder_rates) = {encoder_out} "
                "(the encoder's output width feeds the quantizer)"
            )
        if math.prod(self.encoder_rates) != math.prod(self.decoder_rates):
            raise ValueError(
                f"encoder_rates {self.encoder_rates} and decoder_rates {self.decoder_rates} must have the same "
                "product (the hop length), or decoded audio would not match the input length"
            )
        coarse = self.vq_strides[0]
        if any(coarse % s for s in self.vq_strides):
            raise ValueError(
                f"vq_strides {self.vq_strides}: every stride must divide the first (coarsest) one, "
                "otherwise the residual levels do not line up frame by frame"
            )
        if self.decoder_dim % 2 ** len(self.decoder_rates):
            raise ValueError(
                f"decoder_dim {self.decoder_dim} must be divisible by 2**{len(self.decoder_rates)} "
                "(each decoder block halves the width)"
            )
        if self.attn_window_size is not None:
            for name, dim in (("latent", self.resolved_latent_dim), ("decoder_dim", self.decoder_dim)):
                if dim % 64:
                    raise ValueError(
                        f"local attention uses 64-wide heads: {name} width {dim} must be a multiple of 64"
                    )

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "SNACConfig":
        unknown = set(config) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown SNAC config keys: {sorted(unknown)}")
        return cls(**config)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def resolved_latent_dim(self) -> int:
        return self.latent_dim if self.latent_dim is not None else self.encoder_dim * 2 ** len(self.encoder_rates)

    @property
    def hop_length(self) -> int:
        """Audio samples per latent (finest) frame."""
        return math.prod(self.encoder_rates)

    @property
    def n_codebooks(self) -> int:
        return len(self.vq_strides)

    @property
    def coarse_stride(self) -> int:
        """Latent frames per coarse frame (one code of the first level)."""
        return self.vq_strides[0]

    @property
    def codes_per_frame(self) -> Tuple[int, ...]:
        """Codes of each level per coarse frame (coarse level first: 1, then 2, 4, ...)."""
        return tuple(self.coarse_stride // s for s in self.vq_strides)

    @property
    def frame_codes(self) -> int:
        """Codes per coarse frame, all levels together (7 at 24 kHz)."""
        return sum(self.codes_per_frame)

    @property
    def frame_samples(self) -> int:
        """Audio samples per coarse frame."""
        return self.hop_length * self.coarse_stride

    @property
    def pad_multiple(self) -> int:
        """Offline encode pads the audio to a multiple of this many samples (as the reference does)."""
        return self.hop_length * math.lcm(self.coarse_stride, self.attn_window_size or 1)

    @property
    def token_rates_hz(self) -> List[float]:
        """Codes per second of each level, coarse first."""
        return [self.sampling_rate / (self.hop_length * s) for s in self.vq_strides]

    @property
    def bitrate_bps(self) -> float:
        return sum(self.token_rates_hz) * math.log2(self.codebook_size)


# The configs published with the official checkpoints (config.json of each hub repository).
_MUSIC = SNACConfig(
    sampling_rate=32000,
    encoder_dim=64,
    encoder_rates=[2, 3, 8, 8],
    decoder_dim=1536,
    decoder_rates=[8, 8, 3, 2],
    attn_window_size=32,
    codebook_size=4096,
    codebook_dim=8,
    vq_strides=[8, 4, 2, 1],
    noise=True,
    depthwise=True,
)

PRESETS: Dict[str, SNACConfig] = {
    "24khz": SNACConfig(
        sampling_rate=24000,
        encoder_dim=48,
        encoder_rates=[2, 4, 8, 8],
        decoder_dim=1024,
        decoder_rates=[8, 8, 4, 2],
        attn_window_size=None,
        codebook_size=4096,
        codebook_dim=8,
        vq_strides=[4, 2, 1],
        noise=True,
        depthwise=True,
    ),
    "32khz": _MUSIC,
    # The 44.1 kHz model has the 32 kHz model's architecture; only the sample rate differs.
    "44khz": dataclasses.replace(_MUSIC, sampling_rate=44100),
}

HUB_IDS: Dict[str, str] = {
    "24khz": "hubertsiuzdak/snac_24khz",
    "32khz": "hubertsiuzdak/snac_32khz",
    "44khz": "hubertsiuzdak/snac_44khz",
}

# Models that ship inside the package (snac_stream/weights/NAME: config.json + model.safetensors) and load by
# name without the hub. ``mini`` is snac-stream's own small 24 kHz model (docs/mini_model.md), trained with
# ``snac-stream train``: not the official weights, so its codes mean nothing to models trained on those
# (Orpheus TTS among them).
BUNDLED_MODELS = ("mini",)
