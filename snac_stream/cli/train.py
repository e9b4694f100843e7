"""``snac-stream train``: train or fine-tune a model (:mod:`snac_stream.training`).

    snac-stream train --out DIR (--data DIR | --espeak) [--config NAME|PATH] [--init DIR|PRESET]
                      [--encoder-dim N --decoder-dim N ...] [--steps N] [--batch-size N]
                      [--segment-length N] [--adversarial] [--bf16] [--device auto|cpu|cuda] [--resume]

Expected failures raise ``TrainingError`` (a ``ValueError``), which the command line prints as one ``error:``
line.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List

from ..training.options import CONFIG_NAMES, TrainConfig, TrainingError
from ..training.trainer import train

_DEFAULTS = TrainConfig()


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.replace(" ", ",").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _float_pair(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}") from None
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}")
    return values


def _window(text: str) -> int:
    if text.lower() in ("none", "off", "0"):
        return 0  # stands for None (no local attention)
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


# Model config overrides: flag -> (SNACConfig field, type, help)
_OVERRIDES = {
    "--sampling-rate": ("sampling_rate", int, "audio sample rate in Hz"),
    "--encoder-dim": ("encoder_dim", int, "encoder base width"),
    "--encoder-rates": ("encoder_rates", _int_list, "encoder strides, e.g. 2,4,8,8"),
    "--decoder-dim": ("decoder_dim", int, "decoder base width"),
    "--decoder-rates": ("decoder_rates", _int_list, "decoder strides, e.g. 8,8,4,2"),
    "--latent-dim": ("latent_dim", int, "latent width (must equal encoder_dim * 2**len(encoder_rates))"),
    "--attn-window-size": ("attn_window_size", _window, "local attention window in frames, or none"),
    "--codebook-size": ("codebook_size", int, "entries per codebook"),
    "--codebook-dim": ("codebook_dim", int, "codebook vector width"),
    "--vq-strides": ("vq_strides", _int_list, "latent frames per code of each level, coarse first, e.g. 4,2,1"),
}


def add_parsers(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train``; returns its parser."""
    d = _DEFAULTS
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune a SNAC model",
        description="Train a SNAC model from scratch or fine-tune a checkpoint, on a directory of audio files "
                    "and/or speech synthesised with espeak-ng. Writes the official checkpoint format "
                    "(OUT/model: config.json + pytorch_model.bin) and a resumable OUT/train_state.pt.",
    )
    g = p.add_argument_group("model")
    g.add_argument("--config", default=None, metavar="NAME|PATH",
                   help=f"model config: {', '.join(CONFIG_NAMES)}, a config.json or a checkpoint directory "
                        "(default: the --init checkpoint's, the resumed run's, else 24khz)")
    g.add_argument("--init", default=None, metavar="DIR|PRESET",
                   help="fine-tune from this checkpoint (directory, hub id or preset) instead of random weights")
    for flag, (name, kind, text) in _OVERRIDES.items():
        g.add_argument(flag, dest=f"cfg_{name}", type=kind, default=None, help=f"override: {text}")
    g.add_argument("--noise", dest="cfg_noise", action=argparse.BooleanOptionalAction, default=None,
                   help="override: decoder noise blocks")
    g.add_argument("--depthwise", dest="cfg_depthwise", action=argparse.BooleanOptionalAction, default=None,
                   help="override: depthwise convs")

    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="DIR", help="directory of audio files (wav, flac, ogg; any rate)")
    g.add_argument("--eval-data", default=None, metavar="DIR",
                   help="held-out audio files (default: a few files of --data are held out)")
    g.add_argument("--espeak", action="store_true", help="add English speech synthesised with espeak-ng")
    g.add_argument("--espeak-utterances", type=int, default=d.espeak_utterances, metavar="N",
                   help=f"espeak training utterances (default {d.espeak_utterances})")
    g.add_argument("--espeak-dir", default=None, metavar="DIR", help="espeak cache (default OUT/espeak)")
    g.add_argument("--segment-length", type=int, default=d.segment_length, metavar="N",
                   help=f"samples per training crop (default {d.segment_length})")
    g.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N", help=f"default {d.batch_size}")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d.steps, metavar="N", help=f"total steps (default {d.steps})")
    g.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="stop after M minutes of training (then evaluate and save as at the last step)")
    g.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr})")
    g.add_argument("--betas", type=_float_pair, default=d.betas, metavar="B1,B2", help="default 0.8,0.99")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    g.add_argument("--lr-decay", type=float, default=d.lr_decay, metavar="GAMMA",
                   help="per-step exponential lr decay (DAC uses 0.999996; default 1 = constant)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="generator gradient norm clip (0 = off)")
    g.add_argument("--mel-weight", type=float, default=d.mel_weight,
                   help=f"multi-scale log-mel L1 (default {d.mel_weight}, as DAC)")
    g.add_argument("--waveform-weight", type=float, default=d.waveform_weight,
                   help=f"waveform L1 (default {d.waveform_weight})")
    g.add_argument("--commitment-weight", type=float, default=d.commitment_weight,
                   help=f"VQ commitment loss (default {d.commitment_weight})")
    g.add_argument("--codebook-weight", type=float, default=d.codebook_weight,
                   help=f"VQ codebook loss (default {d.codebook_weight})")
    g.add_argument("--adversarial", action="store_true",
                   help="add the multi-scale STFT discriminator (GAN + feature-matching losses)")
    g.add_argument("--adversarial-weight", type=float, default=d.adversarial_weight,
                   help=f"GAN generator loss (default {d.adversarial_weight})")
    g.add_argument("--feature-weight", type=float, default=d.feature_weight,
                   help=f"feature-matching L1 (default {d.feature_weight})")
    g.add_argument("--gan-loss", choices=("lsgan", "hinge"), default=d.gan_loss)
    g.add_argument("--noise-mode", choices=("torch", "deterministic", "off"), default=d.noise_mode,
                   help="decoder noise while training (default torch: fresh Gaussian noise, as the reference)")

    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, metavar="DIR", help="run directory (checkpoints, model/, log.jsonl)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument("--device", default=d.device, help="auto (default), cpu, cuda or cuda:N")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--eval-every", type=int, default=d.eval_every, metavar="N", help="0 = only at the end")
    g.add_argument("--eval-items", type=int, default=d.eval_items, metavar="N", help="held-out clips")
    g.add_argument("--eval-seconds", type=float, default=d.eval_seconds, metavar="S", help="length of each clip")
    g.add_argument("--save-every", type=int, default=d.save_every, metavar="N", help="0 = only at the end")
    g.add_argument("--log-every", type=int, default=d.log_every, metavar="N")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or messages")
    p.set_defaults(func=run_train)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` that parsed ``train`` arguments describe."""
    overrides: Dict[str, Any] = {}
    for name, _, _ in _OVERRIDES.values():
        value = getattr(args, f"cfg_{name}", None)
        if value is not None:
            overrides[name] = value
    if overrides.get("attn_window_size") == 0:
        overrides["attn_window_size"] = None  # --attn-window-size none: no local attention
    for name in ("noise", "depthwise"):
        value = getattr(args, f"cfg_{name}", None)
        if value is not None:
            overrides[name] = value
    opts = TrainConfig(
        model_config=args.config, overrides=overrides, init=args.init,
        data_dir=args.data, eval_dir=args.eval_data, espeak=args.espeak,
        espeak_utterances=args.espeak_utterances, espeak_dir=args.espeak_dir,
        segment_length=args.segment_length, batch_size=args.batch_size, steps=args.steps,
        max_minutes=args.max_minutes, lr=args.lr,
        betas=tuple(args.betas), weight_decay=args.weight_decay, lr_decay=args.lr_decay, grad_clip=args.grad_clip,
        mel_weight=args.mel_weight, waveform_weight=args.waveform_weight,
        commitment_weight=args.commitment_weight, codebook_weight=args.codebook_weight,
        adversarial=args.adversarial, adversarial_weight=args.adversarial_weight,
        feature_weight=args.feature_weight, gan_loss=args.gan_loss, noise_mode=args.noise_mode,
        device=args.device, bf16=args.bf16, seed=args.seed, eval_every=args.eval_every,
        eval_items=args.eval_items, eval_seconds=args.eval_seconds, save_every=args.save_every,
        log_every=args.log_every, progress=not args.no_progress, out=args.out, resume=args.resume,
    )
    return opts


def run_train(args: argparse.Namespace) -> int:
    """Run ``snac-stream train``; 0 on success. Raises ``TrainingError`` for expected failures."""
    summary = train(config_from_args(args))
    parts = [f"{summary['steps']} steps ({summary['steps_run']} this run, {summary['seconds']:.1f} s)"]
    if summary["losses"]:
        parts.append(f"loss {summary['losses']['loss']:.4f}")
    if summary["eval"]:
        parts.append(f"held-out STOI {summary['eval']['stoi']:.3f}")
    print("trained: " + ", ".join(parts) + f"; model in {summary['model_dir']}")
    return 0


__all__ = ["add_parsers", "run_train", "config_from_args", "TrainingError"]
