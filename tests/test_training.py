"""Training and fine-tuning (snac_stream.training): losses, the differentiable forward, data, checkpoints,
resume, errors and the ``train`` command line functions.

Every run uses a tiny model (about 10 k parameters, 16 kHz, hop 4) and a few steps, so it stays on the CPU and
takes seconds; what the tests check (loss going down, official-format checkpoints that the reference package
loads, bit-identical resume) does not depend on the size.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from snac_stream import SNAC, SNACConfig
from snac_stream.training import (MINI_CONFIG, MultiScaleMelLoss, TrainConfig, Trainer, TrainingError,
                                  mel_filterbank, resolve_model_config, segment_samples, train, training_forward)
from snac_stream.training import data as data_mod
from snac_stream.training import espeak as espeak_mod
from snac_stream.cli.train import add_parsers as add_train_parser, run_train
from snac_stream.training.losses import hz_to_mel, mel_to_hz
from snac_stream.training.modeling import build_training_model, export_model, quantize

TINY = dict(sampling_rate=16000, encoder_dim=4, encoder_rates=[2, 2], decoder_dim=32, decoder_rates=[2, 2],
            attn_window_size=None, codebook_size=16, codebook_dim=4, vq_strides=[2, 1], noise=True, depthwise=True)
# Fast run options: tiny batches and crops, one short held-out clip, no progress output.
FAST = dict(model_config=TINY, batch_size=2, segment_length=1024, eval_every=0, eval_items=1, eval_seconds=1.0,
            log_every=1, progress=False, prefetch=0)


def _tone(sr: int, seconds: float, freq: float, channels: int = 1, seed: int = 0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(t.size)
    x = x.astype(np.float32)
    return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tiny convs gain nothing from more, and the CI machine is shared."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Audio at mixed rates and channel counts, one file shorter than a segment."""
    d = tmp_path_factory.mktemp("audio")
    sf.write(d / "a.wav", _tone(16000, 1.5, 220, seed=1), 16000)
    sf.write(d / "b.flac", _tone(22050, 1.5, 330, channels=2, seed=2), 22050)
    (d / "sub").mkdir()
    sf.write(d / "sub" / "c.ogg", _tone(44100, 1.5, 440, seed=3), 44100)
    sf.write(d / "d.wav", _tone(8000, 1.5, 550, seed=4), 8000)
    sf.write(d / "short.wav", _tone(16000, 0.03, 300, seed=5), 16000)
    return d


@pytest.fixture(scope="module")
def run2(data_dir, tmp_path_factory) -> dict:
    """A 2-step run saved to disk (shared by the checkpoint and fine-tuning tests)."""
    out = tmp_path_factory.mktemp("run2")
    return train(TrainConfig(**FAST, data_dir=str(data_dir), steps=2, out=str(out)))


# ---- mel filterbank and losses ---------------------------------------------------------------------------
def test_mel_scale_and_filterbank_follow_slaney():
    assert hz_to_mel(1000.0) == pytest.approx(15.0)
    assert hz_to_mel(200.0) == pytest.approx(3.0)
    hz = np.array([0.0, 300.0, 999.0, 1000.0, 4000.0, 11025.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(hz)), hz, rtol=1e-9, atol=1e-9)
    fb = mel_filterbank(24000, 2048, 80).numpy()
    assert fb.shape == (80, 1025) and (fb >= 0).all()
    peaks = fb.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all() and peaks[-1] > 900
    # Slaney normalisation: every triangle has unit area in Hz (checked where filters span many bins).
    bin_hz = 24000 / 2048
    areas = fb.sum(axis=1) * bin_hz
    np.testing.assert_allclose(areas[40:], 1.0, rtol=0.02)


