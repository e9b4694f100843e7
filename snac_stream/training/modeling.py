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
from ..streaming import SNAC
from ..model.functional import use_backend
from ..model.layers import NoiseBlock, ResidualUnit

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


def init_weights(model: SNAC, branch_std: float = 0.02, output_gain: float = 0.1) -> SNAC:
    """Initialise a SNAC for training from scratch (in place; returns it).

    Main-path convs (encoder and decoder stems, strided and transposed convs, the VQ projections) get
    variance-preserving weights, normal with std ``1 / sqrt(fan_in)`` (fan_in: the inputs one output reads;
    for a transposed conv of stride s, C_in * kernel / s); the convs inside residual units and noise blocks
    get DAC's truncated normal of std ``branch_std``, so every residual unit starts near the identity; the
    last decoder conv gets ``output_gain`` times the variance-preserving std, so the output starts quiet,
    away from the tanh's saturation. Biases start at zero.

    DAC's own init (truncated normal, std 0.02, on every conv) does not suit SNAC's depthwise layout: the
    depthwise stems (fan_in 7) and narrow strided convs shrink the encoder output to about 1e-6 of the input,
    so the first Adam step's bias updates (about lr each) swamp the signal, every frame's latent points the
    same way and each codebook collapses to a single code.
    """
    residual_convs = set()
    for module in model.modules():
        if isinstance(module, ResidualUnit):
            residual_convs.update(id(m) for m in module.modules() if isinstance(m, _CONVS))
        if isinstance(module, NoiseBlock):
            residual_convs.add(id(module.linear))
    output_conv = [m for m in model.decoder.modules() if isinstance(m, nn.Conv1d)][-1]
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, _CONVS):
                continue
            if id(module) in residual_convs:
                nn.init.trunc_normal_(module.weight, std=branch_std)
            else:
                kernel = module.kernel_size[0]
                if isinstance(module, nn.ConvTranspose1d):
                    fan_in = module.in_channels * kernel / module.stride[0]
                else:
                    fan_in = module.in_channels // module.groups * kernel
                std = fan_in ** -0.5 * (output_gain if module is output_conv else 1.0)
                nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def build_training_model(config: SNACConfig, init_state: Dict[str, torch.Tensor] | None = None,
                         noise_mode: str = "torch") -> SNAC:
    """A SNAC of ``config`` on the PyTorch backend, in train mode with weight norm on every conv.

    From scratch (``init_state`` None) the weights start as ``init_weights`` sets them; otherwise
    ``init_state`` (plain folded weights) is loaded.
    """
    model = SNAC.from_config(config, backend="torch", noise_mode=noise_mode)
    if init_state is None:
        init_weights(model)
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
