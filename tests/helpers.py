"""Shared test helpers: small configs, randomized reference models, official-format checkpoints.

Import from tests as ``from helpers import ...`` (``conftest.py`` puts this directory on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import snac
import torch
from torch import nn

from snac_stream import SNAC

# Small configs that keep the structure of the official ones (or probe corners they do not reach).
SMALL_CONFIGS: Dict[str, Dict[str, Any]] = {
    # 24 kHz layout (no attention, vq_strides [4, 2, 1], depthwise, noise) with narrow widths.
    "24k_like": dict(
        sampling_rate=24000, encoder_dim=8, encoder_rates=[2, 4, 8, 8], latent_dim=None,
        decoder_dim=64, decoder_rates=[8, 8, 4, 2], attn_window_size=None,
        codebook_size=512, codebook_dim=8, vq_strides=[4, 2, 1], noise=True, depthwise=True,
    ),
    # 32/44 kHz layout: local attention with 32-frame windows, four levels; 128 wide = two 64-wide heads.
    "44k_like_attn": dict(
        sampling_rate=44100, encoder_dim=8, encoder_rates=[2, 3, 8, 8], latent_dim=128,
        decoder_dim=128, decoder_rates=[8, 8, 3, 2], attn_window_size=32,
        codebook_size=1024, codebook_dim=8, vq_strides=[8, 4, 2, 1], noise=True, depthwise=True,
    ),
    # Odd strides (odd kernels, output_padding=1) and a 4-frame attention window; two levels.
    "odd_strides_window4": dict(
        sampling_rate=16000, encoder_dim=16, encoder_rates=[3, 5], latent_dim=None,
        decoder_dim=64, decoder_rates=[5, 3], attn_window_size=4,
        codebook_size=256, codebook_dim=4, vq_strides=[2, 1], noise=True, depthwise=True,
    ),
    # Full (non-depthwise) convolutions, no noise, no attention, an odd vq stride (6 = 2 * 3).
    "dense_no_noise": dict(
        sampling_rate=22050, encoder_dim=8, encoder_rates=[2, 3], latent_dim=None,
        decoder_dim=32, decoder_rates=[3, 2], attn_window_size=None,
        codebook_size=128, codebook_dim=4, vq_strides=[6, 3, 1], noise=False, depthwise=False,
    ),
    # Non-depthwise with attention over 8-frame windows, decoder rates in a different order, no noise.
    "dense_window8": dict(
        sampling_rate=16000, encoder_dim=16, encoder_rates=[4, 4], latent_dim=None,
        decoder_dim=64, decoder_rates=[2, 8], attn_window_size=8,
        codebook_size=256, codebook_dim=8, vq_strides=[4, 2, 1], noise=False, depthwise=False,
    ),
}

KEY_STYLES: Tuple[str, ...] = ("legacy", "parametrizations")

_PARAM_SUFFIXES = (".parametrizations.weight.original0", ".parametrizations.weight.original1")
_LEGACY_SUFFIXES = (".weight_g", ".weight_v")


def hop_length(config: Dict[str, Any]) -> int:
    """Audio samples per latent frame of ``config``."""
    return math.prod(config["encoder_rates"])


def pad_multiple(config: Dict[str, Any]) -> int:
    """Samples the reference pads audio to a multiple of before encoding."""
    return hop_length(config) * math.lcm(config["vq_strides"][0], config.get("attn_window_size") or 1)


def make_audio(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """(batch, 1, length) float32 test signal in about [-0.9, 0.9]: a few sines plus noise, per row different."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float64) / 16000.0
    rows = []
    for _ in range(batch):
        freqs = 80.0 + 2000.0 * torch.rand(3, generator=gen, dtype=torch.float64)
        phases = 2 * math.pi * torch.rand(3, generator=gen, dtype=torch.float64)
        x = sum(0.2 * torch.sin(2 * math.pi * f * t + p) for f, p in zip(freqs, phases))
        x = x + 0.1 * torch.randn(length, generator=gen, dtype=torch.float64)
        rows.append(x)
    return torch.stack(rows).unsqueeze(1).to(torch.float32).clamp(-0.9, 0.9)


