"""Checkpoints: official-format round trips, interchange with the reference package, error paths, hub cache."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import snac
import torch

from helpers import (
    KEY_STYLES,
    SMALL_CONFIGS,
    decode_seeded,
    encode,
    make_audio,
    make_reference,
    max_abs_diff,
    model_pair,
    official_state_dict,
    pad_multiple,
    random_codes,
    save_official,
)
from snac_stream import PRESETS, SNAC, CheckpointError
from snac_stream.model import checkpoint

ROUND_TRIP_TOL = 1e-6
PARITY_TOL = 1e-4
HUB_ID = "hubertsiuzdak/snac_24khz"
SMALL = SMALL_CONFIGS["24k_like"]  # stands in for the 24 kHz checkpoint wherever size does not matter


def _decodable_codes(config: dict, seed: int = 0) -> list:
    coarse = config["vq_strides"][0]
    frames = 2 * math.lcm(coarse, config["attn_window_size"] or 1) // coarse
    return random_codes(config, batch=2, coarse_frames=frames, seed=seed)


def _assert_same_codec(a, b, config: dict, tol: float, seed: int = 0) -> None:
    """Same codes for the same audio and decoded audio within ``tol`` (noise drawn from the same seed)."""
    audio = make_audio(2, pad_multiple(config) + 101, seed=seed)
    codes_a, codes_b = encode(a, audio), encode(b, audio)
    assert len(codes_a) == len(codes_b)
    for level, (x, y) in enumerate(zip(codes_a, codes_b)):
        assert torch.equal(x, y), f"codes differ at level {level}"
    for codes in (codes_a, _decodable_codes(config, seed)):
        diff = max_abs_diff(decode_seeded(a, codes, 99), decode_seeded(b, codes, 99))
        assert diff <= tol, f"decoded audio differs by {diff:.3g}"


# ---- round trips ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
@pytest.mark.parametrize("key_style", KEY_STYLES)
def test_save_load_round_trip(name, key_style, tmp_path):
    config = SMALL_CONFIGS[name]
    _, ours = model_pair(config, seed=3, tmp_path=tmp_path / "src", key_style="legacy", noise_mode="deterministic")
    out = ours.save_pretrained(tmp_path / "saved", key_style=key_style)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "pytorch_model.bin"]
    assert json.loads((out / "config.json").read_text()) == ours.config.to_dict()
    reloaded = SNAC.from_pretrained(out)  # default deterministic noise, seed 0 on both
    assert not reloaded.training
    assert reloaded.config == ours.config
    _assert_same_codec(ours, reloaded, config, ROUND_TRIP_TOL)
    for key, value in ours.state_dict().items():
        assert max_abs_diff(reloaded.state_dict()[key], value) <= 1e-6 * max(1.0, value.abs().max().item()), key


@pytest.mark.parametrize("key_style", KEY_STYLES)
def test_saved_file_has_official_keys_and_shapes(key_style, tmp_path):
    """Our file holds exactly the tensors the reference's state dict has, in the requested key style."""
    config = SMALL_CONFIGS["44k_like_attn"]
    ref, ours = model_pair(config, seed=4, tmp_path=tmp_path, key_style="parametrizations")
    ours.save_pretrained(tmp_path / "saved", key_style=key_style)
    saved = torch.load(tmp_path / "saved" / "pytorch_model.bin", weights_only=True)
    expected = official_state_dict(ref, key_style)
    assert sorted(saved) == sorted(expected)
    for key in expected:
        assert saved[key].shape == expected[key].shape, key
        assert saved[key].dtype == expected[key].dtype, key
    marker = ".weight_g" if key_style == "legacy" else ".parametrizations.weight.original0"
    assert any(k.endswith(marker) for k in saved)


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_layout_matches_reference(preset):
    """For the full-size official configs, our unfolded state dict has the reference's keys and shapes."""
    config = PRESETS[preset].to_dict()
    with torch.random.fork_rng(devices=[]):
        reference_state = official_state_dict(snac.SNAC(**config), "legacy")
        ours = SNAC.from_config(preset)
    state = checkpoint.unfold_weight_norm(ours, "legacy")
    assert sorted(state) == sorted(reference_state)
    assert all(state[k].shape == reference_state[k].shape for k in state)


