"""An engine of N streams past its warm-up, for the scripts that time or record its steps
(``step_trace.py``, ``tune.py``)."""

from __future__ import annotations

import torch

from snac_stream import SNAC
from snac_stream.engine import DecodeEngine, EncodeEngine


def warm_engine(model: SNAC, kind: str, streams: int, step_mode: str, *, queued: int = 1, ran: int = 0):
    """A ``kind`` ("decode" or "encode") engine of ``streams`` streams on ``model``'s device: each stream is
    given its warm-up's steps of random input (codes, or audio at 0.1 scale) plus ``queued`` more, and the
    engine has run the warm-up's steps plus ``ran`` more (``ran < queued`` leaves steps to time or record)."""
    cfg = model.config
    engine = (DecodeEngine if kind == "decode" else EncodeEngine)(model, streams, step_mode=step_mode)
    steps = engine.warmup_steps + queued
    gen = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(streams):
        sid = engine.open()
        if kind == "decode":
            frames = steps * engine.step_frames * cfg.coarse_stride
            engine.submit(sid, [torch.randint(0, cfg.codebook_size, (1, frames // s), generator=gen).to(model.device)
                                for s in cfg.vq_strides])
        else:
            engine.submit(sid, (torch.randn(1, 1, steps * engine.step_samples, generator=gen) * 0.1).to(model.device))
    for _ in range(engine.warmup_steps + ran):
        engine.step()
    return engine
