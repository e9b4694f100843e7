"""Offline SNAC building blocks, laid out exactly as the reference so state-dict keys match.

Weight norm is folded into plain ``weight`` tensors at load time (see ``checkpoint.py``), so every conv
here is a plain ``nn.Conv1d`` / ``nn.ConvTranspose1d``. Module order inside each ``nn.Sequential`` follows
the reference: ``encoder.block.N`` / ``decoder.model.N`` indices are part of the checkpoint format.

Shapes: activations are (B, C, T) with T in frames of the layer's own rate.
"""

from __future__ import annotations

import math
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..kernels.rows import Context
from .attention import LocalMHA
from .functional import conv, current_backend, snake_layer
from .noise import layer_seed, positional_randn

NOISE_MODES = ("deterministic", "torch", "off")


class Snake1d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return snake_layer(x, self.alpha)


def conv1d(in_ch: int, out_ch: int, kernel_size: int, **kwargs) -> nn.Conv1d:
    return nn.Conv1d(in_ch, out_ch, kernel_size, **kwargs)


def conv_shape(layer: nn.Conv1d) -> dict:
    """The keyword arguments of ``functional.conv`` that describe ``layer`` (padding aside)."""
    return {"groups": layer.groups, "stride": layer.stride[0], "dilation": layer.dilation[0]}


def fold_layers(layers: nn.Sequential) -> Iterator[Tuple[nn.Module, Optional[torch.Tensor], Optional[str]]]:
    """The layers of ``layers`` as (layer, snake alpha before it, activation after it).

    Each snake directly before a conv or transposed conv becomes that layer's ``alpha``, and a tanh directly
    after a conv its ``activation``; every other layer comes alone: ``(layer, None, None)``.
    """
    items = list(layers)
    i = 0
    while i < len(items):
        layer, alpha = items[i], None
        if (isinstance(layer, Snake1d) and i + 1 < len(items)
                and isinstance(items[i + 1], (nn.Conv1d, nn.ConvTranspose1d))):
            alpha, i = layer.alpha, i + 1
            layer = items[i]
        tanh = isinstance(layer, nn.Conv1d) and i + 1 < len(items) and isinstance(items[i + 1], nn.Tanh)
        yield layer, alpha, "tanh" if tanh else None
        i += 2 if tanh else 1