@pytest.mark.parametrize("name", ["24k_like", "44k_like_attn", "odd_strides_window4"])
@pytest.mark.parametrize("key_style", KEY_STYLES)
def test_our_checkpoint_loads_into_reference(name, key_style, tmp_path):
    config = SMALL_CONFIGS[name]
    _, ours = model_pair(config, seed=5, tmp_path=tmp_path / "src", key_style="legacy", noise_mode="torch")
    ours.save_pretrained(tmp_path / "saved", key_style=key_style)
    ref = snac.SNAC.from_pretrained(str(tmp_path / "saved"))  # strict load_state_dict
    _assert_same_codec(ours, ref, config, PARITY_TOL)


@pytest.mark.parametrize("key_style", KEY_STYLES)
def test_safetensors_checkpoint_loads(key_style, tmp_path):
    from safetensors.torch import save_file

    config = SMALL_CONFIGS["44k_like_attn"]
    ref = make_reference(config, seed=6)
    directory = tmp_path / "st"
    save_official(ref, directory, key_style)
    (directory / "pytorch_model.bin").unlink()
    save_file(official_state_dict(ref, key_style), str(directory / "model.safetensors"))
    ours = SNAC.from_pretrained(directory, noise_mode="torch")
    _assert_same_codec(ours, ref, config, PARITY_TOL)


def test_map_location_and_name(tmp_path):
    directory = save_official(make_reference(SMALL, seed=7), tmp_path / "ckpt")
    model = SNAC.from_pretrained(directory, map_location="cpu")
    assert model.device == torch.device("cpu")
    assert model.dtype == torch.float32
    assert model.name == str(directory)


# ---- error paths ---------------------------------------------------------------------------------------

@pytest.fixture
def small_ckpt(tmp_path) -> Path:
    """A valid legacy-style checkpoint directory of the small 24 kHz-like config."""
    return save_official(make_reference(SMALL, seed=8), tmp_path / "ckpt", "legacy")


def test_checkpoint_error_is_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        SNAC.from_pretrained(tmp_path)


def test_config_without_weights(small_ckpt):
    (small_ckpt / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match=r"no weights.*pytorch_model\.bin.*model\.safetensors"):
        SNAC.from_pretrained(small_ckpt)


def test_path_to_a_file(small_ckpt):
    with pytest.raises(CheckpointError, match=r"is a file; pass the directory"):
        SNAC.from_pretrained(small_ckpt / "config.json")


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "empty"])
def test_corrupt_weights(small_ckpt, corruption):
    path = small_ckpt / "pytorch_model.bin"
    data = path.read_bytes()
    if corruption == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif corruption == "garbage":
        path.write_bytes(bytes(range(256)) * 40)
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"cannot read weights from .*pytorch_model\.bin"):
        SNAC.from_pretrained(small_ckpt)


def test_corrupt_safetensors(small_ckpt):
    (small_ckpt / "pytorch_model.bin").unlink()
    (small_ckpt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"cannot read weights from .*model\.safetensors"):
        SNAC.from_pretrained(small_ckpt)


