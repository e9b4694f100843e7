"""Map the offline model's modules onto streaming ops that share their weights."""

from __future__ import annotations

from typing import List

from torch import nn

from ..model.attention import LocalMHA
from ..model.layers import (Decoder, DecoderBlock, Encoder, EncoderBlock, NoiseBlock, ResidualUnit, Snake1d,
                            fold_layers)
from ..model.snac import SNACModel
from .ops import Blockwise, Chain, ConvTranspose, Noise, Pointwise, Quantize, SlidingWindow, StreamOp


def _sequence(layers: nn.Sequential, channels: int) -> Chain:
    """Ops for a Sequential, each snake folded into the (transposed) conv after it and a final tanh into the conv
    before."""
    ops: List[StreamOp] = []
    folded = list(fold_layers(layers))
    for i, (layer, alpha, activation) in enumerate(folded):
        if isinstance(layer, nn.Conv1d):
            op: StreamOp = SlidingWindow.conv(layer, alpha, activation)
        elif isinstance(layer, nn.ConvTranspose1d):
            # The noise block's kernel reads the upsampling's samples where the product wrote them.
            feeds_noise = i + 1 < len(folded) and isinstance(folded[i + 1][0], NoiseBlock)
            op = ConvTranspose(layer, alpha, channels_last=feeds_noise)
        else:
            op = stream_op(layer, channels)
        ops.append(op)
        channels = op.out_channels
    return Chain(ops)


def stream_op(module: nn.Module, channels: int) -> StreamOp:
    """Streaming op for ``module``, whose input has ``channels`` channels."""
    if isinstance(module, nn.Sequential):
        return _sequence(module, channels)
    if isinstance(module, ResidualUnit):
        return SlidingWindow.residual_unit(module, channels)
    if isinstance(module, nn.Conv1d):
        return SlidingWindow.conv(module)
    if isinstance(module, nn.ConvTranspose1d):
        return ConvTranspose(module)
    if isinstance(module, (Snake1d, nn.Tanh)):
        return Pointwise(module, channels)
    if isinstance(module, NoiseBlock):
        return Noise(module, channels)
    if isinstance(module, LocalMHA):
        return Blockwise(module, module.window_size, channels, channels, "local-attention window")
    if isinstance(module, (Encoder, EncoderBlock, DecoderBlock)):
        return stream_op(module.block, channels)
    if isinstance(module, Decoder):
        return stream_op(module.model, channels)
    raise TypeError(f"no streaming counterpart for {type(module).__name__}")


def encoder_op(model: SNACModel) -> Chain:
    """The whole streaming encoder: (B, 1, n) samples -> ``Codes`` of the coarse frames now final.

    The encoder body, then the quantizer; ``emitted(n)`` counts coarse frames after ``n`` samples.
    """
    quantize = Quantize(model.quantizer, model.config.coarse_stride, model.latent_dim)
    return Chain([stream_op(model.encoder, 1), quantize])


def decoder_op(model: SNACModel) -> StreamOp:
    """The streaming decoder: (B, latent_dim, n) quantized latent frames -> (B, 1, m) samples now final.

    ``emitted(n)`` counts samples after ``n`` latent frames (``vq_strides[0]`` latent frames a coarse frame).
    """
    return stream_op(model.decoder, model.latent_dim)
