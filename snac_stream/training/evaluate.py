"""Held-out evaluation: offline roundtrip (``SNAC.encode`` then ``SNAC.decode``) of a folded copy.

Metrics: STOI (pystoi, 0..1, higher is better) of each clip against its roundtrip, the multi-scale log-mel
L1 distance (the training mel loss), and how many distinct codes each level used over all clips.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Set

import numpy as np
import torch

from ..streaming import SNAC
from .losses import MultiScaleMelLoss
from .options import TrainingError


def require_pystoi():
    try:
        import pystoi
    except ImportError as exc:
        raise TrainingError("held-out STOI needs pystoi: pip install pystoi (or snac-stream[train])") from exc
    return pystoi


@torch.no_grad()
def evaluate(model: SNAC, clips: Sequence[np.ndarray], mel_loss: MultiScaleMelLoss) -> Dict[str, object]:
    """Roundtrip every clip (1-D float32 at the model's rate) through ``model`` (a plain eval-mode SNAC)."""
    stoi = require_pystoi().stoi
    device = model.device
    scores: List[float] = []
    mels: List[float] = []
    used: List[Set[int]] = [set() for _ in range(model.n_codebooks)]
    for clip in clips:
        x = torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32)).to(device).view(1, 1, -1)
        codes = model.encode(x)
        y = model.decode(codes)[..., : x.shape[-1]]
        for level, c in enumerate(codes):
            used[level].update(torch.unique(c).tolist())
        mels.append(float(mel_loss(y, x)))
        ref, deg = x.view(-1).double().cpu().numpy(), y.view(-1).double().cpu().numpy()
        scores.append(float(stoi(ref, deg, model.sampling_rate, extended=False)))
    return {
        "stoi": float(np.mean(scores)) if scores else float("nan"),
        "mel_distance": float(np.mean(mels)) if mels else float("nan"),
        "codes_used": [len(u) for u in used],
        "codebook_size": model.codebook_size,
        "items": len(clips),
    }