class _Exploit:
    """Unpickling this would create a file: torch.load(weights_only=True) must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused(small_ckpt, tmp_path):
    marker = tmp_path / "executed"
    torch.save({"encoder.block.0.weight": _Exploit(str(marker))}, small_ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"cannot read weights"):
        SNAC.from_pretrained(small_ckpt)
    assert not marker.exists()


def test_weights_not_a_state_dict(small_ckpt):
    torch.save({"encoder.block.0.weight": 3}, small_ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"does not hold a state dict of tensors"):
        SNAC.from_pretrained(small_ckpt)


@pytest.mark.parametrize("text", ["{not json", "", "{\"sampling_rate\": 24000,}"])
def test_invalid_json(small_ckpt, text):
    (small_ckpt / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        SNAC.from_pretrained(small_ckpt)


def test_config_not_an_object(small_ckpt):
    (small_ckpt / "config.json").write_text("[24000, 48]")
    with pytest.raises(CheckpointError, match=r"must hold a JSON object"):
        SNAC.from_pretrained(small_ckpt)


def test_config_unknown_key(small_ckpt):
    config = json.loads((small_ckpt / "config.json").read_text())
    config["hop_size"] = 512
    (small_ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unknown SNAC config keys: \['hop_size'\]"):
        SNAC.from_pretrained(small_ckpt)


def test_config_invalid_value(small_ckpt):
    config = json.loads((small_ckpt / "config.json").read_text())
    config["decoder_rates"] = [8, 8, 4, 3]  # product differs from the encoder's
    (small_ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: .*same product"):
        SNAC.from_pretrained(small_ckpt)


def test_config_weights_shape_mismatch(small_ckpt):
    config = json.loads((small_ckpt / "config.json").read_text())
    config["decoder_dim"] = 2 * config["decoder_dim"]
    (small_ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"has shape \(.*\) but config\.json implies \("):
        SNAC.from_pretrained(small_ckpt)


def test_config_codebook_size_mismatch(small_ckpt):
    config = json.loads((small_ckpt / "config.json").read_text())
    config["codebook_size"] = 2 * config["codebook_size"]
    (small_ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"codebook\.weight has shape"):
        SNAC.from_pretrained(small_ckpt)


def test_weights_missing_noise_blocks(tmp_path):
    """Config says noise=True, weights come from a noise-free model: the noise blocks' weights are missing."""
    directory = save_official(make_reference({**SMALL, "noise": False}, seed=9), tmp_path / "ckpt")
    (directory / "config.json").write_text(json.dumps(SMALL))
    with pytest.raises(CheckpointError, match=r"does not fit its config\.json: missing .*linear\.weight"):
        SNAC.from_pretrained(directory)


def test_weights_with_unexpected_key(small_ckpt):
    state = torch.load(small_ckpt / "pytorch_model.bin", weights_only=True)
    state["decoder.extra.weight"] = torch.zeros(3)
    torch.save(state, small_ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"unexpected decoder\.extra\.weight"):
        SNAC.from_pretrained(small_ckpt)


@pytest.mark.parametrize("key_style", KEY_STYLES)
@pytest.mark.parametrize("drop", ["g", "v"])
def test_weight_norm_half_pair(tmp_path, key_style, drop):
    directory = save_official(make_reference(SMALL, seed=10), tmp_path / "ckpt", key_style)
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    g_suffix, v_suffix = checkpoint._KEY_STYLES[key_style]
    victim = "decoder.model.1.weight"  # the depthwise decoder's 1x1 input conv
    del state[victim.removesuffix(".weight") + (g_suffix if drop == "g" else v_suffix)]
    torch.save(state, directory / "pytorch_model.bin")
    lacking = "magnitude \\(g\\)" if drop == "g" else "direction \\(v\\)"
    with pytest.raises(CheckpointError, match=rf"'decoder\.model\.1' lack their {lacking}"):
        SNAC.from_pretrained(directory)


def test_fold_weight_norm_matches_reference_parametrization():
    """Folding (g, v) gives the exact weight the reference's parametrization computes."""
    ref = make_reference(SMALL, seed=11)
    for key_style in KEY_STYLES:
        folded = checkpoint.fold_weight_norm(official_state_dict(ref, key_style))
        for name, module in ref.named_modules():
            if hasattr(module, "parametrizations"):
                assert torch.equal(folded[name + ".weight"], module.weight.detach()), name


