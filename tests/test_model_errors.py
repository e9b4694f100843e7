"""Input validation of encode / decode / forward, and the decoder's noise modes."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from helpers import (
    SMALL_CONFIGS,
    decode_seeded,
    encode,
    make_audio,
    max_abs_diff,
    model_pair,
    random_codes,
)
from snac_stream import SNAC
from snac_stream.model.layers import NoiseBlock

CONFIG = SMALL_CONFIGS["24k_like"]  # 3 levels, codebook 512, noise, no attention
ATTN = SMALL_CONFIGS["44k_like_attn"]  # coarse stride 8, 32-frame windows: 4 coarse frames per window
WINDOW4 = SMALL_CONFIGS["odd_strides_window4"]  # coarse stride 2, 4-frame windows: 2 coarse frames per window


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(reference, ours with noise_mode="torch") for CONFIG."""
    return model_pair(CONFIG, seed=31, tmp_path=tmp_path_factory.mktemp("errors"), key_style="legacy")


@pytest.fixture(scope="module")
def model(pair) -> SNAC:
    return pair[1]


def _codes(config=CONFIG, batch: int = 1, frames: int = 2, seed: int = 0):
    return random_codes(config, batch=batch, coarse_frames=frames, seed=seed)


# ---- audio ---------------------------------------------------------------------------------------------

AUDIO_METHODS = ["encode", "forward"]


def _call(model: SNAC, method: str, audio):
    with torch.inference_mode():
        return getattr(model, method)(audio)


@pytest.mark.parametrize("method", AUDIO_METHODS)
@pytest.mark.parametrize("shape", [(100,), (1, 100), (1, 1, 1, 100)])
def test_audio_wrong_rank(model, method, shape):
    with pytest.raises(ValueError, match=rf"shape \(B, 1, T\), got {len(shape)} dims"):
        _call(model, method, torch.zeros(shape))


@pytest.mark.parametrize("method", AUDIO_METHODS)
def test_audio_stereo(model, method):
    with pytest.raises(ValueError, match=r"mono .* got 2 channels"):
        _call(model, method, torch.zeros(1, 2, 100))


@pytest.mark.parametrize("method", AUDIO_METHODS)
@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool])
def test_audio_integer(model, method, dtype):
    with pytest.raises(TypeError, match=rf"floating point.*got {dtype}"):
        _call(model, method, torch.zeros(1, 1, 100, dtype=dtype))


@pytest.mark.parametrize("method", AUDIO_METHODS)
@pytest.mark.parametrize("audio", [np.zeros((1, 1, 100), np.float32), [[[0.0] * 100]], None, 0.5],
                         ids=["ndarray", "list", "None", "float"])
def test_audio_not_a_tensor(model, method, audio):
    with pytest.raises(TypeError, match=rf"torch\.Tensor.*got {type(audio).__name__}"):
        _call(model, method, audio)


@pytest.mark.parametrize("method", AUDIO_METHODS)
@pytest.mark.parametrize("shape", [(1, 1, 0), (0, 1, 100)])
def test_audio_empty(model, method, shape):
    with pytest.raises(ValueError, match=r"audio is empty"):
        _call(model, method, torch.zeros(shape))


@pytest.mark.parametrize("method", AUDIO_METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_audio_not_finite(model, method, bad):
    audio = make_audio(2, 1000, seed=1)
    audio[1, 0, 517] = bad
    with pytest.raises(ValueError, match=r"NaN or infinite"):
        _call(model, method, audio)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_audio_other_float_dtypes_are_converted(model, dtype):
    audio = make_audio(1, 3000, seed=2).to(dtype)
    expected = encode(model, audio.float())  # the conversion the model is documented to do
    for a, b in zip(encode(model, audio), expected):
        assert torch.equal(a, b)


def test_audio_non_contiguous_accepted(model):
    audio = make_audio(2, 3000, seed=3)
    strided = torch.stack([audio, audio], dim=-1)[..., 0]
    assert not strided.is_contiguous()
    for a, b in zip(encode(model, strided), encode(model, audio)):
        assert torch.equal(a, b)


# ---- codes ---------------------------------------------------------------------------------------------

def _decode(model: SNAC, codes):
    with torch.inference_mode():
        return model.decode(codes)


@pytest.mark.parametrize("codes", [torch.zeros(3, 1, 8, dtype=torch.long), {"0": 1}, None],
                         ids=["tensor", "dict", "None"])
def test_codes_not_a_list(model, codes):
    with pytest.raises(TypeError, match=r"codes must be a list of 3 tensors"):
        _decode(model, codes)


@pytest.mark.parametrize("levels", [0, 2, 4])
def test_codes_wrong_number_of_levels(model, levels):
    codes = (_codes() * 2)[:levels]
    with pytest.raises(ValueError, match=rf"3 codebook levels, got {levels} code tensors"):
        _decode(model, codes)


def test_codes_element_not_a_tensor(model):
    codes = _codes()
    codes[1] = codes[1].tolist()
    with pytest.raises(TypeError, match=r"codes\[1\] must be a torch\.Tensor, got list"):
        _decode(model, codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool, torch.complex64])
