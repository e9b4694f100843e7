"""Every public entry point runs, with the same results, in plain mode, under ``torch.no_grad()`` and under
``torch.inference_mode()``, also for a model built or moved inside ``inference_mode`` (its weights are then
inference tensors, which have no version counter: caches keyed on it must cope). PyTorch allows such a model
only where autograd records nothing (``no_grad``, ``inference_mode``), so plain mode is left out for it, as it
would be for the reference package.

On the Triton backend: through the interpreter on the CPU, and on the GPU where there is one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, List

import pytest
import torch

from snac_stream import PRESETS, SNAC
from snac_stream.engine import DecodeEngine, EncodeEngine
from snac_stream.streaming import rows

TINY = dataclasses.replace(PRESETS["24khz"], encoder_dim=8, decoder_dim=32)
MODES: Dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "plain": contextlib.nullcontext,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}
# The Triton backend runs on the GPU where there is one, else through the interpreter (tests/conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model(device: str, built_in_inference_mode: bool) -> SNAC:
    torch.manual_seed(0)
    with torch.inference_mode() if built_in_inference_mode else contextlib.nullcontext():
        return SNAC.from_config(TINY, backend="triton").to(device).eval()


def _run_all(model: SNAC) -> List[torch.Tensor]:
    """Offline encode/decode, the streaming encoder/decoder and both engines on one input: every output."""
    device = model.device
    gen = torch.Generator().manual_seed(1)
    audio = (0.1 * torch.randn(1, 1, 2 * 2048 + 100, generator=gen)).to(device)
    codes = model.encode(audio)
    outputs = [*codes, model.decode(codes)]

    enc = model.streaming_encoder()
    pieces = [enc.push(audio[..., :3000]), enc.push(audio[..., 3000:]), enc.flush()]
    outputs += [torch.cat(level, dim=-1) for level in zip(*pieces)]
    dec = model.streaming_decoder()
    frames = codes[0].shape[-1]
    cut = [frames // 2 * (c.shape[-1] // frames) for c in codes]  # whole coarse frames in the first push
    outputs.append(torch.cat([dec.push([c[:, :k] for c, k in zip(codes, cut)]),
                              dec.push([c[:, k:] for c, k in zip(codes, cut)]), dec.flush()], dim=-1))

    decoder = DecodeEngine(model, max_streams=2)
    sid = decoder.open()
    decoder.submit(sid, codes)
    steps = [out for _ in range(codes[0].shape[-1]) for out in decoder.step().values()]
    outputs.append(torch.cat(steps + [decoder.close(sid)], dim=-1))
    encoder = EncodeEngine(model, max_streams=2)
    sid = encoder.open()
    encoder.submit(sid, audio)
    steps = [out for _ in range(4) for out in encoder.step().values()]
    tail = encoder.close(sid)
    outputs += [torch.cat([s[i] for s in steps] + [tail[i]], dim=-1) for i in range(len(codes))]
    return [o.detach().cpu() for o in outputs]


@pytest.mark.parametrize("built_in_inference_mode", [False, True], ids=["model-plain", "model-inference"])
def test_entry_points_in_every_grad_mode(built_in_inference_mode):
    model = _model(DEVICE, built_in_inference_mode)
    results = {}
    for name, mode in MODES.items():
        if built_in_inference_mode and name == "plain":
            continue
        with mode():
            results[name] = _run_all(model)
    base = results["no_grad"]
    for name, outs in results.items():
        assert len(outs) == len(base)
        for i, (a, b) in enumerate(zip(outs, base)):
            if a.dtype == torch.int64:
                assert torch.equal(a, b), f"{name}: output {i} (codes) differs from no_grad mode"
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"{name}: output {i} differs")
    # Offline and streaming agree in every mode (the engines' outputs were compared across modes above).
    n = model.config.n_codebooks
    for level in range(n):
        assert torch.equal(base[level], base[n + 1 + level])


def _unit_pushes(model: SNAC, push_mode: str) -> List[torch.Tensor]:
    """The streaming encoder and decoder fed one unit per push, long enough for pushes past the warm-up to take
    the unit pass (``push_mode``): every push's output."""
    gen = torch.Generator().manual_seed(3)
    unit = model.config.pad_multiple
    enc = model.streaming_encoder(push_mode=push_mode)
    units = enc.warmup_units + 2
    audio = (0.1 * torch.randn(1, 1, units * unit, generator=gen)).to(model.device)
    codes = [enc.push(audio[..., j * unit : (j + 1) * unit]) for j in range(units)] + [enc.flush()]
    outputs = [c for levels in codes for c in levels]
    codes = [torch.cat(level, dim=-1) for level in zip(*codes)]
    dec = model.streaming_decoder(push_mode=push_mode)
    frames = codes[0].shape[-1]
    outputs += [dec.push([c[:, j * c.shape[-1] // frames : (j + 1) * c.shape[-1] // frames] for c in codes])
                for j in range(frames)] + [dec.flush()]
    return [o.detach().cpu() for o in outputs]


@pytest.mark.parametrize("built_in_inference_mode", [False, True], ids=["model-plain", "model-inference"])
def test_unit_pushes_in_every_grad_mode(built_in_inference_mode):
    """Pushes through the unit pass (CUDA graphs on the GPU, the same pass uncaptured on the CPU) in every mode
    equal eager pushes: the pass's buffers are written under ``inference_mode`` whatever the caller's mode."""
    model = _model(DEVICE, built_in_inference_mode)
    with torch.no_grad():
        want = _unit_pushes(model, "eager")
    for name, mode in MODES.items():
        if built_in_inference_mode and name == "plain":
            continue
        with mode():
            got = _unit_pushes(model, "graphs" if DEVICE == "cuda" else "units")
        assert len(got) == len(want)
        for i, (a, b) in enumerate(zip(got, want)):
            assert a.shape == b.shape, f"{name}: output {i}"
            if a.dtype == torch.int64:
                assert torch.equal(a, b), f"{name}: output {i} (codes) differs from eager pushes"
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"{name}: output {i} differs")


def test_weight_caches_follow_in_place_updates():
    """A weight changed in place (load_state_dict) is re-split: the derived-tensor cache sees its version."""
    model = _model(DEVICE, False)
    audio = (0.1 * torch.randn(1, 1, 2048, generator=torch.Generator().manual_seed(2))).to(DEVICE)
    with torch.inference_mode():
        before = model.decode(model.encode(audio))
    state = {k: v * 1.5 if k.endswith("weight") else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    fresh = SNAC.from_config(TINY, backend="triton").to(DEVICE).eval()
    fresh.load_state_dict(state)
    with torch.inference_mode():
        codes = fresh.encode(audio)
        assert all(torch.equal(a, b) for a, b in zip(model.encode(audio), codes))
        torch.testing.assert_close(model.decode(codes), fresh.decode(codes), rtol=0, atol=1e-6)
        assert not torch.allclose(model.decode(codes), before)


def test_streaming_records_no_graph_in_plain_mode():
    """A stream's state lives across pushes: in plain mode autograd would chain every push's graph to the
    next one for as long as the stream runs. Pushes and flushes run without autograd."""
    torch.manual_seed(0)
    model = SNAC.from_config(TINY, backend="torch").eval()
    assert all(p.requires_grad for p in model.parameters())
    dec = model.streaming_decoder()
    codes = model.encode(0.1 * torch.randn(1, 1, 4096))
    audio = dec.push(codes)
    assert not audio.requires_grad and not dec.flush().requires_grad
    enc = model.streaming_encoder()
    enc.push(0.1 * torch.randn(1, 1, 5000))
    leaves: List[torch.Tensor] = []
    rows._map_state(lambda v: leaves.append(v) if isinstance(v, torch.Tensor) else None, enc.state)
    assert leaves and not any(t.requires_grad for t in leaves)
