"""Tensors derived from a weight (its tf32 split, a transposed conv's phase form), made once and kept while the
weight is unchanged. No Triton import: the model's PyTorch paths use it too.

A kept tensor is valid while the weight is alive, at the same storage and at the same version counter (an
in-place update such as ``load_state_dict`` bumps it). Tensors made under ``torch.inference_mode`` (a model
loaded or moved inside it) have no version counter: for them nothing is kept and the derived tensor is made
on every call, which costs one pass over the weight.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary


class DerivedTensors:
    """``get(weight, make)``: ``make(weight)`` computed once per unchanged ``weight`` (under ``no_grad``)."""

    def __init__(self) -> None:
        self._kept: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> (data_ptr, version, derived)

    def get(self, weight: torch.Tensor, make: Callable[[torch.Tensor], Any]) -> Any:
        if weight.is_inference():
            with torch.no_grad():
                return make(weight)
        stamp: Tuple[int, int] = (weight.data_ptr(), weight._version)
        kept = self._kept.get(weight)
        if kept is not None and kept[0] == stamp:
            return kept[1]
        with torch.no_grad():
            derived = make(weight)
        self._kept[weight] = (stamp, derived)
        return derived
