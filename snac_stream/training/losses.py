"""Reconstruction and adversarial losses: multi-scale log-mel L1, waveform L1, GAN and feature matching.

The mel filterbank is built here (no torchaudio): Slaney's mel scale (linear below 1 kHz, logarithmic
above; Auditory Toolbox) with Slaney area normalisation (each triangle has unit area in Hz), the same
filters as ``librosa.filters.mel(sr, n_fft, n_mels)`` with its defaults (``htk=False, norm="slaney"``).
"""

from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Slaney's mel scale: 200/3 Hz per mel up to 1 kHz (15 mels), then 27 mels per factor 6.4.
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOG_STEP = math.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOG_STEP
    return np.where(hz >= _MIN_LOG_HZ, log, linear)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _F_SP
    log = _MIN_LOG_HZ * np.exp(_LOG_STEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log, linear)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int = 80, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) float32 triangular filters on the Slaney mel scale, Slaney-normalised.

    Filters narrower than an FFT bin may come out empty (all zeros) at small ``n_fft``; the log-mel loss
    clamps them to the same floor on both sides, so they add nothing.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    hz_points = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    widths = np.diff(hz_points)
    ramps = hz_points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_points[2:] - hz_points[:-2]))[:, None]
    return torch.from_numpy(weights).float()


class MultiScaleMelLoss(nn.Module):
    """Sum over FFT sizes of the L1 distance of log10 mel magnitudes (DAC's mel loss, log term only).

    Each scale: periodic Hann window of ``n_fft`` samples, hop ``n_fft // 4``, centred frames (reflect
    padding), magnitude STFT, ``n_mels`` Slaney mel filters up to Nyquist, ``log10(max(mel, 1e-5))``.
    Computed in fp32 whatever the autocast state.
    """

    def __init__(self, sample_rate: int, n_ffts: Sequence[int] = (512, 1024, 2048), n_mels: int = 80,
                 clamp_eps: float = 1e-5):
        super().__init__()
        self.sample_rate = sample_rate
        self.n_ffts = list(n_ffts)
        self.clamp_eps = clamp_eps
        for n_fft in self.n_ffts:
            self.register_buffer(f"window_{n_fft}", torch.hann_window(n_fft), persistent=False)
            self.register_buffer(f"mel_{n_fft}", mel_filterbank(sample_rate, n_fft, n_mels), persistent=False)

    def log_mel(self, audio: torch.Tensor, n_fft: int) -> torch.Tensor:
        """(B, 1, T) or (B, T) audio -> (B, n_mels, frames) log10 mel magnitudes."""
        x = audio.reshape(-1, audio.shape[-1]).float()
        pad_mode = "reflect" if x.shape[-1] > n_fft // 2 else "constant"
        spec = torch.stft(x, n_fft, hop_length=n_fft // 4, window=getattr(self, f"window_{n_fft}"), center=True,
                          pad_mode=pad_mode, return_complex=True).abs()
        mel = torch.matmul(getattr(self, f"mel_{n_fft}"), spec)
        return mel.clamp(min=self.clamp_eps).log10()

    def forward(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(y.device.type, enabled=False):
            loss = y_hat.new_zeros((), dtype=torch.float32)
            for n_fft in self.n_ffts:
                loss = loss + F.l1_loss(self.log_mel(y_hat, n_fft), self.log_mel(y, n_fft))
        return loss


def discriminator_loss(real: List[List[torch.Tensor]], fake: List[List[torch.Tensor]],
                       kind: str = "lsgan") -> torch.Tensor:
    """Discriminator loss summed over sub-discriminators; each list entry is one's feature maps, logits last.

    ``lsgan``: mean((1 - D(real))^2) + mean(D(fake)^2) (DAC); ``hinge``: mean(relu(1 - D(real))) +
    mean(relu(1 + D(fake))).
    """
    loss = 0.0
    for r, f in zip(real, fake):
        r_logits, f_logits = r[-1].float(), f[-1].float()
        if kind == "hinge":
            loss = loss + F.relu(1 - r_logits).mean() + F.relu(1 + f_logits).mean()
        else:
            loss = loss + ((1 - r_logits) ** 2).mean() + (f_logits ** 2).mean()
    return loss


def generator_losses(real: List[List[torch.Tensor]], fake: List[List[torch.Tensor]],
                     kind: str = "lsgan") -> tuple[torch.Tensor, torch.Tensor]:
    """(adversarial loss, feature-matching loss) of the generator, summed over sub-discriminators.

    Adversarial: ``lsgan`` mean((1 - D(fake))^2), ``hinge`` -mean(D(fake)). Feature matching: L1 between every
    intermediate feature map of fake and (detached) real audio, as DAC.
    """
    adversarial, features = 0.0, 0.0
    for r, f in zip(real, fake):
        f_logits = f[-1].float()
        adversarial = adversarial + (-f_logits.mean() if kind == "hinge" else ((1 - f_logits) ** 2).mean())
        for r_map, f_map in zip(r[:-1], f[:-1]):
            features = features + F.l1_loss(f_map.float(), r_map.detach().float())
    return adversarial, features
