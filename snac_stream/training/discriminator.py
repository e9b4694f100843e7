"""Multi-scale complex-STFT discriminator (DAC's multi-band "MRD"), for the optional adversarial loss.

One sub-discriminator per window length (2048, 1024, 512 by default; hop = window / 4). Each takes the
complex STFT (real and imaginary parts as two channels, frames x bins), splits the bins into five bands
(0-10-25-50-75-100 % of Nyquist), runs each band through its own stack of weight-normed 2-D convs with
leaky ReLU (frequency strides of 2), concatenates the bands along frequency and ends in a 1-channel conv.
Inputs are DC-removed and peak-normalised to 0.8, as DAC does.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

BANDS: Tuple[Tuple[float, float], ...] = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))


def _conv2d(*args, **kwargs) -> nn.Conv2d:
    return weight_norm(nn.Conv2d(*args, **kwargs))


class STFTDiscriminator(nn.Module):
    def __init__(self, window_length: int, channels: int = 32, bands: Sequence[Tuple[float, float]] = BANDS):
        super().__init__()
        self.window_length = window_length
        self.hop_length = window_length // 4
        self.register_buffer("window", torch.hann_window(window_length), persistent=False)
        n_bins = window_length // 2 + 1
        self.bands = [(int(lo * n_bins), int(hi * n_bins)) for lo, hi in bands]

        def stack() -> nn.ModuleList:
            return nn.ModuleList([
                _conv2d(2, channels, (3, 9), (1, 1), padding=(1, 4)),
                _conv2d(channels, channels, (3, 9), (1, 2), padding=(1, 4)),
                _conv2d(channels, channels, (3, 9), (1, 2), padding=(1, 4)),
                _conv2d(channels, channels, (3, 9), (1, 2), padding=(1, 4)),
                _conv2d(channels, channels, (3, 3), (1, 1), padding=(1, 1)),
            ])

        self.band_convs = nn.ModuleList([stack() for _ in self.bands])
        self.conv_post = _conv2d(channels, 1, (3, 3), (1, 1), padding=(1, 1))

    def forward(self, audio: torch.Tensor) -> List[torch.Tensor]:
        """(B, 1, T) audio -> feature maps of every layer, the logits (B, 1, frames, bins') last."""
        x = audio.reshape(-1, audio.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            pad_mode = "reflect" if x.shape[-1] > self.window_length // 2 else "constant"
            spec = torch.stft(x.float(), self.window_length, self.hop_length, window=self.window, center=True,
                              pad_mode=pad_mode, return_complex=True)
        x = torch.view_as_real(spec).permute(0, 3, 2, 1)  # (B, 2, frames, bins)
        features: List[torch.Tensor] = []
        outputs = []
        for (lo, hi), stack in zip(self.bands, self.band_convs):
            band = x[..., lo:hi]
            for layer in stack:
                band = F.leaky_relu(layer(band), 0.1)
                features.append(band)
            outputs.append(band)
        logits = self.conv_post(torch.cat(outputs, dim=-1))
        features.append(logits)
        return features


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, windows: Sequence[int] = (2048, 1024, 512), channels: int = 32):
        super().__init__()
        self.discriminators = nn.ModuleList([STFTDiscriminator(w, channels) for w in windows])

    @staticmethod
    def preprocess(audio: torch.Tensor) -> torch.Tensor:
        audio = audio - audio.mean(dim=-1, keepdim=True)
        return 0.8 * audio / (audio.abs().amax(dim=-1, keepdim=True) + 1e-9)

    def forward(self, audio: torch.Tensor) -> List[List[torch.Tensor]]:
        audio = self.preprocess(audio)
        return [d(audio) for d in self.discriminators]