def run_layers(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run ``layers`` in order; on the Triton backend, fold each snake (and a final tanh) into its conv."""
    if current_backend() != "triton":
        return layers(x)
    for layer, alpha, activation in fold_layers(layers):
        if isinstance(layer, nn.Conv1d):
            x = conv(x, layer.weight, layer.bias, padding=layer.padding[0], alpha=alpha, activation=activation,
                     **conv_shape(layer))
        else:
            x = layer(x if alpha is None else snake_layer(x, alpha))
    return x


class NoiseBlock(nn.Module):
    """``x + n * linear(x)`` with ``n`` of shape (B, 1, T).

    ``mode`` (set through ``SNAC.noise_mode``): ``"deterministic"`` draws ``n`` from the (seed, layer, absolute
    position) counter so chunked decoding reproduces offline decoding; ``"torch"`` calls ``torch.randn`` as
    the reference does; ``"off"`` adds nothing.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.linear = conv1d(dim, dim, 1, bias=False)
        self.mode = "deterministic"
        self.seed = 0
        self.layer = 0  # index among the decoder's noise blocks, set by the decoder

    def noise(self, batch: int, start: int | torch.Tensor, length: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """Noise for positions ``start .. start+length-1`` of this layer, shape (B or 1, 1, length).

        ``start`` is an int, or an int64 tensor (B,) of per-stream positions (deterministic mode).
        """
        if self.mode == "off":
            return None
        if self.mode == "torch":
            return torch.randn((batch, 1, length), device=like.device, dtype=like.dtype)
        n = positional_randn(layer_seed(self.seed, self.layer), start, length, like.device)
        return n.to(like.dtype).view(-1, 1, length)

    def apply_at(self, x: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """Noise block on a chunk whose first frame sits at absolute position ``start``."""
        if self.mode == "deterministic" and current_backend() == "triton":
            # One fused kernel: x + noise(position) * linear(x).
            return conv(x, self.linear.weight, noise_seed=layer_seed(self.seed, self.layer), noise_start=start,
                        residual=x)
        n = self.noise(x.shape[0], start, x.shape[-1], x)
        if n is None:
            return x
        h = self.linear(x)
        return x + n * h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_at(x, 0)


class ResidualUnit(nn.Module):
    """Snake, dilated (depthwise) conv k=7, snake, 1x1 conv, plus the input."""

    def __init__(self, dim: int = 16, dilation: int = 1, kernel: int = 7, groups: int = 1):
        super().__init__()
        self.pad = ((kernel - 1) * dilation) // 2
        self.block = nn.Sequential(
            Snake1d(dim),
            conv1d(dim, dim, kernel, dilation=dilation, padding=self.pad, groups=groups),
            Snake1d(dim),
            conv1d(dim, dim, 1),
        )

    def fused_forward(self, x: torch.Tensor, *, context: Optional[Context] = None, padding: int = 0,
                      length: Optional[int] = None) -> torch.Tensor:
        """The unit as two fused convs over ``cat(context, x)`` zero-padded by ``padding`` frames on each side:
        (B, C, T) input and (B, C, L) context -> (B, C, length) (default: every output the padded input gives).

        Output ``j`` is centred on input ``j + pad - padding``, which is also where its skip input sits, so
        the streaming cache of the dilated conv doubles as the residual delay line.
        """
        snake1, dilated, snake2, pointwise = self.block
        h = conv(x, dilated.weight, dilated.bias, groups=dilated.groups, dilation=dilated.dilation[0],
                 padding=padding, context=context, length=length, alpha=snake1.alpha, alpha_out=snake2.alpha)
        return conv(h, pointwise.weight, pointwise.bias, residual=x, residual_context=context,
                    residual_offset=self.pad - padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if current_backend() == "triton":
            return self.fused_forward(x, padding=self.pad)
        y = self.block(x)
        pad = (x.shape[-1] - y.shape[-1]) // 2
        if pad > 0:
            x = x[..., pad:-pad]
        return x + y


class EncoderBlock(nn.Module):
    """Three residual units then a strided conv (kernel 2s, stride s): T -> T / s frames."""

    def __init__(self, output_dim: int = 16, input_dim: Optional[int] = None, stride: int = 1, groups: int = 1):
        super().__init__()
        input_dim = input_dim or output_dim // 2
        self.block = nn.Sequential(
            ResidualUnit(input_dim, dilation=1, groups=groups),
            ResidualUnit(input_dim, dilation=3, groups=groups),
            ResidualUnit(input_dim, dilation=9, groups=groups),
            Snake1d(input_dim),
            conv1d(input_dim, output_dim, 2 * stride, stride=stride, padding=math.ceil(stride / 2)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_layers(self.block, x)


class DecoderBlock(nn.Module):
    """Snake, transposed conv (kernel 2s, stride s): T -> T * s, optional noise, three residual units."""

    def __init__(self, input_dim: int = 16, output_dim: int = 8, stride: int = 1, noise: bool = False, groups: int = 1):
        super().__init__()
        layers: List[nn.Module] = [
            Snake1d(input_dim),
            nn.ConvTranspose1d(
                input_dim,
                output_dim,
                kernel_size=2 * stride,
                stride=stride,
                padding=math.ceil(stride / 2),
                output_padding=stride % 2,
            ),
        ]
        if noise:
            layers.append(NoiseBlock(output_dim))
        layers += [
            ResidualUnit(output_dim, dilation=1, groups=groups),
            ResidualUnit(output_dim, dilation=3, groups=groups),
            ResidualUnit(output_dim, dilation=9, groups=groups),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_layers(self.block, x)


class Encoder(nn.Module):
    """(B, 1, T samples) -> (B, latent_dim, T / hop frames)."""

    def __init__(self, d_model: int = 64, strides: List[int] = (3, 3, 7, 7), depthwise: bool = False,
                 attn_window_size: Optional[int] = 32):
        super().__init__()
        layers: List[nn.Module] = [conv1d(1, d_model, 7, padding=3)]
        for stride in strides:
            d_model *= 2
            groups = d_model // 2 if depthwise else 1
            layers.append(EncoderBlock(output_dim=d_model, stride=stride, groups=groups))
        if attn_window_size is not None:
            layers.append(LocalMHA(dim=d_model, window_size=attn_window_size))
        groups = d_model if depthwise else 1
        layers.append(conv1d(d_model, d_model, 7, padding=3, groups=groups))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_layers(self.block, x)


class Decoder(nn.Module):
    """(B, latent_dim, T frames) -> (B, 1, T * hop samples), tanh-bounded."""

    def __init__(self, input_channel: int, channels: int, rates: List[int], noise: bool = False,
                 depthwise: bool = False, attn_window_size: Optional[int] = 32, d_out: int = 1):
        super().__init__()
        if depthwise:
            layers: List[nn.Module] = [
                conv1d(input_channel, input_channel, 7, padding=3, groups=input_channel),
                conv1d(input_channel, channels, 1),
            ]
        else:
            layers = [conv1d(input_channel, channels, 7, padding=3)]
        if attn_window_size is not None:
            layers.append(LocalMHA(dim=channels, window_size=attn_window_size))
        output_dim = channels
        for i, stride in enumerate(rates):
            input_dim = channels // 2**i
            output_dim = channels // 2 ** (i + 1)
            groups = output_dim if depthwise else 1
            layers.append(DecoderBlock(input_dim, output_dim, stride, noise, groups=groups))
        layers += [Snake1d(output_dim), conv1d(output_dim, d_out, 7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        for index, block in enumerate(m for m in self.modules() if isinstance(m, NoiseBlock)):
            block.layer = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_layers(self.model, x)
