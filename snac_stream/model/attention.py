"""Local multi-head attention over non-overlapping windows (32 kHz and 44 kHz models).

Each window of ``window_size`` frames attends only to itself, with rotary positions counted from the
window's first frame: a window's output depends on that window alone, which is what lets the streaming
path buffer whole windows and stay exact.
"""

from __future__ import annotations

import torch
from torch import nn

from .functional import conv, current_backend, linear_as_conv


class SinusoidalEmbeddings(nn.Module):
    def __init__(self, dim: int, scale_base=None, use_xpos: bool = False):
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)  # persistent: part of the official checkpoints
        self.use_xpos = use_xpos
        self.scale_base = scale_base
        scale = (torch.arange(0, dim, 2) + 0.4 * dim) / (1.4 * dim)
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, x: torch.Tensor):
        seq_len = x.shape[-2]
        t = torch.arange(seq_len, device=x.device).type_as(self.inv_freq)
        freqs = torch.einsum("i , j -> i j", t, self.inv_freq)
        freqs = torch.cat((freqs, freqs), dim=-1)
        if not self.use_xpos:
            return freqs, torch.ones(1, device=x.device)
        power = (t - (seq_len // 2)) / self.scale_base
        scale = self.scale ** power.unsqueeze(-1)
        return freqs, torch.cat((scale, scale), dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (2, -1)).unbind(dim=-2)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, freqs, scale=1):
    q_len = q.shape[-2]
    q_freqs = freqs[..., -q_len:, :]
    inv_scale = scale**-1
    if scale.ndim == 2:
        scale = scale[-q_len:, :]
    q = (q * q_freqs.cos() * scale) + (rotate_half(q) * q_freqs.sin() * scale)
    k = (k * freqs.cos() * inv_scale) + (rotate_half(k) * freqs.sin() * inv_scale)
    return q, k


class LocalMHA(nn.Module):
    """(B, C, T) -> (B, C, T); T must be a multiple of ``window_size``.

    On the Triton backend the two projections run on the dense-conv kernel as 1x1 convs over (B, C, T), the
    output one with the residual added in its epilogue (PyTorch's fp32 matrix products take no tensor cores:
    at a 44 kHz engine step of 1024 streams they were 4 % of the step)."""

    def __init__(self, dim: int = 1024, window_size: int = 32, dim_head: int = 64, use_rotary_pos_emb: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.heads = dim // dim_head
        self.window_size = window_size
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.rel_pos = SinusoidalEmbeddings(dim_head, scale_base=window_size // 2) if use_rotary_pos_emb else None
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T = x.shape
        if T % self.window_size:
            raise ValueError(
                f"local attention needs a whole number of {self.window_size}-frame windows, got {T} frames"
            )
        residual = x
        x = self.norm(x.transpose(1, 2))
        windows = T // self.window_size
        triton = current_backend() == "triton"
        if triton:  # (B, 3C, T) -> 3 x (B, h, w, n, d)
            qkv = conv(x.transpose(1, 2).contiguous(), linear_as_conv(self.to_qkv.weight))
            q, k, v = qkv.view(B, 3, self.heads, -1, windows, self.window_size).permute(1, 0, 2, 4, 5, 3).unbind(0)
        else:  # b (w n) (h d) -> b h w n d
            q, k, v = (t.reshape(B, windows, self.window_size, self.heads, -1).permute(0, 3, 1, 2, 4)
                       for t in self.to_qkv(x).chunk(3, dim=-1))
        if self.rel_pos is not None:
            pos_emb, scale = self.rel_pos(k)
            q, k = apply_rotary_pos_emb(q, k, pos_emb, scale)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        if triton:  # b h w n d -> b (h d) (w n)
            out = out.permute(0, 1, 4, 2, 3).reshape(B, C, T)
            return conv(out, linear_as_conv(self.to_out.weight), residual=residual)
        out = out.permute(0, 2, 3, 1, 4).reshape(B, T, C)  # b h w n d -> b (w n) (h d)
        out = self.to_out(out)
        return out.transpose(1, 2) + residual
