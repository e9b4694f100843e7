"""Streaming encoder/decoder against offline encode/decode, for random chunk schedules.

The structures are the three presets' (same rates, strides, attention windows, noise, depthwise) at small
widths, plus odd strides without depthwise convs; one run uses the full-size 24 kHz model.
"""

from __future__ import annotations

import copy
import math
import random
from typing import Dict, List, Optional, Sequence, Tuple
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snac_stream import PRESETS, SNAC
from snac_stream.kernels.precision import PRECISIONS
from snac_stream.model import functional
from snac_stream.model.functional import conv_transpose, use_backend
from snac_stream.streaming.build import decoder_op
from snac_stream.streaming.ops import Chain, ConvTranspose, Noise, StreamOp

AUDIO_TOL = 1e-5

STRUCTURES: Dict[str, dict] = {
    "24khz": {**PRESETS["24khz"].to_dict(), "encoder_dim": 8, "decoder_dim": 64},
    "32khz": {**PRESETS["32khz"].to_dict(), "encoder_dim": 4, "decoder_dim": 128},
    "44khz": {**PRESETS["44khz"].to_dict(), "encoder_dim": 4, "decoder_dim": 64, "noise": False},
    "odd-dense": dict(sampling_rate=16000, encoder_dim=8, encoder_rates=[3, 5], decoder_dim=32,
                      decoder_rates=[5, 3], attn_window_size=None, vq_strides=[2, 1], depthwise=False,
                      codebook_size=64),
    "window4": dict(sampling_rate=8000, encoder_dim=16, encoder_rates=[2, 2], decoder_dim=64, decoder_rates=[2, 2],
                    attn_window_size=4, vq_strides=[2, 1], codebook_size=128),
}


