"""Offline parity with the reference ``snac`` package: same checkpoint, same codes, same audio.

Every config is built as a randomized reference model, saved in the official format (both weight-norm key
styles) and loaded into ours with ``noise_mode="torch"``; noise draws are aligned by reseeding torch right
before each decode / forward.
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import (
    KEY_STYLES,
    SMALL_CONFIGS,
    decode_seeded,
    encode,
    forward_seeded,
    make_audio,
    make_reference,
    max_abs_diff,
    model_pair,
    pad_multiple,
    random_codes,
    save_official,
)
from snac_stream import PRESETS, SNAC

AUDIO_TOL = 1e-4
SEED = 1234

PRESET_CONFIGS = {f"preset_{name}": PRESETS[name].to_dict() for name in ("24khz", "32khz", "44khz")}
CONFIGS: Dict[str, dict] = {**SMALL_CONFIGS, **PRESET_CONFIGS}

# (batch, samples) per config, first the one decode tests use: lengths that are not multiples of the hop,
# batches of two.
_PRESET_CASES = {
    "preset_24khz": [(2, 7207), (1, 1)],
    "preset_32khz": [(1, 32000)],
    "preset_44khz": [(1, 13230)],
}


def audio_cases(name: str) -> List[Tuple[int, int]]:
    if name in _PRESET_CASES:
        return _PRESET_CASES[name]
    return [(2, 2 * pad_multiple(CONFIGS[name]) + 7), (1, 1), (2, 100), (1, 1000 + 7)]


def decodable_frames(config: dict) -> int:
    """Smallest coarse-frame count the decoder accepts (a whole attention window where there is one)."""
    coarse = config["vq_strides"][0]
    return math.lcm(coarse, config["attn_window_size"] or 1) // coarse


def _config_param(name: str):
    marks = [pytest.mark.slow] if name in PRESET_CONFIGS else []
    return pytest.param(name, id=name, marks=marks)


@pytest.fixture(scope="module", params=[_config_param(n) for n in CONFIGS])
def reference(request, tmp_path_factory):
    """(config name, randomized reference model, {key_style: checkpoint dir})."""
    name = request.param
    ref = make_reference(CONFIGS[name], seed=sum(map(ord, name)))
    root = tmp_path_factory.mktemp(name)
    dirs = {style: save_official(ref, root / style, style) for style in KEY_STYLES}
    yield name, ref, dirs


@pytest.fixture(scope="module", params=KEY_STYLES)
def pair(request, reference):
    """(config name, reference, ours loaded from the checkpoint in this key style)."""
    name, ref, dirs = reference
    ours = SNAC.from_pretrained(dirs[request.param], noise_mode="torch")
    yield name, ref, ours


def assert_codes_equal(ours: List[torch.Tensor], ref: List[torch.Tensor], what: str) -> None:
    assert len(ours) == len(ref), f"{what}: {len(ours)} levels, reference has {len(ref)}"
    for level, (a, b) in enumerate(zip(ours, ref)):
        assert a.dtype == torch.int64, f"{what}: level {level} dtype {a.dtype}"
        assert a.shape == b.shape, f"{what}: level {level} shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.equal(a, b), f"{what}: level {level} differs at {int((a != b).sum())} positions"


def assert_audio_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == ref.dtype
    diff = max_abs_diff(ours, ref)
    assert diff <= AUDIO_TOL, f"{what}: max |diff| {diff:.3g} > {AUDIO_TOL}"


def test_encode_codes_identical(pair):
    name, ref, ours = pair
    for i, (batch, length) in enumerate(audio_cases(name)):
        audio = make_audio(batch, length, seed=i)
        ref_codes = encode(ref, audio)
        assert_codes_equal(encode(ours, audio), ref_codes, f"{name} B={batch} T={length}")
        # The expected frame count follows from the padding rule: ceil(T / pad_multiple) blocks.
        frames = math.ceil(length / pad_multiple(CONFIGS[name])) * pad_multiple(CONFIGS[name]) // ours.hop_length
        assert [c.shape[-1] for c in ref_codes] == [frames // s for s in CONFIGS[name]["vq_strides"]]


def test_decode_matches_reference(pair):
    name, ref, ours = pair
    config = CONFIGS[name]
    batch, length = audio_cases(name)[0]
    code_sets = {
        "encoded": encode(ref, make_audio(batch, length, seed=7)),
        "random": random_codes(config, batch=2 if name not in PRESET_CONFIGS else 1,
                               coarse_frames=decodable_frames(config) * (1 if name in PRESET_CONFIGS else 3),
                               seed=3),
    }
    for kind, codes in code_sets.items():
        ref_audio = decode_seeded(ref, codes, SEED)
        our_audio = decode_seeded(ours, codes, SEED)
        frames = codes[-1].shape[-1] * config["vq_strides"][-1]
        assert our_audio.shape == (codes[0].shape[0], 1, frames * ours.hop_length)
        assert_audio_close(our_audio, ref_audio, f"{name} decode of {kind} codes")
        assert our_audio.abs().max() <= 1.0
        if config["noise"]:
            # The noise really is drawn: another seed gives other audio (so matching above is not vacuous).
            other = decode_seeded(ref, codes, SEED + 1)
            assert max_abs_diff(other, ref_audio) > 10 * AUDIO_TOL


def test_forward_matches_reference(pair):
    name, ref, ours = pair
    for i, (batch, length) in enumerate(audio_cases(name)):
        audio = make_audio(batch, length, seed=100 + i)
        ref_audio, ref_codes = forward_seeded(ref, audio, SEED + i)
        our_audio, our_codes = forward_seeded(ours, audio, SEED + i)
        what = f"{name} forward B={batch} T={length}"
        assert our_audio.shape == (batch, 1, length)
        assert_codes_equal(our_codes, ref_codes, what)
        assert_audio_close(our_audio, ref_audio, what)


@pytest.mark.parametrize("name", [n for n, c in SMALL_CONFIGS.items() if not c["noise"]])
@pytest.mark.parametrize("key_style", KEY_STYLES)
def test_default_noise_mode_matches_when_model_has_no_noise(name, key_style, tmp_path):
    """Without noise blocks the noise mode is irrelevant: the default model equals the reference exactly."""
    config = SMALL_CONFIGS[name]
    ref, ours = model_pair(config, seed=21, tmp_path=tmp_path, key_style=key_style, noise_mode="deterministic")
    codes = random_codes(config, batch=2, coarse_frames=2 * decodable_frames(config), seed=5)
    assert_audio_close(decode_seeded(ours, codes, 0), decode_seeded(ref, codes, 1), f"{name} decode")
    audio = make_audio(2, 1000 + 7, seed=5)
    assert_codes_equal(encode(ours, audio), encode(ref, audio), f"{name} encode")


_SHELLS: Dict[str, Tuple[object, SNAC]] = {}


def _shells() -> Dict[str, Tuple[object, SNAC]]:
    """(reference, ours) per config with the config's rates, strides and window but tiny widths.

    Padding depends on nothing else, so the presets' rule is checked without building 55M-parameter models.
    """
    if not _SHELLS:
        for name, config in CONFIGS.items():
            if name in PRESET_CONFIGS:
                config = {**config, "encoder_dim": 64 // 2 ** len(config["encoder_rates"]), "decoder_dim": 64,
                          "codebook_size": 16}
            _SHELLS[name] = (make_reference(config, seed=0), SNAC(**config))
    return _SHELLS


@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(sorted(CONFIGS)), length=st.integers(1, 40000), batch=st.integers(1, 3))
def test_preprocess_padding_matches_reference(name, length, batch):
    """Our right-padding gives the reference's padded length for any input length."""
    ref, ours = _shells()[name]
    audio = torch.randn(batch, 1, length)
    expected = ref.preprocess(audio)
    padded = ours.preprocess(audio)
    assert padded.shape == expected.shape
    assert torch.equal(padded, expected)
    assert padded.shape[-1] % ours.config.pad_multiple == 0
