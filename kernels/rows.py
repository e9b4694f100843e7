"""Rows of a batch, read where they lie: a stream engine's per-stream contexts without gathering them.

An engine keeps every stream's state in batch tensors, one row per stream, and steps some of those rows. The
kernels read a context given as :class:`RowsOf` through its row list (one index load per batch item) instead of
a gathered copy; the PyTorch backend and the kernels' other inputs take :meth:`RowsOf.gathered`. This module
imports no Triton.
"""

from __future__ import annotations

from typing import Optional, Union

import torch


class RowsOf:
    """Rows ``rows`` of ``batch``: a (B, C, L) context whose item ``b`` is ``batch[rows[b]]``.

    ``batch``: (N, C, L), any strides; ``rows``: (B,) int64 on ``batch``'s device, each in ``[0, N)`` (repeats
    allowed: an engine's padded row lists repeat a spare row). A leaf of a stream state, like a tensor.
    """

    __slots__ = ("batch", "rows")

    def __init__(self, batch: torch.Tensor, rows: torch.Tensor):
        self.batch = batch
        self.rows = rows

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows.shape[0], *self.batch.shape[1:]))

    def gathered(self) -> torch.Tensor:
        """The rows as a tensor of their own (a copy), (B, C, L)."""
        return self.batch.index_select(0, self.rows)

    def frames(self, start: int, stop: Optional[int] = None) -> "RowsOf":
        """The same rows, frames ``[start, stop)`` of each."""
        return RowsOf(self.batch[..., start:stop], self.rows)


Context = Union[torch.Tensor, RowsOf]


def gathered(context: Optional[Context]) -> Optional[torch.Tensor]:
    """``context`` as a tensor: :class:`RowsOf` gathered, a tensor or None as it is."""
    return context.gathered() if isinstance(context, RowsOf) else context
