"""Residual vector quantizer with per-level temporal strides (the "multi-scale" in SNAC).

Level ``i`` average-pools the residual over ``vq_strides[i]`` latent frames (aligned to frame 0), projects it
to ``codebook_dim``, and picks the codebook entry of highest cosine similarity. The distance arithmetic is
the reference's, op for op, so codes are identical to it on the same device. The arithmetic runs in
``functional`` (PyTorch, or one fused Triton kernel per half on the Triton backend).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import functional


Array = TypeVar("Array", np.ndarray, torch.Tensor)


def codes_to_frames(codes: Sequence[Array], codes_per_frame: Sequence[int]) -> Array:
    """Per-level codes ``codes[i]`` (B, T * r_i) -> (B, T, sum(r)): each coarse frame's codes of every level side
    by side (coarse level first). In this layout codes are in time order, so pieces of a stream join by plain
    concatenation along T and split at any frame; numpy arrays or tensors alike."""
    batch, frames = codes[0].shape[0], codes[0].shape[-1]
    parts = [c.reshape(batch, frames, r) for c, r in zip(codes, codes_per_frame)]
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=2)
    return torch.cat(parts, dim=2)


def frames_to_codes(frames: Array, codes_per_frame: Sequence[int]) -> List[Array]:
    """(B, T, sum(r)) frames (:func:`codes_to_frames`) -> per-level codes (B, T * r_i), each contiguous."""
    batch, count = frames.shape[0], frames.shape[1]
    bounds = np.cumsum([0, *codes_per_frame])
    return [_contiguous(frames[:, :, lo:hi]).reshape(batch, count * (hi - lo)) for lo, hi in zip(bounds, bounds[1:])]


def _contiguous(x: Union[np.ndarray, torch.Tensor]) -> Union[np.ndarray, torch.Tensor]:
    return np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x.contiguous()


class VectorQuantize(nn.Module):
    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int, stride: int = 1):
        super().__init__()
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.stride = stride
        self.in_proj = nn.Conv1d(input_dim, codebook_dim, 1)
        self.out_proj = nn.Conv1d(codebook_dim, input_dim, 1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, D, T) residual -> ((B, D, T) quantized, (B, T / stride) codes)."""
        if self.stride > 1:
            z = F.avg_pool1d(z, self.stride, self.stride)
        indices, z_e = functional.codebook_nearest(z, self.in_proj.weight, self.in_proj.bias, self.codebook.weight)
        # The reference's straight-through estimator; kept in inference so the residual matches it bit for bit.
        z_q = self.from_codes(indices, z_e=z_e)
        return z_q, indices

    def nearest(self, z_e: torch.Tensor) -> torch.Tensor:
        """(B, codebook_dim, T) projected latents -> (B, T) int64 index of the closest codebook entry."""
        return functional.nearest_entry(z_e, self.codebook.weight)

    def decode_code(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, T) codes -> (B, codebook_dim, T) codebook vectors."""
        return F.embedding(indices, self.codebook.weight).transpose(1, 2)

    def from_codes(self, indices: torch.Tensor, out: Optional[torch.Tensor] = None,
                   z_e: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T) codes -> (B, D, T * stride) latent contribution (added into ``out`` when given); with the
        codes' (B, codebook_dim, T) ``z_e``, in the reference's straight-through form."""
        return functional.codebook_lookup(indices, self.codebook.weight, self.out_proj.weight, self.out_proj.bias,
                                          repeat=self.stride, z_e=z_e, out=out)


class ResidualVectorQuantize(nn.Module):
    def __init__(self, input_dim: int = 512, codebook_size: int = 1024, codebook_dim: int = 8,
                 vq_strides: Sequence[int] = (1, 1, 1, 1)):
        super().__init__()
        self.n_codebooks = len(vq_strides)
        self.codebook_dim = codebook_dim
        self.codebook_size = codebook_size
        self.quantizers = nn.ModuleList(
            [VectorQuantize(input_dim, codebook_size, codebook_dim, stride) for stride in vq_strides]
        )

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(B, D, T) latents, T a multiple of every stride -> ((B, D, T) quantized, codes per level)."""
        z_q = 0
        residual = z
        codes = []
        for quantizer in self.quantizers:
            z_q_i, indices = quantizer(residual)
            z_q = z_q + z_q_i
            residual = residual - z_q_i
            codes.append(indices)
        return z_q, codes

    def from_codes(self, codes: List[torch.Tensor]) -> torch.Tensor:
        """Codes per level -> (B, D, T) quantized latents: every level's contribution, summed in place."""
        z_q = None
        for quantizer, indices in zip(self.quantizers, codes):
            z_q = quantizer.from_codes(indices, out=z_q)
        return z_q