def test_mel_loss_is_zero_for_identical_signals_and_grows_with_the_difference():
    loss = MultiScaleMelLoss(16000)
    x = torch.from_numpy(_tone(16000, 0.5, 440)).view(1, 1, -1)
    assert loss(x, x).item() == 0.0
    small = loss(x + 0.01 * torch.randn_like(x), x).item()
    large = loss(x + 0.1 * torch.randn_like(x), x).item()
    assert 0 < small < large


# ---- the training forward ---------------------------------------------------------------------------------
def test_training_vq_matches_the_model_quantizer_and_passes_gradients_everywhere():
    torch.manual_seed(0)
    model = build_training_model(resolve_model_config(TINY), noise_mode="torch")
    x = torch.from_numpy(_tone(16000, 0.128, 300)).view(1, 1, -1)
    out = training_forward(model, x)
    # Same codes and quantized latents as the model's own (inference) quantizer on the folded weights.
    plain = export_model(model)
    with torch.no_grad():
        z = plain.encoder(x)
        z_q_ref, codes_ref = plain.quantizer(z)
        z_q, codes, _, _ = quantize(model, model.encoder(x))
    for a, b in zip(codes, codes_ref):
        assert torch.equal(a, b)
    torch.testing.assert_close(z_q, z_q_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(plain.encode(x)[0], codes[0])
    # Straight-through: the reconstruction loss reaches the encoder; the VQ losses reach the codebooks.
    (out.audio.abs().mean() + out.commitment_loss + out.codebook_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert model.encoder.block[0].parametrizations.weight.original1.grad.abs().sum() > 0
    assert all(vq.codebook.weight.grad.abs().sum() > 0 for vq in model.quantizer.quantizers)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    opts = TrainConfig(**FAST, data_dir="unused", lr=3e-3)
    trainer = Trainer(opts, resolve_model_config(TINY), torch.device("cpu"))
    batch = np.stack([_tone(16000, 0.064, 440, seed=1), _tone(16000, 0.064, 660, seed=2)])[:, None, :]
    losses = [trainer.train_step(batch)["loss"] for _ in range(10)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.85 * losses[0], losses


def test_codebooks_stay_in_use_while_training(data_dir):
    """The from-scratch init keeps many codes in use: with DAC's init (every conv at std 0.02) the encoder
    output is ~1e-6 and every level uses a single code from the first steps on."""
    files, _ = data_mod.scan_audio_dir(data_dir)
    sampler = data_mod.SegmentSampler(files, 16000, 1024, seed=0)
    trainer = Trainer(TrainConfig(**FAST, data_dir=str(data_dir)), resolve_model_config(TINY), torch.device("cpu"))
    probe = torch.from_numpy(sampler.batch(10**6, 4))

    def codes_used():
        with torch.no_grad():
            return [len(torch.unique(c)) for c in quantize(trainer.model, trainer.model.encoder(probe))[1]]

    assert codes_used()[0] >= 12
    for step in range(30):
        trainer.train_step(sampler.batch(step, 2))
    used = codes_used()
    assert used[0] >= 8 and used[1] >= 3, used


def test_adversarial_step_trains_the_discriminator(data_dir, tmp_path):
    summary = train(TrainConfig(**{**FAST, "segment_length": 512}, data_dir=str(data_dir), steps=2,
                                adversarial=True, disc_windows=(256, 128, 64), out=str(tmp_path / "gan")))
    assert {"disc", "adv", "feat"} <= set(summary["losses"])
    assert all(np.isfinite(v) for v in summary["losses"].values())
    state = torch.load(tmp_path / "gan" / "train_state.pt", weights_only=True)
    assert state["discriminator"] is not None and state["step"] == 2


# ---- checkpoints ------------------------------------------------------------------------------------------
def test_saved_checkpoint_is_official_format_and_decodes_like_the_reference(run2):
    import snac as snac_ref
    model_dir = Path(run2["model_dir"])
    keys = torch.load(model_dir / "pytorch_model.bin", weights_only=True).keys()
    assert any(k.endswith(".weight_g") for k in keys) and any(k.endswith(".weight_v") for k in keys)
    assert not any(k.endswith(".weight") and "codebook" not in k and "norm" not in k for k in keys)

    ours = SNAC.from_pretrained(model_dir, noise_mode="torch")
    reference = snac_ref.SNAC(**json.loads((model_dir / "config.json").read_text()))
    reference.load_state_dict(torch.load(model_dir / "pytorch_model.bin", weights_only=True))
    reference.eval()
    x = torch.from_numpy(_tone(16000, 0.25, 500)).view(1, 1, -1)
    with torch.no_grad():
        codes = ours.encode(x)
        codes_ref = reference.encode(x)
        for a, b in zip(codes, codes_ref):
            assert torch.equal(a, b)
        torch.manual_seed(7)
        y = ours.decode(codes)
        torch.manual_seed(7)
        y_ref = reference.decode(codes)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    # The model the run returned is the one on disk.
    with torch.no_grad():
        exported = run2["model"]
        loaded = SNAC.from_pretrained(model_dir)
        torch.testing.assert_close(exported.decode(codes), loaded.decode(codes), rtol=1e-5, atol=1e-6)


def test_fine_tuning_starts_from_the_init_checkpoint(run2, data_dir, tmp_path):
    summary = train(TrainConfig(**{**FAST, "model_config": None}, data_dir=str(data_dir), steps=0,
                                init=run2["model_dir"], out=str(tmp_path / "ft")))
    assert summary["config"] == run2["config"]
    start = summary["model"].state_dict()
    init = SNAC.from_pretrained(run2["model_dir"]).state_dict()
    for key, value in init.items():
        torch.testing.assert_close(start[key], value, rtol=1e-6, atol=1e-7)


def test_resume_continues_exactly_like_an_uninterrupted_run(data_dir, tmp_path):
    whole = train(TrainConfig(**FAST, data_dir=str(data_dir), steps=4, out=str(tmp_path / "whole")))
    first = train(TrainConfig(**FAST, data_dir=str(data_dir), steps=2, out=str(tmp_path / "split")))
    assert first["loss_history"] == whole["loss_history"][:2]
    rest = train(TrainConfig(**{**FAST, "model_config": None}, data_dir=str(data_dir), steps=4,
                             out=str(tmp_path / "split"), resume=True))
    assert rest["steps"] == 4 and rest["steps_run"] == 2
    assert rest["loss_history"] == whole["loss_history"][2:]
    with pytest.raises(TrainingError, match=r"another model config \(encoder_dim 4 \(saved\) vs 8\)"):
        train(TrainConfig(**{**FAST, "overrides": {"encoder_dim": 8}}, data_dir=str(data_dir), steps=6,
                          out=str(tmp_path / "split"), resume=True))


# ---- data -------------------------------------------------------------------------------------------------
def test_directory_data_mixes_rates_and_channels_to_the_model_rate(data_dir, tmp_path):
    files, skipped = data_mod.scan_audio_dir(data_dir)
    assert sorted(f.sample_rate for f in files) == [8000, 16000, 16000, 22050, 44100] and not skipped
    sampler = data_mod.SegmentSampler(files, 16000, 1024, seed=0)
    batch = sampler.batch(0, 3)
    assert batch.shape == (3, 1, 1024) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch, sampler.batch(0, 3))  # a step's batch depends on (seed, step) only
    # A 44.1 kHz crop resampled to 16 kHz keeps its 440 Hz tone; the stereo file is mixed to mono.
    c = next(f for f in files if f.sample_rate == 44100)
    crop = data_mod.read_resampled(c, 16000, 4000, 8000)
    spectrum = np.abs(np.fft.rfft(crop * np.hanning(crop.size)))
    assert spectrum.argmax() * 16000 / crop.size == pytest.approx(440, abs=4)
    b = next(f for f in files if f.sample_rate == 22050)
    mono = data_mod.read_resampled(b, 22050, 0, 2000)
    np.testing.assert_allclose(mono, 0.75 * _tone(22050, 1.5, 330, seed=2)[:2000], atol=2e-4)  # FLAC 16-bit
    # Shorter than a segment: the whole file, zero-padded.
    short = next(f for f in files if f.path.name == "short.wav")
    padded = data_mod.read_resampled(short, 16000, 0, 1024)
    assert np.abs(padded[:400]).max() > 0.05 and not padded[480:].any()
    # Undecodable files are skipped with a note.
    junk = tmp_path / "mixed"
    shutil.copytree(data_dir, junk)
    (junk / "junk.wav").write_bytes(b"not audio at all")
    files2, skipped2 = data_mod.scan_audio_dir(junk)
    assert len(files2) == len(files) and len(skipped2) == 1 and "junk.wav" in skipped2[0]


def test_espeak_sentences_are_varied_and_held_out_ones_unseen():
    sentences = espeak_mod.train_sentences()
    assert len(set(sentences)) >= 150
    assert not set(espeak_mod.EVAL_SENTENCES) & set(sentences)


def test_espeak_generates_cached_speech_at_the_model_rate(tmp_path):
    train_paths, eval_paths = espeak_mod.generate(tmp_path, 24000, 2, 1, seed=3)
    assert len(train_paths) == 2 and len(eval_paths) == 1
    for path in train_paths + eval_paths:
        info = sf.info(str(path))
        assert info.samplerate == 24000 and info.channels == 1 and info.duration > 0.5
        audio, _ = sf.read(str(path))
        assert np.sqrt(np.mean(audio ** 2)) > 0.01
    stamps = [p.stat().st_mtime_ns for p in train_paths]
    assert espeak_mod.generate(tmp_path, 24000, 2, 1, seed=3)[0] == train_paths  # cached, not redone
    assert [p.stat().st_mtime_ns for p in train_paths] == stamps


def test_training_on_espeak_speech_evaluates_held_out_sentences(tmp_path):
    summary = train(TrainConfig(**FAST, espeak=True, espeak_utterances=2, steps=1, out=str(tmp_path / "run")))
    assert len(list((tmp_path / "run" / "espeak" / "train").glob("*.wav"))) == 2
    assert len(list((tmp_path / "run" / "espeak" / "eval").glob("*.wav"))) == 1
    assert summary["eval"]["items"] == 1 and 0 <= summary["stoi"] <= 1
    assert summary["losses"]["loss"] > 0


# ---- configs and errors -----------------------------------------------------------------------------------
def test_mini_config_and_overrides():
    with torch.device("meta"):
        n = sum(p.numel() for p in SNAC.from_config(MINI_CONFIG).parameters())
    assert 3.5e6 < n < 4.5e6
    assert MINI_CONFIG.sampling_rate == 24000 and MINI_CONFIG.vq_strides == [4, 2, 1]
    cfg = resolve_model_config("24khz", {"encoder_dim": 32, "decoder_dim": 256})
    assert cfg == MINI_CONFIG == resolve_model_config("mini")
    attn = resolve_model_config("32khz", {"encoder_dim": 4, "decoder_dim": 64})
    assert segment_samples(16384, attn) == 12288  # whole attention windows: multiples of 384 * 32


def _bad_inputs(tmp: Path, data: Path):
    empty = tmp / "empty"
    empty.mkdir()
    junk = tmp / "junk"
    junk.mkdir()
    (junk / "x.wav").write_bytes(b"RIFF garbage")
    (junk / "y.flac").write_bytes(b"")
    bad_json = tmp / "bad.json"
    bad_json.write_text("{ encoder_dim: 4 ")
    taken = tmp / "taken"
    taken.mkdir()
    (taken / "train_state.pt").write_bytes(b"x")
    ok = dict(FAST, data_dir=str(data))
    return [
        (dict(ok, data_dir=str(empty)), "holds no audio files"),
        (dict(ok, data_dir=str(junk)), r"none of the 2 audio files .* can be decoded"),
        (dict(ok, data_dir=str(tmp / "missing")), "does not exist or is not a directory"),
        (dict(ok, data_dir=None), "no training data"),
        (dict(ok, model_config=str(bad_json)), "is not valid JSON"),
        (dict(ok, model_config="48khz"), "unknown model config '48khz'"),
        (dict(ok, overrides={"decoder_rates": [2, 3]}), "must have the same product"),
        (dict(ok, overrides={"vq_strides": [3, 2]}), "must divide the first"),
        (dict(ok, overrides={"colour": 1}), "unknown model config keys"),
        (dict(ok, segment_length=4), "shorter than one coarse frame of this model: 8 samples"),
        (dict(ok, bf16=True, device="cpu"), "bf16 autocast needs a CUDA device"),
        (dict(ok, out=str(tmp / "fresh"), resume=True), "nothing to resume"),
        (dict(ok, out=str(taken)), "already holds a training run"),
        (dict(ok, batch_size=0), "batch_size must be a positive integer"),
        (dict(ok, max_minutes=0), "max_minutes must be a positive number"),
        (dict(ok, init=str(tmp / "no-such-ckpt")), "cannot load the checkpoint to fine-tune"),
    ]


def test_bad_inputs_raise_training_errors(tmp_path, data_dir):
    for options, message in _bad_inputs(tmp_path, data_dir):
        with pytest.raises(TrainingError, match=message):
            train(TrainConfig(**options, steps=1))


def test_corrupt_resume_state_and_mismatched_init(tmp_path, data_dir, run2):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="cannot read the training state"):
        train(TrainConfig(**FAST, data_dir=str(data_dir), out=str(tmp_path / "run"), resume=True))
    with pytest.raises(TrainingError, match="does not fit the model config: .* has shape"):
        train(TrainConfig(**{**FAST, "overrides": {"decoder_dim": 64}}, data_dir=str(data_dir),
                          init=run2["model_dir"]))


def test_time_budget_stops_evaluates_and_saves(tmp_path, data_dir):
    """``max_minutes`` ends the run early as if its last step were the final one: evaluated and saved."""
    summary = train(TrainConfig(**{**FAST, "steps": 10_000}, data_dir=str(data_dir), out=str(tmp_path / "run"),
                                max_minutes=1e-6))
    assert summary["steps"] == 1 and summary["eval"] is not None
    assert (tmp_path / "run" / "model" / "config.json").is_file()


# ---- command line -----------------------------------------------------------------------------------------
def test_cli_parses_and_runs_a_two_step_training(tmp_path, data_dir, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dict(TINY, encoder_dim=8)))
    parser = argparse.ArgumentParser(prog="snac-stream")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    out = tmp_path / "cli"
    args = parser.parse_args([
        "train", "--data", str(data_dir), "--out", str(out), "--config", str(config), "--encoder-dim", "4",
        "--vq-strides", "2,1", "--attn-window-size", "none", "--steps", "2", "--batch-size", "2",
        "--segment-length", "1000", "--eval-items", "1", "--eval-seconds", "1", "--device", "cpu",
        "--betas", "0.5,0.9", "--log-every", "1", "--no-progress",
    ])
    assert args.func is run_train
    assert run_train(args) == 0
    printed = capsys.readouterr().out
    assert "trained: 2 steps" in printed and "held-out STOI" in printed
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved == SNACConfig(**TINY).to_dict()
    assert (out / "train_state.pt").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2] and "eval" in log[-1]
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", str(data_dir)])  # --out is required
    bf16 = parser.parse_args(["train", "--data", str(data_dir), "--out", str(tmp_path / "b"), "--bf16",
                              "--device", "cpu"])
    with pytest.raises(TrainingError, match="bf16"):
        run_train(bf16)