def make_reference(config: Dict[str, Any], seed: int) -> snac.SNAC:
    """Reference ``snac.SNAC(**config)`` in eval mode, with weights randomized beyond its default init.

    Snake alphas are drawn in [0.5, 2], weight-norm magnitudes are the direction's norm times a factor in
    [0.5, 1.5] (so g != ||v||), conv biases, LayerNorm affine parameters, attention projections and
    codebooks are redrawn. Deterministic in ``seed``; torch's global RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = snac.SNAC(**config)
        gen = torch.Generator().manual_seed(seed + 1)

        def uniform(shape: torch.Size, low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(shape, generator=gen)

        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".alpha"):
                    param.copy_(uniform(param.shape, 0.5, 2.0))
                elif name.endswith(_PARAM_SUFFIXES[0]):  # magnitude g, shape (out, 1, ...)
                    v = dict(model.named_parameters())[name[: -len(_PARAM_SUFFIXES[0])] + _PARAM_SUFFIXES[1]]
                    norm = torch.norm_except_dim(v, 2, 0)
                    param.copy_(norm * uniform(param.shape, 0.5, 1.5))
                elif name.endswith(".bias") and param.dim() == 1 and ".norm." not in name:
                    param.copy_(uniform(param.shape, -0.1, 0.1))
                elif ".norm." in name:  # LayerNorm of local attention
                    if name.endswith(".weight"):
                        param.copy_(uniform(param.shape, 0.5, 1.5))
                    else:
                        param.copy_(uniform(param.shape, -0.2, 0.2))
                elif name.endswith((".to_qkv.weight", ".to_out.weight")):
                    param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1]))
                elif name.endswith("codebook.weight"):
                    param.copy_(torch.randn(param.shape, generator=gen))
    model.config_dict = dict(config)  # save_official writes it back as config.json
    return model.eval()


def reference_config(ref_model: snac.SNAC) -> Dict[str, Any]:
    """The constructor arguments of a reference model (as recorded by ``make_reference``, else inferred)."""
    if hasattr(ref_model, "config_dict"):
        return dict(ref_model.config_dict)
    first = ref_model.decoder.model[0]
    return dict(
        sampling_rate=int(ref_model.sampling_rate), encoder_dim=int(ref_model.encoder_dim),
        encoder_rates=list(ref_model.encoder_rates), latent_dim=int(ref_model.latent_dim),
        decoder_dim=int(ref_model.decoder_dim), decoder_rates=list(ref_model.decoder_rates),
        attn_window_size=ref_model.attn_window_size, codebook_size=int(ref_model.codebook_size),
        codebook_dim=int(ref_model.codebook_dim), vq_strides=list(ref_model.vq_strides),
        noise=any(type(m).__name__ == "NoiseBlock" for m in ref_model.decoder.modules()),
        depthwise=first.groups > 1,
    )


def to_key_style(state: Dict[str, torch.Tensor], key_style: str) -> Dict[str, torch.Tensor]:
    """Rename weight-norm keys of a state dict to ``key_style`` ("legacy" or "parametrizations")."""
    if key_style not in KEY_STYLES:
        raise ValueError(f"unknown key style {key_style!r}")
    source, target = (_PARAM_SUFFIXES, _LEGACY_SUFFIXES) if key_style == "legacy" else (_LEGACY_SUFFIXES, _PARAM_SUFFIXES)
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for src, dst in zip(source, target):
            if key.endswith(src):
                key = key[: -len(src)] + dst
                break
        out[key] = value.detach().clone().contiguous()
    return out


def official_state_dict(ref_model: snac.SNAC, key_style: str = "legacy") -> Dict[str, torch.Tensor]:
    """The reference model's state dict with weight-norm keys in ``key_style``."""
    return to_key_style(ref_model.state_dict(), key_style)