# ---- hub -----------------------------------------------------------------------------------------------

@pytest.fixture
def hf_offline(monkeypatch, tmp_path):
    """Offline hub with an empty HF_HOME; returns an (empty) cache_dir inside tmp_path.

    huggingface_hub reads HF_HUB_OFFLINE when first imported, so its constant is patched as well.
    """
    import huggingface_hub.constants

    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub_cache"
    cache.mkdir()
    return cache


def populate_hub_cache(cache_dir: Path, repo_id: str, files: dict, commit: str = "0123456789abcdef" * 2 + "01234567") -> Path:
    """Lay ``files`` (name -> source path) out as huggingface_hub caches a download of ``repo_id`` at ``main``."""
    assert len(commit) == 40
    root = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for name, source in files.items():
        (snapshot / name).write_bytes(Path(source).read_bytes())
    return snapshot


@pytest.mark.parametrize("name", [HUB_ID, "24khz", "snac_24khz"])
def test_hub_offline_without_cache_explains(hf_offline, name):
    with pytest.raises(CheckpointError) as info:
        SNAC.from_pretrained(name, cache_dir=str(hf_offline))
    message = str(info.value)
    assert HUB_ID in message
    assert "offline" in message
    assert "from_pretrained('DIR')" in message
    assert "--local-dir DIR" in message


def test_hub_offline_from_cache(hf_offline, tmp_path):
    ref = make_reference(SMALL, seed=12)
    source = save_official(ref, tmp_path / "src", "legacy")
    populate_hub_cache(hf_offline, HUB_ID, {"config.json": source / "config.json",
                                            "pytorch_model.bin": source / "pytorch_model.bin"})
    for name in (HUB_ID, "24khz"):
        ours = SNAC.from_pretrained(name, cache_dir=str(hf_offline), noise_mode="torch")
        assert ours.name == name
        assert ours.config.to_dict() == SMALL
        _assert_same_codec(ours, ref, SMALL, PARITY_TOL)


def test_hub_offline_from_cache_at_commit(hf_offline, tmp_path):
    source = save_official(make_reference(SMALL, seed=13), tmp_path / "src", "legacy")
    commit = "f" * 40
    populate_hub_cache(hf_offline, HUB_ID, {"config.json": source / "config.json",
                                            "pytorch_model.bin": source / "pytorch_model.bin"}, commit=commit)
    ours = SNAC.from_pretrained(HUB_ID, revision=commit, cache_dir=str(hf_offline))
    assert ours.config.to_dict() == SMALL
    with pytest.raises(CheckpointError, match=r"cannot fetch"):
        SNAC.from_pretrained(HUB_ID, revision="e" * 40, cache_dir=str(hf_offline))


def test_hub_offline_safetensors_only_cache(hf_offline, tmp_path):
    """A cached repository holding model.safetensors (no pytorch_model.bin) loads offline."""
    from safetensors.torch import save_file

    ref = make_reference(SMALL, seed=14)
    source = save_official(ref, tmp_path / "src", "legacy")
    save_file(official_state_dict(ref, "legacy"), str(source / "model.safetensors"))
    populate_hub_cache(hf_offline, HUB_ID, {"config.json": source / "config.json",
                                            "model.safetensors": source / "model.safetensors"})
    ours = SNAC.from_pretrained(HUB_ID, cache_dir=str(hf_offline), noise_mode="torch")
    _assert_same_codec(ours, ref, SMALL, PARITY_TOL)


def test_hub_offline_cache_without_weights_is_an_error(hf_offline, small_ckpt):
    populate_hub_cache(hf_offline, HUB_ID, {"config.json": small_ckpt / "config.json"})
    with pytest.raises(CheckpointError, match=HUB_ID):
        SNAC.from_pretrained(HUB_ID, cache_dir=str(hf_offline))


