"""The Triton backend against the PyTorch backend, for the whole model and the streaming objects.

On a machine without CUDA the kernels run in Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so these small structures cover the same dispatch and kernel paths the GPU runs;
``test_gpu_*`` repeats the checks at full size on a GPU.
"""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch

from snac_stream import PRESETS, SNAC
from snac_stream.model.functional import resolve_backend

STRUCTURES: Dict[str, dict] = {
    # 32/44 kHz shape in miniature: attention windows, noise, depthwise, 4 levels
    "attention": dict(sampling_rate=8000, encoder_dim=16, encoder_rates=[2, 3], decoder_dim=64, decoder_rates=[3, 2],
                      attn_window_size=4, vq_strides=[4, 2, 1], codebook_size=64, noise=True, depthwise=True),
    # dense convs everywhere (non-depthwise), odd strides, no attention
    "dense": dict(sampling_rate=8000, encoder_dim=4, encoder_rates=[2, 5], decoder_dim=16, decoder_rates=[5, 2],
                  attn_window_size=None, vq_strides=[2, 1], codebook_size=32, noise=True, depthwise=False),
}
AUDIO_TOL = 1e-4
# The small structures run on the GPU when there is one, else on the CPU interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model(name: str, backend: str) -> SNAC:
    torch.manual_seed(0)
    model = SNAC(**STRUCTURES[name], backend=backend).eval()
    with torch.no_grad():  # non-trivial snake alphas and biases, so every epilogue matters
        gen = torch.Generator().manual_seed(1)
        for pname, p in model.named_parameters():
            if pname.endswith("alpha"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif pname.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.to(DEVICE)


def _split(codes: List[torch.Tensor], frames: int, sizes: List[int]) -> List[List[torch.Tensor]]:
    out, start, i = [], 0, 0
    while start < frames:
        stop = min(frames, start + sizes[i % len(sizes)])
        out.append([c[:, start * c.shape[1] // frames : stop * c.shape[1] // frames] for c in codes])
        start, i = stop, i + 1
    return out


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_triton_backend_matches_torch_offline(name: str) -> None:
    ref, fused = _model(name, "torch"), _model(name, "triton")
    cfg = ref.config
    audio = torch.randn(2, 1, 2 * cfg.pad_multiple + 37, generator=torch.Generator().manual_seed(2)).to(DEVICE) * 0.3
    with torch.no_grad():
        codes_ref, codes = ref.encode(audio), fused.encode(audio)
        assert all(torch.equal(a, b) for a, b in zip(codes, codes_ref))
        err = (fused.decode(codes_ref) - ref.decode(codes_ref)).abs().max().item()
        assert err <= AUDIO_TOL, err
        audio_hat, codes_fwd = fused(audio)
        assert audio_hat.shape == audio.shape and all(torch.equal(a, b) for a, b in zip(codes_fwd, codes_ref))


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_triton_streaming_matches_torch_offline(name: str) -> None:
    ref, fused = _model(name, "torch"), _model(name, "triton")
    cfg = ref.config
    audio = torch.randn(1, 1, 2 * cfg.pad_multiple + 11, generator=torch.Generator().manual_seed(3)).to(DEVICE) * 0.3
    with torch.no_grad():
        want_codes = ref.encode(audio)
        enc = fused.streaming_encoder()
        parts = [enc.push(audio[..., s : s + 97]) for s in range(0, audio.shape[-1], 97)] + [enc.flush()]
        codes = [torch.cat([p[i] for p in parts], -1) for i in range(ref.n_codebooks)]
        assert all(torch.equal(a, b) for a, b in zip(codes, want_codes))
        dec = fused.streaming_decoder()
        frames = codes[0].shape[-1]
        step = cfg.pad_multiple // cfg.frame_samples
        out = torch.cat([dec.push(c) for c in _split(codes, frames, [step, 2 * step])] + [dec.flush()], -1)
        err = (out - ref.decode(codes)).abs().max().item()
        assert out.shape[-1] == frames * cfg.frame_samples and err <= AUDIO_TOL, err


@pytest.mark.parametrize("split", [True, False])
def test_triton_tf32x3_with_operands_split_either_way_matches_torch(split: bool) -> None:
    """At tf32x3 every dense conv splits its operands before the kernel (``split_operands(True)``; the rule
    does for those with taps) or in registers with the rows-first product (``split_operands(False)``; rows first
    asked for here, the interpreter's rule being the other form, its products fp32 either way): the same codes
    and audio as the PyTorch backend, offline and streaming."""
    from snac_stream.kernels.conv import product_form, rows_first_products, split_operands

    ref, fused = _model("dense", "torch"), _model("dense", "triton")
    fused.precision = "tf32x3"
    cfg = ref.config
    audio = torch.randn(1, 1, 2 * cfg.pad_multiple + 5, generator=torch.Generator().manual_seed(4)).to(DEVICE) * 0.3
    forms = []
    original = product_form

    def recording(*args, **kwargs):
        forms.append(original(*args, **kwargs))
        return forms[-1]

    with torch.no_grad(), split_operands(split), rows_first_products(True), pytest.MonkeyPatch.context() as patch:
        patch.setattr("snac_stream.kernels.conv.product_form", recording)
        codes_ref = ref.encode(audio)
        assert all(torch.equal(a, b) for a, b in zip(fused.encode(audio), codes_ref))
        assert (fused.decode(codes_ref) - ref.decode(codes_ref)).abs().max().item() <= AUDIO_TOL
        dec = fused.streaming_decoder()
        frames = codes_ref[0].shape[-1]
        out = torch.cat([dec.push(c) for c in _split(codes_ref, frames, [cfg.pad_multiple // cfg.frame_samples])]
                        + [dec.flush()], -1)
        assert (out - ref.decode(codes_ref)).abs().max().item() <= AUDIO_TOL
    assert set(forms) == {"split" if split else "rows_first"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's refusal of backend='triton'")
def test_backend_choice_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        SNAC(**STRUCTURES["dense"], backend="cuda")
    model = _model("dense", "torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "fast"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="runs on CUDA devices"):
        model.streaming_decoder(backend="triton")
    with pytest.raises(RuntimeError, match="runs on CUDA devices"):
        _model("dense", "triton").encode(torch.zeros(1, 1, 100))


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the tests above cover "
                               "the same paths on the CPU interpreter")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("preset", list(PRESETS))
def test_gpu_full_size_triton_matches_torch(preset: str) -> None:
    torch.manual_seed(0)
    model = SNAC.from_config(preset).cuda().eval()
    cfg = model.config
    audio = torch.randn(2, 1, 3 * cfg.pad_multiple, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    audio = audio * 0.1
    with torch.no_grad():
        model.backend = "torch"
        codes_ref = model.encode(audio)
        audio_ref = model.decode(codes_ref)
        model.backend = "triton"
        codes = model.encode(audio)
        flips = sum(int((a != b).sum()) for a, b in zip(codes, codes_ref))
        assert flips == 0, f"{flips} codes differ"
        assert (model.decode(codes_ref) - audio_ref).abs().max().item() <= AUDIO_TOL
        dec = model.streaming_decoder(batch_size=codes_ref[0].shape[0], backend="triton")
        frames = codes_ref[0].shape[-1]
        step = cfg.pad_multiple // cfg.frame_samples
        out = torch.cat([dec.push(c) for c in _split(codes_ref, frames, [step])] + [dec.flush()], -1)
        assert (out - audio_ref).abs().max().item() <= AUDIO_TOL


def test_precision_reaches_the_dense_conv_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """``model.precision`` is what the Triton dense convs get, offline and streaming; bad values refused."""
    from snac_stream.kernels import conv as kernels

    seen: List[str] = []
    original = kernels.snake_conv
    monkeypatch.setattr(kernels, "snake_conv", lambda *a, **k: seen.append(k["precision"]) or original(*a, **k))
    model = _model("dense", "triton")
    cfg = model.config
    codes = [torch.randint(0, cfg.codebook_size, (1, 2 * cfg.pad_multiple // cfg.hop_length // s)).to(DEVICE)
             for s in cfg.vq_strides]
    with torch.no_grad():
        for precision in ("tf32", "ieee"):
            model.precision = precision
            seen.clear()
            model.decode(codes)
            dec = model.streaming_decoder()
            dec.push(codes)
            dec.flush()
            assert seen and set(seen) == {precision}
    with pytest.raises(ValueError, match="precision must be one of"):
        model.precision = "fp16"
    with pytest.raises(ValueError, match="precision must be one of"):
        SNAC(**STRUCTURES["dense"], precision="bf16")


def test_decoder_snakes_run_as_one_triton_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the Triton backend the snake before each transposed conv (no conv absorbs it) is one kernel pass
    offline, and streaming it is folded into the pass that builds the upsampling product's rows; the torch
    backend keeps PyTorch's arithmetic."""
    from snac_stream.kernels import conv as kernels
    from snac_stream.kernels import upsampling

    calls: List[tuple] = []
    folded: List[bool] = []
    original, original_pairs = kernels.snake_activation, upsampling.phase_pairs
    monkeypatch.setattr(kernels, "snake_activation", lambda x, a: calls.append(tuple(x.shape)) or original(x, a))
    monkeypatch.setattr(upsampling, "phase_pairs",
                        lambda x, c, a, p: folded.append(a is not None) or original_pairs(x, c, a, p))
    model = _model("attention", "triton")
    cfg = model.config
    codes = [torch.randint(0, cfg.codebook_size, (1, 2 * cfg.pad_multiple // cfg.hop_length // s)).to(DEVICE)
             for s in cfg.vq_strides]
    with torch.no_grad():
        model.decode(codes)
        assert len(calls) == len(cfg.decoder_rates)
        calls.clear()
        dec = model.streaming_decoder()
        dec.push(codes)
        dec.flush()
        assert not calls
        assert len(folded) >= len(cfg.decoder_rates) and all(folded)
        folded.clear()
        model.backend = "torch"
        model.decode(codes)
        dec = model.streaming_decoder()
        dec.push(codes)
        dec.flush()
        assert not calls and not folded


@pytest.mark.gpu
@needs_gpu
def test_gpu_tf32_precision_is_faster_arithmetic_not_another_model() -> None:
    """Full-size 24 kHz decode at precision "tf32": close to fp32, but measurably less so than the default."""
    torch.manual_seed(0)
    model = SNAC.from_config("24khz").cuda().eval()
    cfg = model.config
    codes = [torch.randint(0, cfg.codebook_size, (2, 16 * cfg.coarse_stride // s), device="cuda")
             for s in cfg.vq_strides]
    with torch.no_grad():
        model.backend = "torch"
        ref = model.decode(codes)
        model.backend = "triton"
        default = model.decode(codes)
        model.precision = "tf32"
        fast = model.decode(codes)
    err_default, err_fast = (default - ref).abs().max().item(), (fast - ref).abs().max().item()
    assert err_default <= AUDIO_TOL and err_default < err_fast <= 5e-2, (err_default, err_fast)