def _randomize(model: SNAC, seed: int) -> SNAC:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.copy_(torch.rand(p.shape, generator=gen) * 1.5 + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


_MODELS: Dict[str, SNAC] = {}


def model_for(name: str) -> SNAC:
    if name not in _MODELS:
        torch.manual_seed(1234)
        _MODELS[name] = _randomize(SNAC(**STRUCTURES[name]), 99)
    return _MODELS[name]


def split(total: int, sizes: Sequence[int]) -> List[slice]:
    """Cut ``range(total)`` into consecutive slices of the given sizes, cycling; the last may be shorter."""
    out, start, i = [], 0, 0
    while start < total:
        n = sizes[i % len(sizes)]
        out.append(slice(start, min(total, start + n)))
        start += n
        i += 1
    return out


def stream_encode(model: SNAC, audio: torch.Tensor, sizes: Sequence[int]) -> List[torch.Tensor]:
    enc = model.streaming_encoder(batch_size=audio.shape[0])
    parts = [enc.push(audio[..., s]) for s in split(audio.shape[-1], sizes)] + [enc.flush()]
    return [torch.cat([p[level] for p in parts], dim=-1) for level in range(model.n_codebooks)]


def frames_slice(codes: Sequence[torch.Tensor], s: slice, frames: int) -> List[torch.Tensor]:
    return [c[:, s.start * c.shape[1] // frames : s.stop * c.shape[1] // frames] for c in codes]


def stream_decode(model: SNAC, codes: Sequence[torch.Tensor], sizes: Sequence[int], **kwargs) -> torch.Tensor:
    dec = model.streaming_decoder(batch_size=codes[0].shape[0], **kwargs)
    frames = codes[0].shape[-1]
    parts = [dec.push(frames_slice(codes, s, frames)) for s in split(frames, sizes)] + [dec.flush()]
    return torch.cat(parts, dim=-1)


TIE_TOLERANCE = 1e-5  # cosine similarity: an fp32 near-tie between two codebook entries


def encode_with_latents(model: SNAC, audio: torch.Tensor) -> Tuple[List[torch.Tensor], List[Tuple[torch.Tensor, torch.Tensor]]]:
    """Offline ``model.encode(audio)`` and, per level, the projected latent ``z_e`` (B, d, T_i) and codebook the
    nearest-entry search saw."""
    seen: List[Tuple[torch.Tensor, torch.Tensor]] = []
    search = functional.codebook_nearest

    def spy(z, in_weight, in_bias, codebook):
        codes, z_e = search(z, in_weight, in_bias, codebook)
        seen.append((z_e, codebook))
        return codes, z_e

    with mock.patch.object(functional, "codebook_nearest", spy):
        return model.encode(audio), seen


def assert_codes_equal(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], model: Optional[SNAC] = None,
                       latents: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None) -> None:
    """Identical codes. With the offline ``latents`` (``encode_with_latents``), one exception: a code that
    differs where offline saw the two entries as equally near (cosine similarities within ``TIE_TOLERANCE``:
    float rounding of a different chunking may pick either), and the finer levels' codes over the same latent
    frames, whose residual then differs. Any other difference fails."""
    assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want]
    ties: List[Tuple[int, int, int]] = []  # (row, first latent frame, end) where a near tie let codes differ
    for level, (g, w) in enumerate(zip(got, want)):
        mismatch = (g != w).nonzero().tolist()
        if latents is None or model is None:
            assert not mismatch, f"level {level}: codes differ at (batch, frame) {mismatch[:5]}"
            continue
        stride = model.config.vq_strides[level]
        for b, f in mismatch:
            start, end = f * stride, (f + 1) * stride
            if any(tb == b and ts < end and start < te for tb, ts, te in ties):
                continue  # below a near tie of a coarser level
            z_e, codebook = latents[level]
            sims = F.normalize(codebook[[int(g[b, f]), int(w[b, f])]], dim=1) @ F.normalize(z_e[b, :, f], dim=0)
            gap = abs(float(sims[0] - sims[1]))
            assert gap <= TIE_TOLERANCE, (f"level {level}: codes differ at (batch {b}, frame {f}): "
                                          f"{int(g[b, f])} vs offline {int(w[b, f])}, not a near tie "
                                          f"(similarities {sims.tolist()})")
            ties.append((b, start, end))


schedules = st.lists(st.one_of(st.integers(1, 16), st.integers(17, 700), st.integers(701, 9000)), min_size=1, max_size=8)
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", list(STRUCTURES))
@SETTINGS
@given(data=st.data())
def test_encoder_matches_offline_for_any_chunking(name: str, data) -> None:
    model = model_for(name)
    cfg = model.config
    length = data.draw(st.integers(1, 3 * cfg.pad_multiple + 17), label="length")
    sizes = data.draw(schedules, label="chunk sizes")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    audio = torch.randn(2, 1, length, generator=torch.Generator().manual_seed(seed)) * 0.3
    with torch.no_grad():
        want, latents = encode_with_latents(model, audio)
        assert_codes_equal(stream_encode(model, audio, sizes), want, model, latents)


@pytest.mark.parametrize("name", list(STRUCTURES))
@SETTINGS
@given(data=st.data())
def test_decoder_matches_offline_for_any_chunking(name: str, data) -> None:
    model = model_for(name)
    cfg = model.config
    step = cfg.pad_multiple // cfg.frame_samples  # coarse frames per attention window (1 without attention)
    frames = step * data.draw(st.integers(1, max(1, 12 // step)), label="windows")
    sizes = data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=6).filter(any), label="frames per push")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    codes = [torch.randint(0, cfg.codebook_size, (2, frames * cfg.coarse_stride // s), generator=gen)
             for s in cfg.vq_strides]
    with torch.no_grad():
        want = model.decode(codes)
        got = stream_decode(model, codes, sizes)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= AUDIO_TOL


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("noise_mode", ["deterministic", "off"])
def test_upsamplings_hand_the_noise_blocks_their_samples_channels_last(backend: str, noise_mode: str) -> None:
    """Each upsampling followed by a noise block hands it the product's rows as they lie (``channels_last``):
    the noise block reads them, in every mode, and hands on (B, C, T) in order; streaming still equals offline.
    (An upsampling without a noise block after it returns placed samples: ``channels_last=False``, whose
    results ``test_kernels_upsampling.py`` checks.)"""
    model = copy.deepcopy(model_for("24khz"))
    model.backend, model.noise_mode = backend, noise_mode

    def flat(op: StreamOp) -> List[StreamOp]:
        return [leaf for child in op.ops for leaf in flat(child)] if isinstance(op, Chain) else [op]

    ops = flat(decoder_op(model))
    after = [(op, nxt) for op, nxt in zip(ops, ops[1:] + [None]) if isinstance(op, ConvTranspose)]
    assert len(after) == len(model.config.decoder_rates)
    assert all(op.channels_last == isinstance(nxt, Noise) for op, nxt in after)
    assert all(op.channels_last for op, _ in after)  # the preset's blocks all have noise

    seen = []
    push = Noise.push

    def spy(self, state, x):
        y = push(self, state, x)
        seen.append((x.stride(1) == 1 and x.shape[1] > 1 and x.shape[-1] > 1, y.is_contiguous()))
        return y

    cfg = model.config
    codes = [torch.randint(0, cfg.codebook_size, (3, 6 * cfg.coarse_stride // s), generator=torch.Generator()
                           .manual_seed(s)) for s in cfg.vq_strides]
    with torch.no_grad(), mock.patch.object(Noise, "push", spy):
        want = model.decode(codes)
        got = stream_decode(model, codes, [2, 1, 3])
    assert (got - want).abs().max().item() <= AUDIO_TOL
    assert seen and all(contiguous for _, contiguous in seen)
    assert any(lying for lying, _ in seen)


def test_one_sample_at_a_time_then_decode_roundtrip() -> None:
    model = model_for("24khz")
    audio = torch.randn(2, 1, model.config.frame_samples + 333, generator=torch.Generator().manual_seed(5)) * 0.3
    with torch.no_grad():
        codes = stream_encode(model, audio, [1])
        assert_codes_equal(codes, model.encode(audio))
        got = stream_decode(model, codes, [1])
        assert (got - model.decode(codes)).abs().max().item() <= AUDIO_TOL


@pytest.mark.slow
def test_full_size_24khz_streaming_matches_offline() -> None:
    torch.manual_seed(0)
    model = _randomize(SNAC.from_config("24khz"), 3)
    audio = torch.randn(2, 1, 2 * model.config.frame_samples + 1000, generator=torch.Generator().manual_seed(7)) * 0.3
    with torch.no_grad():
        codes = stream_encode(model, audio, [1, 4095, 777, 2048, 5])
        assert_codes_equal(codes, model.encode(audio))
        got = stream_decode(model, codes, [1, 0, 2])
        assert (got - model.decode(codes)).abs().max().item() <= AUDIO_TOL


# ---- emission is as early as the receptive field allows --------------------------------------------

def _last_dependency(output: torch.Tensor, inp: torch.Tensor) -> int:
    """Largest time index of ``inp`` that ``output`` (a scalar) depends on."""
    (grad,) = torch.autograd.grad(output, inp, retain_graph=True)
    return int(grad.abs().sum(dim=(0, 1)).nonzero().max())


@pytest.mark.parametrize("name", ["24khz", "32khz", "odd-dense"])
def test_encoder_emits_each_frame_as_soon_as_its_inputs_are_known(name: str) -> None:
    model = model_for(name)
    cfg = model.config
    enc = model.streaming_encoder()
    F, s0 = cfg.frame_samples, cfg.coarse_stride
    period = cfg.pad_multiple // F  # emission pattern repeats every attention window (1 frame without)
    # Offline receptive field, measured with autograd on an input long enough that its end never matters.
    length = cfg.pad_multiple * (4 + enc.latency_samples // cfg.pad_multiple)
    audio = (torch.randn(1, 1, length) * 0.3).requires_grad_(True)
    latent = model.encoder(audio)
    needed = []
    for j in range(2 * period + 2):
        # Coarse frame j is known once its last latent frame is: inputs up to that frame's last dependency.
        n = _last_dependency(latent[0, :, (j + 1) * s0 - 1].sum(), audio) + 1
        needed.append(n)
        enc.reset()
        with torch.no_grad():
            before = enc.push(audio.detach()[..., : n - 1])[0].shape[-1]
            after = before + enc.push(audio.detach()[..., n - 1 : n])[0].shape[-1]
        assert before <= j, f"frame {j} emitted before its inputs were known"
        assert after >= j + 1, f"frame {j} not emitted once its inputs were known"
    assert enc.latency_samples == max(n - j * F for j, n in enumerate(needed))
    assert enc.lookahead_samples == max(n - (j + 1) * F for j, n in enumerate(needed))


@pytest.mark.parametrize("name", ["24khz", "32khz", "odd-dense"])
def test_decoder_emits_each_sample_as_soon_as_its_codes_are_known(name: str) -> None:
    model = model_for(name)
    cfg = model.config
    dec = model.streaming_decoder()
    F, s0 = cfg.frame_samples, cfg.coarse_stride
    frames = (dec.latency_samples // F + 4) * (cfg.pad_multiple // F)
    latent = torch.randn(1, model.latent_dim, frames * s0, requires_grad=True)
    audio = model.decoder(latent)
    codes = model.encode(torch.randn(1, 1, frames * F) * 0.3)
    period = cfg.pad_multiple // F  # emission pattern repeats every attention window (1 frame without)
    # Warm-up frames plus two whole periods cover every case the pattern has.
    for k in range(1, min(frames - dec.latency_samples // F - 1, dec.latency_samples // F + 2 * period + 2)):
        dec.reset()
        with torch.no_grad():
            emitted = dec.push(frames_slice(codes, slice(0, k), frames)).shape[-1]
        # Sample `emitted - 1` only depends on latent frames already received; sample `emitted` needs more.
        received = k * s0
        if emitted:
            assert _last_dependency(audio[0, 0, emitted - 1], latent) < received
        assert _last_dependency(audio[0, 0, emitted], latent) >= received
    assert dec.latency_samples == max(k * F - dec.body.emitted(k * s0) for k in range(1, 64))


def test_full_size_24khz_receptive_field_matches_latency() -> None:
    """The figures quoted in the README: decoder hold-back and encoder look-ahead of the 24 kHz model."""
    model = SNAC.from_config("24khz").eval()
    dec = model.streaming_decoder()
    enc = model.streaming_encoder()
    F, hop = model.config.frame_samples, model.hop_length
    latent = torch.randn(1, model.latent_dim, 16 * 4, requires_grad=True)
    audio = model.decoder(latent)
    k = 8  # coarse frames received
    emitted = k * F - dec.latency_samples
    assert _last_dependency(audio[0, 0, emitted - 1], latent) < k * 4
    assert _last_dependency(audio[0, 0, emitted], latent) >= k * 4
    x = torch.randn(1, 1, 32 * F, requires_grad=True)
    z = model.encoder(x)
    frame_end = 8 * F  # end of coarse frame 7 = latent frames 28..31
    assert _last_dependency(z[0, :, 31].sum(), x) + 1 == frame_end + enc.lookahead_samples
    assert hop == 512


# ---- lifecycle and edge cases ---------------------------------------------------------------------

def test_reset_starts_a_fresh_stream() -> None:
    model = model_for("24khz")
    a, b = (torch.randn(2, 1, 5000, generator=torch.Generator().manual_seed(s)) * 0.3 for s in (1, 2))
    enc = model.streaming_encoder(batch_size=2)
    dec = model.streaming_decoder(batch_size=2)
    with torch.no_grad():
        enc.push(a[..., :3000])
        enc.reset()
        parts = [enc.push(b[..., :1234]), enc.push(b[..., 1234:]), enc.flush()]
        codes = [torch.cat([p[i] for p in parts], -1) for i in range(3)]
        assert_codes_equal(codes, model.encode(b))
        codes_a = model.encode(a)
        dec.push(frames_slice(codes_a, slice(0, 1), codes_a[0].shape[1]))
        dec.reset()
        out = torch.cat([dec.push(codes), dec.flush()], -1)
        assert (out - model.decode(codes)).abs().max() <= AUDIO_TOL


def test_flush_on_empty_streams() -> None:
    model = model_for("32khz")
    codes = model.streaming_encoder(batch_size=3).flush()
    assert [tuple(c.shape) for c in codes] == [(3, 0)] * model.n_codebooks
    assert all(c.dtype == torch.int64 for c in codes)
    assert tuple(model.streaming_decoder(batch_size=3).flush().shape) == (3, 1, 0)


@pytest.mark.parametrize("length", [1, 2, 5, 100])
def test_inputs_shorter_than_one_hop(length: int) -> None:
    for name in ("24khz", "32khz"):
        model = model_for(name)
        audio = torch.randn(2, 1, length, generator=torch.Generator().manual_seed(length)) * 0.3
        with torch.no_grad():
            enc = model.streaming_encoder(batch_size=2)
            first = enc.push(audio)
            assert all(c.shape[-1] == 0 for c in first)
            codes = enc.flush()
            assert_codes_equal(codes, model.encode(audio))


def test_stream_misuse_is_reported() -> None:
    model = model_for("32khz")
    enc = model.streaming_encoder(batch_size=2)
    with pytest.raises(ValueError, match="batch"):
        enc.push(torch.zeros(1, 1, 10))
    with pytest.raises(ValueError, match="mono"):
        enc.push(torch.zeros(2, 2, 10))
    with pytest.raises(TypeError, match="floating"):
        enc.push(torch.zeros(2, 1, 10, dtype=torch.int16))
    enc.flush()
    with pytest.raises(RuntimeError, match="reset"):
        enc.push(torch.zeros(2, 1, 10))
    dec = model.streaming_decoder(batch_size=1)
    good = model.encode(torch.zeros(1, 1, 10))
    with pytest.raises(ValueError, match="codes\\[1\\]"):
        dec.push([good[0][:, :1], good[1][:, :1], good[2][:, :4], good[3][:, :8]])
    with pytest.raises(ValueError, match="codebook range"):
        bad = frames_slice(good, slice(0, 1), good[0].shape[1])
        dec.push([bad[0] + model.codebook_size] + bad[1:])
    dec.push(frames_slice(good, slice(0, 1), good[0].shape[1]))  # one coarse frame: a partial window
    with pytest.raises(ValueError, match="multiple of 4 coarse frames"):
        dec.flush()
    with pytest.raises(ValueError, match="batch_size"):
        model.streaming_decoder(batch_size=0)


# ---- the latency dial ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["24khz", "32khz"])
def test_lookahead_dial(name: str) -> None:
    model = model_for(name)
    cfg = model.config
    frames = 3 * (cfg.pad_multiple // cfg.frame_samples) + (0 if cfg.attn_window_size else 2)
    codes = model.encode(torch.randn(1, 1, frames * cfg.frame_samples, generator=torch.Generator().manual_seed(3)) * 0.3)
    with torch.no_grad():
        exact = model.decode(codes)
        full = model.streaming_decoder().latency_samples
        # The dial at the exact hold-back is exact.
        assert (stream_decode(model, codes, [1], lookahead_samples=full) - exact).abs().max() <= AUDIO_TOL
        for lookahead in (0, full // 3):
            dec = model.streaming_decoder(lookahead_samples=lookahead)
            parts = []
            for k in range(frames):
                parts.append(dec.push(frames_slice(codes, slice(k, k + 1), frames)))
                emitted = sum(p.shape[-1] for p in parts)
                # Emission runs `lookahead` samples behind the received audio, never further.
                assert emitted == max(0, (k + 1) * cfg.frame_samples - lookahead)
            parts.append(dec.flush())
            early = torch.cat(parts, -1)
            assert early.shape == exact.shape and torch.isfinite(early).all()
            # Early samples are approximations; the error they carry is what bench/latency_dial.py reports.
            tail = exact.shape[-1] - full
            assert (early[..., :tail] - exact[..., :tail]).abs().max() > 0 or lookahead == full
    with pytest.raises(ValueError, match="lookahead_samples"):
        model.streaming_decoder(lookahead_samples=-1)


@pytest.mark.parametrize("stride,batch,frames", [(2, 1, 40), (3, 2, 17), (4, 3, 5), (8, 2, 11)])
def test_upsampling_as_a_two_tap_conv_matches_conv_transpose(stride: int, batch: int, frames: int) -> None:
    """SNAC's upsampling layer written as a 2-tap conv over input frames (padding 1, crop p, the offline
    length) equals ``ConvTranspose1d(kernel 2s, stride s, padding ceil(s/2), output_padding s % 2)``."""
    torch.manual_seed(stride)
    layer = torch.nn.ConvTranspose1d(24, 10, 2 * stride, stride, padding=math.ceil(stride / 2),
                                     output_padding=stride % 2)
    x = torch.randn(batch, 24, frames)
    want = layer(x)
    with torch.no_grad():
        got = conv_transpose(x, layer.weight, layer.bias, stride=stride, padding=1, crop=layer.padding[0],
                             length=want.shape[-1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        conv_transpose(x, layer.weight, layer.bias, stride=stride, padding=1, length=(frames + 1) * stride + 1)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("product", functional.UPSAMPLING_PRODUCTS)
def test_upsampling_products_at_each_precision(device: str, precision: str, bias: bool, product: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """On the Triton backend the upsampling's matrix product follows the model's precision, in each of its
    forms (cuBLAS on built rows, the dense-conv kernel, the dense-conv kernel on split operands): ``tf32x3``
    and ``ieee`` agree with an fp64 reference to fp32 accuracy whatever the process-wide TF32 setting, ``tf32``
    (one TF32 tensor-core product on CUDA) to TF32's. The streaming form (context frames) is the same product."""
    torch.manual_seed(7)
    stride, c_in, c_out = 4, 96, 40
    layer = torch.nn.ConvTranspose1d(c_in, c_out, 2 * stride, stride, padding=2, bias=bias).to(device)
    x = torch.randn(3, c_in, 33, device=device)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)  # a user's setting must not lower ieee
    with torch.no_grad():
        want = F.conv_transpose1d(x.double(), layer.weight.double(),
                                  None if layer.bias is None else layer.bias.double(), stride=stride, padding=2)
        with use_backend("triton", precision), functional.use_upsampling_product(product):
            got = conv_transpose(x, layer.weight, layer.bias, stride=stride, padding=1, crop=2,
                                 length=want.shape[-1])
            streamed = conv_transpose(x[..., 1:], layer.weight, layer.bias, stride=stride, context=x[..., :1])
    scale = want.abs().max().item()
    loose = precision == "tf32" and device == "cuda"
    tol = 5e-3 if loose else 2e-6
    assert (got.double() - want).abs().max().item() <= tol * scale
    torch.testing.assert_close(streamed, got[..., 2:2 + streamed.shape[-1]], rtol=0, atol=tol * scale)
    if device == "cuda" and precision == "tf32":
        assert (got.double() - want).abs().max().item() > 2e-6 * scale  # one TF32 product really ran


@pytest.mark.parametrize("stride", [2, 3, 8])
def test_streaming_upsampling_for_random_chunks(stride: int) -> None:
    """The streaming op (the previous input frame as its whole state) reproduces the offline layer for random
    chunk sizes, batch rows kept apart."""
    gen = random.Random(stride)
    torch.manual_seed(stride)
    layer = torch.nn.ConvTranspose1d(16, 12, 2 * stride, stride, padding=math.ceil(stride / 2),
                                     output_padding=stride % 2)
    x = torch.randn(2, 16, 60)
    op = ConvTranspose(layer)
    state = op.init_state(2, x.device, x.dtype)
    pieces, start = [], 0
    with torch.no_grad():
        want = layer(x)
        while start < x.shape[-1]:
            n = gen.randint(1, 9)
            pieces.append(op.push(state, x[..., start:start + n]))
            start += n
        pieces.append(op.flush(state))
    got = torch.cat(pieces, dim=-1)
    assert op.emitted(x.shape[-1]) + stride - op.pad + op.extra == want.shape[-1]  # the pushes, then the flush
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