def test_hub_offline_cache_without_weights_says_offline(hf_offline, small_ckpt):
    populate_hub_cache(hf_offline, HUB_ID, {"config.json": small_ckpt / "config.json"})
    with pytest.raises(CheckpointError, match=r"offline|cache"):
        SNAC.from_pretrained(HUB_ID, cache_dir=str(hf_offline))


def test_missing_local_directory_says_so(hf_offline, tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(CheckpointError, match=r"(?i)does not exist|no such|not found"):
        SNAC.from_pretrained(missing)


def test_missing_local_directory_is_a_checkpoint_error(hf_offline, tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(CheckpointError, match=re.escape(str(missing))):
        SNAC.from_pretrained(missing)


_OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from snac_stream import SNAC, CheckpointError
    cache_dir, name = sys.argv[1], sys.argv[2]
    try:
        model = SNAC.from_pretrained(name, cache_dir=cache_dir)
    except CheckpointError as exc:
        print(json.dumps({"error": str(exc)}))
    else:
        print(json.dumps({"config": model.config.to_dict()}))
    """
)


def test_hub_offline_env_in_fresh_process(tmp_path):
    """HF_HUB_OFFLINE=1 set before import (no patching): no cache -> explained error; cache -> loads."""
    home, cache = tmp_path / "hf_home", tmp_path / "hub_cache"
    home.mkdir()
    cache.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}
    env.pop("HF_HUB_CACHE", None)

    def run() -> dict:
        proc = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT, str(cache), HUB_ID], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    result = run()
    assert "error" in result, result
    assert "offline" in result["error"] and "from_pretrained('DIR')" in result["error"]

    source = save_official(make_reference(SMALL, seed=15), tmp_path / "src", "legacy")
    populate_hub_cache(cache, HUB_ID, {"config.json": source / "config.json",
                                       "pytorch_model.bin": source / "pytorch_model.bin"})
    assert run() == {"config": SMALL}


# ---- failing fast without the hub -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["16khz", "snac_48khz", "24kHz-typo"])
def test_misspelled_preset_lists_the_presets(monkeypatch, name):
    """A name with no '/' that is not a preset or a directory is never sent to the hub."""
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("a misspelled preset reached the hub client")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    with pytest.raises(CheckpointError, match=r"unknown model .*24khz, 32khz, 44khz") as info:
        SNAC.from_pretrained(name)
    assert repr(name) in str(info.value)


def test_unresolvable_hub_reads_only_the_cache(monkeypatch, tmp_path):
    """A hub host that does not resolve: one look in the cache (no network request, no retries), then the
    one-line error that names the way out."""
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.snac-stream-test.invalid")
    calls = []
    real = huggingface_hub.hf_hub_download

    def spy(*args, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    with pytest.raises(CheckpointError) as info:
        SNAC.from_pretrained(HUB_ID, cache_dir=str(tmp_path / "empty_cache"))
    message = str(info.value)
    assert calls == [True], calls
    assert "\n" not in message and "cannot resolve hub.snac-stream-test.invalid" in message
    assert f"hf download {HUB_ID} --local-dir DIR" in message and "HF_HUB_OFFLINE" in message


def test_device_and_dtype_follow_the_parameters_wherever_they_go() -> None:
    """``model.device`` / ``model.dtype`` come from the first parameter, found once: they follow a conversion,
    a load that replaces the parameter objects (``assign=True``) and a copy of the model."""
    model = SNAC(**SMALL).eval()
    assert (model.device, model.dtype) == (torch.device("cpu"), torch.float32)
    model.double()
    assert model.dtype == torch.float64
    state = {k: v.float() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new parameter objects, float32 again
    assert model.dtype == torch.float32 and model._first_parameter() is next(model.parameters())
    copied = copy.deepcopy(model)
    assert copied._first_parameter() is next(copied.parameters())
    assert copied._first_parameter() is not model._first_parameter()
    assert len(model.state_dict()) == len(state)  # the kept parameter is not registered again
