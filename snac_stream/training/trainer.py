"""The training loop: from scratch or fine-tuning, resumable, writing the official checkpoint format.

Run directory (``out``):
    train_state.pt   model (weight-normed), optimizers, schedulers, discriminator, step, configs, RNG state
    model/           config.json + pytorch_model.bin (official format, weight norm as weight_g / weight_v)
    log.jsonl        one JSON object per logged step and per evaluation
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..config import SNACConfig
from ..model import CheckpointError
from ..streaming import SNAC
from . import data as data_mod
from . import espeak as espeak_mod
from .discriminator import MultiScaleSTFTDiscriminator
from .evaluate import evaluate, require_pystoi
from .losses import MultiScaleMelLoss, discriminator_loss, generator_losses
from .modeling import build_training_model, export_model, training_forward
from .options import TrainConfig, TrainingError, config_differences, resolve_device, resolve_model_config

STATE_FILE = "train_state.pt"
MODEL_DIR = "model"
LOG_FILE = "log.jsonl"
STATE_FORMAT = "snac-stream-train/1"


def segment_samples(requested: int, config: SNACConfig) -> int:
    """``requested`` rounded down to whole multiples of ``config.pad_multiple`` (one coarse frame, or the
    attention window's worth with local attention): the lengths the model trains on without padding."""
    multiple = config.pad_multiple
    if requested < multiple:
        raise TrainingError(
            f"segment_length {requested} is shorter than one coarse frame of this model: {multiple} samples "
            f"(hop {config.hop_length} x {multiple // config.hop_length} latent frames); use at least {multiple}"
        )
    return requested // multiple * multiple


class Trainer:
    """Model, losses and optimizers of a run, one ``train_step`` at a time."""

    def __init__(self, opts: TrainConfig, config: SNACConfig, device: torch.device,
                 init_state: Optional[Dict[str, torch.Tensor]] = None):
        self.opts = opts
        self.config = config
        self.device = device
        torch.manual_seed(opts.seed)
        try:
            model = build_training_model(config, init_state, opts.noise_mode)
        except (ValueError, RuntimeError) as exc:
            raise TrainingError(f"cannot build a model from this config: {exc}") from exc
        self.model = model.to(device)
        self.mel_loss = MultiScaleMelLoss(config.sampling_rate, opts.mel_fft_sizes, opts.n_mels).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opts.lr, betas=tuple(opts.betas),
                                           weight_decay=opts.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=opts.lr_decay)
        self.discriminator: Optional[MultiScaleSTFTDiscriminator] = None
        if opts.adversarial:
            self._make_discriminator()
        self.step = 0

    def _make_discriminator(self) -> None:
        opts = self.opts
        self.discriminator = MultiScaleSTFTDiscriminator(opts.disc_windows).to(self.device).train()
        self.optimizer_d = torch.optim.AdamW(self.discriminator.parameters(), lr=opts.lr, betas=tuple(opts.betas),
                                             weight_decay=opts.weight_decay)
        self.scheduler_d = torch.optim.lr_scheduler.ExponentialLR(self.optimizer_d, gamma=opts.lr_decay)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.opts.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, batch: torch.Tensor | np.ndarray) -> Dict[str, float]:
        """One optimisation step (discriminator first when adversarial) on a (B, 1, T) batch; the losses."""
        opts = self.opts
        x = torch.as_tensor(batch, dtype=torch.float32).to(self.device, non_blocking=True)
        self.model.train()
        with self.autocast():
            out = training_forward(self.model, x)
        y_hat = out.audio.float()
        logs: Dict[str, float] = {}
        if self.discriminator is not None:
            with self.autocast():
                d_loss = discriminator_loss(self.discriminator(x), self.discriminator(y_hat.detach()), opts.gan_loss)
            self.optimizer_d.zero_grad(set_to_none=True)
            d_loss.backward()
            if opts.disc_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), opts.disc_grad_clip)
            self.optimizer_d.step()
            self.scheduler_d.step()
            logs["disc"] = d_loss.item()
        mel = self.mel_loss(y_hat, x)
        waveform = F.l1_loss(y_hat, x)
        total = (opts.mel_weight * mel + opts.waveform_weight * waveform
                 + opts.commitment_weight * out.commitment_loss + opts.codebook_weight * out.codebook_loss)
        if self.discriminator is not None:
            with self.autocast():
                real, fake = self.discriminator(x), self.discriminator(y_hat)
            adversarial, features = generator_losses(real, fake, opts.gan_loss)
            total = total + opts.adversarial_weight * adversarial + opts.feature_weight * features
            logs["adv"], logs["feat"] = adversarial.item(), features.item()
        if not torch.isfinite(total):
            raise TrainingError(f"the loss became {total.item()} at step {self.step + 1}; lower --lr or check "
                                "the data")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if opts.grad_clip > 0:
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), opts.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        logs.update(loss=total.item(), mel=mel.item(), waveform=waveform.item(),
                    commitment=out.commitment_loss.item(), codebook=out.codebook_loss.item())
        return logs

    # ---- export, evaluation --------------------------------------------------------------------------
    def export(self) -> SNAC:
        """The model as ``SNAC.from_pretrained`` would load it from the saved checkpoint (eval mode)."""
        return export_model(self.model, self.device)

    def evaluate(self, clips: List[np.ndarray]) -> Dict[str, Any]:
        return evaluate(self.export(), clips, self.mel_loss)

    # ---- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "format": STATE_FORMAT,
            "step": self.step,
            "model_config": self.config.to_dict(),
            "train_config": self.opts.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "discriminator": None,
            "rng": rng,
        }
        if self.discriminator is not None:
            state.update(discriminator=self.discriminator.state_dict(), optimizer_d=self.optimizer_d.state_dict(),
                         scheduler_d=self.scheduler_d.state_dict())
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> List[str]:
        """Restore a ``state_dict``; returns notes (e.g. a discriminator dropped or started fresh)."""
        notes = []
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("discriminator") is not None:
            if self.discriminator is None:
                notes.append("the saved run trained a discriminator; it is not used without --adversarial")
            else:
                self.discriminator.load_state_dict(state["discriminator"])
                self.optimizer_d.load_state_dict(state["optimizer_d"])
                self.scheduler_d.load_state_dict(state["scheduler_d"])
        elif self.discriminator is not None:
            notes.append("the saved run had no discriminator; adversarial training starts with a fresh one")
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        return notes

    def save(self, out: Path) -> None:
        """``out/train_state.pt`` (written atomically) and the official-format ``out/model``."""
        out.mkdir(parents=True, exist_ok=True)
        staged = out / (STATE_FILE + ".tmp")
        torch.save(self.state_dict(), staged)
        os.replace(staged, out / STATE_FILE)
        export_model(self.model, "cpu").save_pretrained(out / MODEL_DIR)


