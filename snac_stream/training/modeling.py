"""The model side of training: weight norm on and off, and the differentiable forward pass.

``SNAC`` keeps folded plain conv weights and its quantizer is inference-only: it returns
``out_proj(z_e + (z_q - z_e))`` without the straight-through ``detach``, so no gradient reaches the encoder
through it, and it computes no VQ losses. The encoder and decoder are ordinary differentiable modules on the
PyTorch backend (the default outside ``SNAC.encode``/``decode``), so ``training_forward`` calls them directly
and runs its own residual VQ with the quantizer's parameters, as the reference (``snac/vq.py``) and DAC train:
average-pool the residual by the level's stride, ``in_proj``, nearest codebook entry by cosine similarity,
commitment loss ``mse(z_e, e.detach())`` and codebook loss ``mse(e, z_e.detach())`` against the raw codebook
vector ``e``, straight-through ``z_e + (e - z_e).detach()``, ``out_proj``, repeat by the stride.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from ..config import SNACConfig
from ..model import SNAC
from ..model.functional import use_backend

_CONVS = (nn.Conv1d, nn.ConvTranspose1d)


def add_weight_norm(model: nn.Module) -> nn.Module:
    """Put weight norm (``torch.nn.utils.parametrizations.weight_norm``, dim 0) on every Conv1d and
    ConvTranspose1d, as the reference model trains: ``weight = g * v / ||v||`` starting from the current
    weight. In place; returns ``model``."""
    for module in model.modules():
        if isinstance(module, _CONVS) and not parametrize.is_parametrized(module, "weight"):
            weight_norm(module)
    return model


def folded_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """State dict of a weight-normed model with every parametrized weight folded into a plain ``weight``
    (detached copies; the model is left as it is)."""
    state: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if ".parametrizations." not in key:
                state[key] = value.detach().clone()
        for name, module in model.named_modules():
            if parametrize.is_parametrized(module, "weight"):
                state[f"{name}.weight" if name else "weight"] = module.weight.detach().clone()
    return state


def export_model(model: SNAC, device: torch.device | str = "cpu") -> SNAC:
    """A plain (folded, eval-mode) copy of a training model: what ``SNAC.from_pretrained`` of the saved
    checkpoint gives, with the default deterministic noise."""
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: keep the training RNG as it is
        plain = SNAC.from_config(model.config, backend="torch")
    plain.load_state_dict(folded_state_dict(model))
    return plain.to(device).eval()


def build_training_model(config: SNACConfig, init_state: Dict[str, torch.Tensor] | None = None,
                         noise_mode: str = "torch") -> SNAC:
    """A SNAC of ``config`` on the PyTorch backend, in train mode with weight norm on every conv.

    From scratch (``init_state`` None) the convs start as DAC initialises them (truncated normal, std 0.02,
    zero bias); otherwise ``init_state`` (plain folded weights) is loaded.
    """
    model = SNAC.from_config(config, backend="torch", noise_mode=noise_mode)
    if init_state is None:
        for module in model.modules():
            if isinstance(module, nn.Conv1d):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    else:
        model.load_state_dict(init_state)
    return add_weight_norm(model).train()


@dataclass
class ForwardOutput:
    audio: torch.Tensor  # (B, 1, T) reconstruction
    codes: List[torch.Tensor]  # per level (B, T_i)
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor


def quantize(model: SNAC, z: torch.Tensor):
    """Residual VQ of latents ``z`` (B, D, T) with straight-through gradients: (z_q, codes, commitment loss,
    codebook loss), the losses summed over levels (each a mean over its elements)."""
    z_q = torch.zeros_like(z)
    residual = z
    codes: List[torch.Tensor] = []
    commitment = z.new_zeros(())
    codebook_loss = z.new_zeros(())
    for vq in model.quantizer.quantizers:
        r = F.avg_pool1d(residual, vq.stride, vq.stride) if vq.stride > 1 else residual
        z_e = vq.in_proj(r)
        with torch.no_grad():
            indices = vq.nearest(z_e.detach())
        e = vq.decode_code(indices)  # raw codebook vectors (B, codebook_dim, T_i)
        commitment = commitment + F.mse_loss(z_e, e.detach())
        codebook_loss = codebook_loss + F.mse_loss(e, z_e.detach())
        z_q_i = vq.out_proj(z_e + (e - z_e).detach())
        if vq.stride > 1:
            z_q_i = z_q_i.repeat_interleave(vq.stride, dim=-1)
        z_q = z_q + z_q_i
        residual = residual - z_q_i
        codes.append(indices)
    return z_q, codes, commitment, codebook_loss


def training_forward(model: SNAC, audio: torch.Tensor) -> ForwardOutput:
    """Differentiable encode -> residual VQ -> decode of (B, 1, T) audio, T a multiple of
    ``model.config.pad_multiple``. The VQ runs in fp32 even under autocast (code choice and its losses)."""
    if audio.shape[-1] % model.config.pad_multiple:
        raise ValueError(f"training audio length {audio.shape[-1]} must be a multiple of "
                         f"{model.config.pad_multiple} samples")
    with use_backend("torch"):
        z = model.encoder(audio)
        with torch.autocast(audio.device.type, enabled=False):
            z_q, codes, commitment, codebook_loss = quantize(model, z.float())
        audio_hat = model.decoder(z_q)
    return ForwardOutput(audio_hat, codes, commitment, codebook_loss)