def test_codes_not_integer(model, dtype):
    codes = _codes()
    codes[2] = codes[2].to(dtype)
    with pytest.raises(TypeError, match=rf"codes\[2\] must be an integer tensor, got {dtype}"):
        _decode(model, codes)


def test_codes_wrong_rank(model):
    codes = _codes()
    codes[0] = codes[0][0]
    with pytest.raises(ValueError, match=r"codes\[0\] must have shape \(B, T_0\), got \(2,\)"):
        _decode(model, codes)


@pytest.mark.parametrize("level", [0, 2])
@pytest.mark.parametrize("value", [-1, -4096, 512, 10**6])
def test_codes_out_of_range(model, level, value):
    codes = _codes(frames=3)
    codes[level][0, -1] = value
    with pytest.raises(ValueError, match=rf"codes\[{level}\] holds {value}, outside the codebook range \[0, 512\)"):
        _decode(model, codes)


def test_codes_at_range_edges_accepted(model):
    codes = _codes(frames=2)
    codes[0][0, 0], codes[0][0, 1] = 0, CONFIG["codebook_size"] - 1
    assert _decode(model, codes).shape == (1, 1, 2 * 4 * math.prod(CONFIG["encoder_rates"]))


@pytest.mark.parametrize("level,delta", [(1, 1), (1, -1), (2, 2), (2, -1)])
def test_codes_inconsistent_lengths(model, level, delta):
    codes = _codes(frames=3)
    good = codes[level].shape[1]
    codes[level] = torch.zeros(1, good + delta, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"codes\[{level}\] has shape \(1, {good + delta}\), expected \(1, {good}\)"):
        _decode(model, codes)


def test_codes_batch_mismatch(model):
    codes = _codes(batch=2, frames=3)
    codes[2] = codes[2][:1]
    with pytest.raises(ValueError, match=r"codes\[2\] has shape \(1, 12\), expected \(2, 12\)"):
        _decode(model, codes)


def test_codes_zero_frames(model):
    codes = [torch.zeros(1, 0, dtype=torch.long) for _ in range(3)]
    with pytest.raises(ValueError, match=r"no frames"):
        _decode(model, codes)


@pytest.mark.parametrize("config,frames,step", [(ATTN, 1, 4), (ATTN, 6, 4), (WINDOW4, 3, 2)],
                         ids=["attn32-1", "attn32-6", "window4-3"])
def test_codes_partial_attention_window(config, frames, step):
    attn_model = SNAC(**config)
    with pytest.raises(ValueError, match=rf"windows of {config['attn_window_size']} latent frames.*multiple of "
                                         rf"{step}, got {frames}"):
        _decode(attn_model, _codes(config, frames=frames))
    # whole windows decode
    assert _decode(attn_model, _codes(config, frames=step)).shape[-1] == step * config["vq_strides"][0] * math.prod(
        config["encoder_rates"])


def test_codes_narrower_int_types_and_tuple_accepted(model):
    codes = _codes(batch=2, frames=3, seed=4)
    expected = decode_seeded(model, codes, 0)
    for converted in ([c.to(torch.int32) for c in codes], tuple(codes), [c.to(torch.int16) for c in codes]):
        assert torch.equal(decode_seeded(model, converted, 0), expected)


# ---- noise modes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["Torch", "random", "", None, 0])
def test_invalid_noise_mode(mode, tmp_path):
    with pytest.raises(ValueError, match=r"noise_mode must be one of"):
        SNAC(**CONFIG, noise_mode=mode)
    model = SNAC(**CONFIG)
    with pytest.raises(ValueError, match=r"noise_mode must be one of"):
        model.noise_mode = mode
    assert model.noise_mode == "deterministic"


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_invalid_noise_seed(seed):
    with pytest.raises(ValueError, match=r"noise_seed must be a non-negative int"):
        SNAC(**CONFIG, noise_seed=seed)