def load_train_state(path: Path) -> Dict[str, Any]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(f"cannot read the training state {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path} is not a snac-stream training state ({STATE_FORMAT})")
    return state


def _load_init(init: str) -> Tuple[SNACConfig, Dict[str, torch.Tensor]]:
    try:
        model = SNAC.from_pretrained(init)
    except (CheckpointError, OSError, ValueError) as exc:
        raise TrainingError(f"cannot load the checkpoint to fine-tune (--init {init}): {exc}") from exc
    return model.config, model.state_dict()


def _check_init_fits(init: str, state: Dict[str, torch.Tensor], config: SNACConfig) -> None:
    with torch.device("meta"):  # shapes only, no memory
        own = SNAC.from_config(config).state_dict()
    for key, value in own.items():
        if key not in state:
            raise TrainingError(f"--init {init} does not fit the model config: it has no {key}")
        if state[key].shape != value.shape:
            raise TrainingError(f"--init {init} does not fit the model config: {key} has shape "
                                f"{tuple(state[key].shape)}, the config needs {tuple(value.shape)}")


def _describe(differences: Dict[str, Tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {a} (saved) vs {b}" for k, (a, b) in differences.items())


def _data(opts: TrainConfig, config: SNACConfig, out: Optional[Path], say) -> Tuple[List[data_mod.AudioFile],
                                                                                      List[data_mod.AudioFile]]:
    train_files: List[data_mod.AudioFile] = []
    eval_files: List[data_mod.AudioFile] = []
    if opts.data_dir is not None:
        files, skipped = data_mod.scan_audio_dir(opts.data_dir)
        for note in skipped[:5]:
            say(f"skipped {note}")
        if len(skipped) > 5:
            say(f"skipped {len(skipped) - 5} more undecodable files")
        if opts.eval_dir is not None:
            train_files += files
            eval_files += data_mod.scan_audio_dir(opts.eval_dir, "eval directory")[0]
        else:
            train, held = data_mod.split_holdout(files, opts.eval_items, opts.seed)
            train_files += train
            eval_files += held
    elif opts.eval_dir is not None:
        eval_files += data_mod.scan_audio_dir(opts.eval_dir, "eval directory")[0]
    if opts.espeak:
        work = Path(opts.espeak_dir) if opts.espeak_dir else (out / "espeak" if out else None)
        if work is None:
            raise TrainingError("espeak data needs a work directory: set espeak_dir or out")
        say(f"espeak-ng: {opts.espeak_utterances} training and {opts.eval_items} held-out utterances in {work}")
        train_paths, eval_paths = espeak_mod.generate(work, config.sampling_rate, opts.espeak_utterances,
                                                      opts.eval_items, seed=opts.seed)
        sr = config.sampling_rate
        train_files += [data_mod.AudioFile(p, int(_frames(p)), sr) for p in train_paths]
        eval_files += [data_mod.AudioFile(p, int(_frames(p)), sr) for p in eval_paths]
    return train_files, eval_files


def _frames(path: Path) -> int:
    import soundfile as sf

    return sf.info(str(path)).frames


def train(opts: TrainConfig) -> Dict[str, Any]:
    """Train (or fine-tune, or resume) as ``opts`` says; returns a summary.

    Summary keys: ``steps`` (the run's step count now), ``steps_run`` (this call), ``seconds``, ``losses``
    (the last step's), ``loss_history`` (total loss of each step of this call), ``eval`` (held-out metrics:
    ``stoi``, ``mel_distance``, ``codes_used``), ``stoi``, ``config`` (the model config), ``segment_length``,
    ``out`` / ``model_dir`` (None without ``out``) and ``model`` (the trained model, folded, eval mode).
    """
    opts.validate()
    device = resolve_device(opts.device, opts.bf16)
    require_pystoi()
    out = Path(opts.out) if opts.out is not None else None
    say = _printer(opts.progress)
    state = None
    init_state = None
    if out is not None:
        state_path = out / STATE_FILE
        if opts.resume:
            if not state_path.is_file():
                raise TrainingError(f"nothing to resume: {state_path} does not exist")
            state = load_train_state(state_path)
        elif state_path.exists():
            raise TrainingError(f"{out} already holds a training run ({STATE_FILE}); resume it (--resume) or "
                                "choose another output directory")
    if state is not None:
        try:
            saved = SNACConfig.from_dict(state["model_config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TrainingError(f"{out / STATE_FILE} holds no valid model config: {exc}") from exc
        config = resolve_model_config(opts.model_config, opts.overrides, default=saved)
        differences = config_differences(saved, config)
        if differences:
            raise TrainingError(f"{out / STATE_FILE} was trained with another model config ({_describe(differences)}); "
                                "resume with the same config, or start a new run in another directory")
        if opts.init is not None:
            say("resuming: --init is ignored (the weights come from the saved run)")
    elif opts.init is not None:
        init_config, init_state = _load_init(opts.init)
        config = resolve_model_config(opts.model_config, opts.overrides, default=init_config)
        _check_init_fits(opts.init, init_state, config)
    else:
        config = resolve_model_config(opts.model_config, opts.overrides)
    segment = segment_samples(opts.segment_length, config)
    if segment != opts.segment_length:
        say(f"segment length {opts.segment_length} -> {segment} samples (a multiple of {config.pad_multiple})")

    train_files, eval_files = _data(opts, config, out, say)
    trainer = Trainer(opts, config, device, init_state)
    if state is not None:
        try:
            for note in trainer.load_state_dict(state):
                say(note)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise TrainingError(f"{out / STATE_FILE} does not fit this run: {exc}") from exc
        del state
    sampler = data_mod.SegmentSampler(train_files, config.sampling_rate, segment, seed=opts.seed)
    clips = data_mod.eval_clips(eval_files, config.sampling_rate, opts.eval_seconds, opts.eval_items)
    n_params = sum(p.numel() for p in export_model(trainer.model).parameters())
    say(f"training {n_params / 1e6:.2f} M parameters at {config.sampling_rate} Hz on {device}: "
        f"{len(train_files)} files, {len(clips)} held out, batch {opts.batch_size} x {segment} samples, "
        f"steps {trainer.step} -> {opts.steps}")

    log = _Log(out)
    start_step, started = trainer.step, time.perf_counter()
    history: List[float] = []
    losses: Dict[str, float] = {}
    metrics: Optional[Dict[str, Any]] = None
    metrics_step = -1
    bar = _progress(opts, start_step)
    try:
        for batch in data_mod.batches(sampler, start_step, opts.steps, opts.batch_size, opts.prefetch):
            losses = trainer.train_step(batch)
            history.append(losses["loss"])
            step = trainer.step
            if opts.log_every and (step % opts.log_every == 0 or step == opts.steps):
                log.write({"step": step, **losses, "lr": trainer.scheduler.get_last_lr()[0]})
                if bar is not None:
                    bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items() if k != "grad_norm"}, refresh=False)
            if bar is not None:
                bar.update(1)
            if opts.eval_every and step % opts.eval_every == 0 and clips:
                metrics, metrics_step = trainer.evaluate(clips), step
                log.write({"step": step, "eval": metrics})
                say(_format_eval(step, metrics))
            if out is not None and opts.save_every and step % opts.save_every == 0:
                trainer.save(out)
            if opts.max_minutes is not None and time.perf_counter() - started >= 60 * opts.max_minutes:
                say(f"time budget of {opts.max_minutes:g} min reached at step {step}")
                break
    except KeyboardInterrupt:
        if out is not None and trainer.step > start_step:
            trainer.save(out)
            say(f"interrupted: saved step {trainer.step} to {out} (continue with --resume)")
        raise
    finally:
        if bar is not None:
            bar.close()
    if clips and metrics_step != trainer.step:
        metrics = trainer.evaluate(clips)
        log.write({"step": trainer.step, "eval": metrics})
        say(_format_eval(trainer.step, metrics))
    if out is not None and (trainer.step > start_step or not (out / MODEL_DIR).is_dir()):
        trainer.save(out)
    seconds = time.perf_counter() - started
    if out is not None:
        say(f"saved {out / MODEL_DIR} (official format) and {out / STATE_FILE}")
    return {
        "steps": trainer.step,
        "steps_run": trainer.step - start_step,
        "seconds": seconds,
        "losses": losses,
        "loss_history": history,
        "eval": metrics,
        "stoi": metrics["stoi"] if metrics else None,
        "config": config.to_dict(),
        "segment_length": segment,
        "out": str(out) if out is not None else None,
        "model_dir": str(out / MODEL_DIR) if out is not None else None,
        "model": trainer.export(),
    }


def _format_eval(step: int, metrics: Dict[str, Any]) -> str:
    used = "/".join(str(n) for n in metrics["codes_used"])
    return (f"step {step}: held-out STOI {metrics['stoi']:.3f}, mel distance {metrics['mel_distance']:.3f}, "
            f"codes used per level {used} of {metrics['codebook_size']} ({metrics['items']} clips)")


def _printer(enabled: bool):
    def say(message: str) -> None:
        if not enabled:
            return
        try:
            from tqdm import tqdm

            tqdm.write(message)
        except ImportError:
            print(message, flush=True)

    return say


def _progress(opts: TrainConfig, start: int):
    if not opts.progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=opts.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


class _Log:
    def __init__(self, out: Optional[Path]):
        self.path = out / LOG_FILE if out is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Dict[str, Any]) -> None:
        if self.path is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
