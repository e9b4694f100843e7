"""What every stage of the command line shares: the error it reports, argument types, common options and
the checks and progress lines around files."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..audio import WRITE_FORMATS
from ..config import BUNDLED_MODELS
from ..loading import DEFAULT_MODEL

#: ``help`` of ``--model`` where it defaults to :data:`snac_stream.loading.DEFAULT_MODEL`.
#: The model names ``--model`` takes besides hub ids and directories.
MODEL_NAMES = ("preset (24khz, 32khz, 44khz: the official weights, from the hub), mini (the bundled small 24 kHz "
               "speech model: offline, not Orpheus-compatible)")
MODEL_HELP = f"hub id, {MODEL_NAMES} or checkpoint directory (default: {DEFAULT_MODEL})"


class CLIError(Exception):
    """A user-facing failure: printed as one ``error:`` line, exit status 2."""


# ---- argument types ------------------------------------------------------------------------------------
def non_negative_int(text: str) -> int:
    """An ``int`` >= 0, for ``type=``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def positive_int(text: str) -> int:
    """An ``int`` >= 1, for ``type=``."""
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a positive integer, got 0")
    return value


def positive_float(text: str, zero: bool = False) -> float:
    """A finite ``float`` > 0 (>= 0 with ``zero``), for ``type=``."""
    what = "a number >= 0" if zero else "a positive number"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (value >= 0 if zero else value > 0) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite ``float`` >= 0, for ``type=``."""
    return positive_float(text, zero=True)


# ---- options -------------------------------------------------------------------------------------------
def add_model_option(parser: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    """``--model``, defaulting to :data:`snac_stream.loading.DEFAULT_MODEL`."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=help)


def add_common_options(parser: argparse.ArgumentParser, several_devices: bool = False) -> None:
    """``--device`` and ``--quiet``, last on every subcommand; with ``several_devices`` (the server commands)
    ``--device`` takes a comma list, and ``--all-gpus`` is added (read with
    :func:`snac_stream.loading.resolve_devices`)."""
    if several_devices:
        parser.add_argument("--device", default="auto",
                            help="torch device, or a comma list for one engine set each (new sessions go to the "
                                 "one with the most free slots): auto (CUDA if available, else CPU), cpu, cuda, "
                                 "cuda:1, cuda:0,cuda:1, cpu,cpu, ... (default: auto)")
        parser.add_argument("--all-gpus", action="store_true",
                            help="one engine set on each visible CUDA device (instead of --device)")
    else:
        parser.add_argument("--device", default="auto",
                            help="torch device: auto (CUDA if available, else CPU), cpu, cuda, cuda:1, ... "
                                 "(default: auto)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")


# ---- files and progress --------------------------------------------------------------------------------
def check_output(path: Path) -> None:
    """Fail before any model work if the output cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"output directory does not exist: {parent}")
    if path.is_dir():
        raise CLIError(f"output path is a directory: {path}")


def audio_suffix(path: Path) -> str:
    """The lower-case suffix of an audio file to write, checked to be one :data:`WRITE_FORMATS` knows."""
    suffix = path.suffix.lower()
    if suffix not in WRITE_FORMATS:
        raise CLIError(f"cannot write {path}: unsupported suffix {path.suffix or '(none)'!r}; "
                       f"use one of {', '.join(WRITE_FORMATS)}")
    return suffix


def say(args: argparse.Namespace, line: str) -> None:
    """A progress line on stderr, unless ``--quiet``."""
    if not args.quiet:
        print(line, file=sys.stderr)


def model_label(model) -> str:
    """How progress lines name a model; a bundled one says that its codes are its own."""
    if model.name in BUNDLED_MODELS:
        return (f"{model.name} (bundled small model, not the official weights: its tokens are not "
                "Orpheus-compatible)")
    return model.name
