"""Map the offline model's modules onto streaming ops that share their weights."""

from __future__ import annotations

from typing import List

from torch import nn

from ..model.attention import LocalMHA
from ..model.layers import (Decoder, DecoderBlock, Encoder, EncoderBlock, NoiseBlock, ResidualUnit, Snake1d,
                            fold_layers)
from .ops import Blockwise, Chain, ConvTranspose, Noise, Pointwise, SlidingWindow, StreamOp


def _sequence(layers: nn.Sequential, channels: int) -> Chain:
    """Ops for a Sequential, each snake folded into the conv after it and a final tanh into the conv before."""
    ops: List[StreamOp] = []
    for layer, alpha, activation in fold_layers(layers):
        op = SlidingWindow.conv(layer, alpha, activation) if isinstance(layer, nn.Conv1d) else stream_op(layer, channels)
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
