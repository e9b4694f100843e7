"""``random-checkpoint``: an official-format checkpoint directory with random weights, for trying the other
commands and benchmarks without downloading anything (its audio is noise)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..config import PRESETS
from ..streaming import SNAC
from .common import CLIError, non_negative_int


def _random_presets() -> dict:
    from ..training.options import MINI_CONFIG

    return {**PRESETS, "mini": MINI_CONFIG}


RANDOM_PRESETS = ("24khz", "32khz", "44khz", "mini")


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``random-checkpoint``."""
    p = subparsers.add_parser(
        "random-checkpoint", help="write a checkpoint with random weights (noise; for trying commands)",
        description="Write an official-format checkpoint directory (config.json + pytorch_model.bin) with "
                    "random weights of a preset's structure. Its audio is NOISE: it is for trying the "
                    "commands (--model DIR) and benchmarks offline. For real speech use --model mini (the "
                    "bundled model) or an official model.")
    p.add_argument("directory", type=Path, metavar="DIR", help="directory to write (created; must be empty)")
    p.add_argument("--preset", default="24khz", metavar="NAME",
                   help=f"model structure: {', '.join(RANDOM_PRESETS)} (mini: the bundled model's structure; "
                        "default: 24khz)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="torch seed of the random weights; the same seed writes the same files (default: 0)")
    p.add_argument("--force", action="store_true", help="write into DIR even if it is not empty")
    p.set_defaults(func=run_random_checkpoint)


def run_random_checkpoint(args: argparse.Namespace) -> int:
    """Write ``args.directory`` from ``args.preset`` with weights drawn after ``torch.manual_seed(args.seed)``."""
    presets = _random_presets()
    preset = args.preset.lower().removeprefix("snac_")
    if preset not in presets:
        raise CLIError(f"unknown preset {args.preset!r}; use one of {', '.join(RANDOM_PRESETS)}")
    directory: Path = args.directory
    parent = directory.parent if str(directory.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"parent directory does not exist: {parent}")
    if directory.exists():
        if not directory.is_dir():
            raise CLIError(f"{directory} exists and is not a directory")
        if any(directory.iterdir()) and not args.force:
            raise CLIError(f"{directory} exists and is not empty; pass --force to write into it")
    config = presets[preset]
    torch.manual_seed(args.seed)
    model = SNAC.from_config(config)
    model.save_pretrained(directory)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {directory}: RANDOM WEIGHTS ({preset} structure, {config.sampling_rate} Hz, "
          f"{params / 1e6:.1f} M parameters, seed {args.seed})")
    print("its output is noise: use it to try commands and benchmarks (--model "
          f"{directory}); for real speech use --model mini or an official model (24khz, 32khz, 44khz)")
    sys.stdout.flush()
    return 0
