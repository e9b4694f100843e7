"""Map the offline model's modules onto streaming ops that share their weights."""

from __future__ import annotations

from torch import nn

from ..model.attention import LocalMHA
from ..model.layers import Decoder, DecoderBlock, Encoder, EncoderBlock, NoiseBlock, ResidualUnit, Snake1d
from .ops import Blockwise, Chain, Conv, ConvTranspose, Noise, Pointwise, Residual, StreamOp


def stream_op(module: nn.Module, channels: int) -> StreamOp:
    """Streaming op for ``module``, whose input has ``channels`` channels."""
    if isinstance(module, nn.Sequential):
        ops = []
        for child in module:
            op = stream_op(child, channels)
            ops.append(op)
            channels = op.out_channels
        return Chain(ops)
    if isinstance(module, ResidualUnit):
        return Residual(stream_op(module.block, channels))
    if isinstance(module, nn.Conv1d):
        if module.kernel_size[0] == 1 and module.stride[0] == 1 and module.padding[0] == 0:
            return Pointwise(module, module.out_channels)
        return Conv(module)
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