def save_official(ref_model: snac.SNAC, directory: Path | str, key_style: str = "legacy") -> Path:
    """Write ``config.json`` + ``pytorch_model.bin`` for a reference model, as the official hub files are laid out."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(reference_config(ref_model), indent=2) + "\n")
    torch.save(official_state_dict(ref_model, key_style), directory / "pytorch_model.bin")
    return directory


def model_pair(config: Dict[str, Any], seed: int, tmp_path: Path | str, key_style: str = "legacy",
               noise_mode: str = "torch") -> Tuple[snac.SNAC, SNAC]:
    """(randomized reference, ours loaded from its official-format checkpoint with ``noise_mode``)."""
    ref = make_reference(config, seed)
    directory = save_official(ref, Path(tmp_path) / f"ckpt_{key_style}_{seed}", key_style)
    ours = SNAC.from_pretrained(directory, noise_mode=noise_mode)
    return ref, ours


def decode_seeded(model: nn.Module, codes: List[torch.Tensor], seed: int) -> torch.Tensor:
    """``model.decode(codes)`` right after ``torch.manual_seed(seed)`` (so noise draws are reproducible)."""
    torch.manual_seed(seed)
    with torch.inference_mode():
        return model.decode(codes)


def forward_seeded(model: nn.Module, audio: torch.Tensor, seed: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``model(audio)`` right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    with torch.inference_mode():
        return model(audio)


def encode(model: nn.Module, audio: torch.Tensor) -> List[torch.Tensor]:
    """``model.encode(audio)`` without autograd."""
    with torch.inference_mode():
        return model.encode(audio)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest elementwise |a - b| (shapes must agree)."""
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def random_codes(config: Dict[str, Any], batch: int, coarse_frames: int, seed: int = 0) -> List[torch.Tensor]:
    """Valid random codes for ``config``: level i has ``coarse_frames * vq_strides[0] / vq_strides[i]`` frames."""
    gen = torch.Generator().manual_seed(seed)
    coarse = config["vq_strides"][0]
    return [
        torch.randint(0, config["codebook_size"], (batch, coarse_frames * coarse // s), generator=gen)
        for s in config["vq_strides"]
    ]


def offline_codec(model, audio: np.ndarray) -> np.ndarray:
    """Offline ``decode(encode(audio))`` of a mono float array, trimmed to its length."""
    from snac_stream.audio import to_tensor

    with torch.inference_mode():
        return model.decode(model.encode(to_tensor(audio)))[0, 0, : audio.shape[0]].numpy()


def run_cli(argv, capsys) -> Tuple[int, str]:
    """Run the command line in process: (exit status, stderr)."""
    from snac_stream.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err


def single_error(err: str) -> str:
    """The one ``error:`` line, which must end the output (progress lines may come before it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def espeak_speech(text: str, rate: int, directory: Path | str, voice: str = "en-us") -> np.ndarray:
    """``text`` spoken by espeak-ng (22050 Hz), as float32 mono resampled to ``rate``; the test fails if
    espeak-ng is missing (Debian: ``apt-get install -y espeak-ng``)."""
    import shutil
    import subprocess

    import pytest

    from snac_stream.audio import load_audio

    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.fail("espeak-ng is not installed; install it with `apt-get install -y espeak-ng`")
    path = Path(directory) / "espeak.wav"
    subprocess.run([espeak, "-v", voice, "-w", str(path), text], check=True, capture_output=True, timeout=60)
    return load_audio(path, rate)[0].astype(np.float32)


BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(script: str) -> Any:
    """A script of ``bench/`` as a module (``bench/`` on ``sys.path`` while it loads, for its sibling imports)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"bench_{script}", BENCH / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


async def settled_outcomes(server: Any, sessions: int, timeout: float = 5.0) -> dict:
    """A server's session outcomes (``stats["outcomes"]``) once ``sessions`` of them are counted, or after
    ``timeout`` s: a session's handler counts its outcome as it ends, just after the client has its last message."""
    deadline = time.monotonic() + timeout
    while sum(server.stats["outcomes"].values()) < sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return dict(server.stats["outcomes"])


async def settled_sessions(server: Any, timeout: float = 2.0) -> int:
    """A server's active sessions once none is left, or after ``timeout`` s: a session's handler frees its slot
    as it ends, just after the client has its last message."""
    deadline = time.monotonic() + timeout
    while server.active_sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return server.active_sessions