def test_invalid_noise_mode_in_from_pretrained(pair, tmp_path):
    _, ours = pair
    ours.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"noise_mode must be one of"):
        SNAC.from_pretrained(tmp_path, noise_mode="gaussian")


def _noise_blocks(model: SNAC):
    return [m for m in model.modules() if isinstance(m, NoiseBlock)]


def test_noise_mode_reaches_every_block(model):
    clone = copy.deepcopy(model)
    assert len(_noise_blocks(clone)) == len(CONFIG["decoder_rates"])
    for mode in ("off", "deterministic", "torch"):
        clone.noise_mode = mode
        assert all(b.mode == mode for b in _noise_blocks(clone))
    clone.noise_seed = 17
    assert all(b.seed == 17 for b in _noise_blocks(clone))


def test_off_equals_zeroed_noise_weights(model):
    """"off" adds nothing: it equals the deterministic mode with every noise block's linear weight zeroed."""
    off = copy.deepcopy(model)
    off.noise_mode = "off"
    zeroed = copy.deepcopy(model)
    zeroed.noise_mode = "deterministic"
    with torch.no_grad():
        for block in _noise_blocks(zeroed):
            block.linear.weight.zero_()
    noisy = copy.deepcopy(model)
    noisy.noise_mode = "deterministic"
    codes = _codes(batch=2, frames=3, seed=5)
    expected = decode_seeded(zeroed, codes, 0)
    assert torch.equal(decode_seeded(off, codes, 1), expected)
    assert max_abs_diff(decode_seeded(noisy, codes, 0), expected) > 1e-3  # the noise does matter here
    # forward: the same, and its codes do not depend on noise
    audio = make_audio(2, 3000, seed=6)
    with torch.inference_mode():
        off_audio, off_codes = off(audio)
        zero_audio, zero_codes = zeroed(audio)
    assert torch.equal(off_audio, zero_audio)
    assert all(torch.equal(a, b) for a, b in zip(off_codes, zero_codes))


def test_off_and_deterministic_leave_torch_rng_alone(model):
    codes = _codes(batch=2, frames=3, seed=7)
    for mode in ("off", "deterministic"):
        clone = copy.deepcopy(model)
        clone.noise_mode = mode
        torch.manual_seed(123)
        state = torch.get_rng_state()
        with torch.inference_mode():
            clone.decode(codes)
            clone(make_audio(1, 2000))
        assert torch.equal(torch.get_rng_state(), state), mode


def test_deterministic_is_reproducible_and_ignores_global_rng(model):
    clone = copy.deepcopy(model)
    clone.noise_mode = "deterministic"
    codes = _codes(batch=2, frames=3, seed=8)
    first = decode_seeded(clone, codes, 0)
    assert torch.equal(decode_seeded(clone, codes, 12345), first)
    with torch.inference_mode():
        assert torch.equal(clone.decode(codes), first)  # whatever state the RNG is in now
    # an independently constructed model with the same weights and seed agrees
    other = copy.deepcopy(model)
    other.noise_mode = "deterministic"
    assert torch.equal(decode_seeded(other, codes, 77), first)
    # the seed matters
    other.noise_seed = 1
    assert max_abs_diff(decode_seeded(other, codes, 0), first) > 1e-3


def test_torch_mode_consumes_rng_like_reference(pair):
    ref, ours = pair
    assert ours.noise_mode == "torch"
    codes = _codes(batch=2, frames=3, seed=9)
    a = decode_seeded(ours, codes, 5)
    ours_state = torch.get_rng_state()
    b = decode_seeded(ref, codes, 5)
    ref_state = torch.get_rng_state()
    assert torch.equal(ours_state, ref_state), "different number of random draws than the reference"
    assert max_abs_diff(a, b) <= 1e-4
    # it really is torch's RNG: same seed -> same audio, another seed -> other audio, state advances
    assert torch.equal(decode_seeded(ours, codes, 5), a)
    assert max_abs_diff(decode_seeded(ours, codes, 6), a) > 1e-3
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with torch.inference_mode():
        ours.decode(codes)
    assert not torch.equal(torch.get_rng_state(), before)


def test_noise_mode_irrelevant_without_noise_blocks():
    config = SMALL_CONFIGS["dense_no_noise"]
    base = SNAC(**config)
    codes = random_codes(config, batch=1, coarse_frames=2)
    expected = decode_seeded(base, codes, 0)
    for mode in ("off", "torch", "deterministic"):
        base.noise_mode = mode
        assert torch.equal(decode_seeded(base, codes, 3), expected), mode
