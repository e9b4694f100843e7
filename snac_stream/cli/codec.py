"""``encode`` (audio file -> codes file) and ``decode`` (codes file -> audio file), any length in bounded memory
(:mod:`snac_stream.files`)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from ..audio import WRITE_FORMATS
from ..codesfile import config_differences, load_codes, save_codes
from ..files import decode_file, encode_file
from ..loading import ModelLoadError, load_model, resolve_device
from .common import (MODEL_NAMES, CLIError, add_common_options, add_model_option, audio_suffix, check_output,
                     model_label, non_negative_int, say)


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``encode`` and ``decode``."""
    p = subparsers.add_parser(
        "encode", help="audio file -> codes (.npz)",
        description="Encode an audio file (wav, flac, ogg; any rate, channels mixed to mono) into SNAC codes.")
    p.add_argument("input", type=Path, help="audio file to encode")
    p.add_argument("output", type=Path, help="codes file to write (.npz)")
    add_model_option(p)
    add_common_options(p)
    p.set_defaults(func=run_encode)

    p = subparsers.add_parser(
        "decode", help="codes (.npz) -> audio file",
        description="Decode a codes file back to audio at the model's sample rate, trimmed to the original "
                    "length. The output format follows the suffix: " + ", ".join(WRITE_FORMATS) + ".")
    p.add_argument("input", type=Path, help="codes file written by `snac-stream encode`")
    p.add_argument("output", type=Path, help="audio file to write (.wav, .flac or .ogg)")
    p.add_argument("--model", default=None,
                   help=f"hub id, {MODEL_NAMES} or checkpoint directory (default: the model recorded in the codes "
                        "file); its config must match the file's")
    p.add_argument("--noise-seed", type=non_negative_int, default=0,
                   help="seed of the decoder's deterministic noise (default: 0)")
    p.add_argument("--float", dest="float32", action="store_true",
                   help="write 32-bit float samples (wav only) instead of 16-bit PCM")
    add_common_options(p)
    p.set_defaults(func=run_decode)


def run_encode(args: argparse.Namespace) -> int:
    """Encode ``args.input`` into the codes file ``args.output``."""
    if not args.input.exists():
        raise FileNotFoundError(f"input audio file not found: {args.input}")
    check_output(args.output)
    device = resolve_device(args.device)

    start = time.perf_counter()
    model = load_model(args.model, device)
    load_s = time.perf_counter() - start
    cfg = model.config

    start = time.perf_counter()
    encoded = encode_file(model, args.input, progress=None if not args.quiet else False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    encode_s = time.perf_counter() - start
    codes, source_rate, num_samples = encoded.codes, encoded.source_rate, encoded.num_samples
    duration = num_samples / cfg.sampling_rate
    save_codes(args.output, codes, cfg, model_name=model.name, num_samples=num_samples,
               source_sample_rate=source_rate)

    frames = [c.shape[-1] for c in codes]
    bits = sum(frames) * math.log2(cfg.codebook_size)
    rate_note = f"resampled to {cfg.sampling_rate} Hz" if source_rate != cfg.sampling_rate else "no resampling"
    say(args, f"input   {args.input}: {duration:.2f} s, {source_rate} Hz -> {rate_note} "
              f"({num_samples} samples)")
    say(args, f"model   {model_label(model)} ({cfg.sampling_rate} Hz, {cfg.n_codebooks} levels x {cfg.codebook_size} "
              f"codes) on {device}, loaded in {load_s:.2f} s")
    say(args, f"codes   {' / '.join(map(str, frames))} per level (coarse first), {sum(frames)} in all")
    say(args, f"bitrate {cfg.bitrate_bps / 1000:.2f} kbps nominal; {bits / duration / 1000:.2f} kbps for this "
              f"file (padded to whole frames)")
    say(args, f"time    encode {encode_s:.2f} s, real-time factor {encode_s / duration:.3f} "
              f"(processing time / audio duration)")
    say(args, f"wrote   {args.output} ({_file_size(args.output)})")
    return 0


def run_decode(args: argparse.Namespace) -> int:
    """Decode the codes file ``args.input`` into the audio file ``args.output``."""
    suffix = audio_suffix(args.output)
    if args.float32 and suffix != ".wav":
        raise CLIError("--float needs a .wav output (flac and ogg have no float sample format)")
    check_output(args.output)
    device = resolve_device(args.device)

    codes_file = load_codes(args.input)
    if codes_file.codes[0].shape[0] != 1:
        raise CLIError(f"{args.input} holds a batch of {codes_file.codes[0].shape[0]} streams; "
                       "decode writes one audio file, so it needs a batch of 1")
    spec = args.model if args.model is not None else codes_file.model_name
    if spec is None:
        raise CLIError(f"{args.input} does not record which model encoded it; pass --model")

    start = time.perf_counter()
    try:
        model = load_model(spec, device)
    except ModelLoadError as exc:
        if args.model is None:
            raise CLIError(f"{exc} (the model recorded in {args.input}; pass --model to use another)") from exc
        raise
    load_s = time.perf_counter() - start
    diffs = config_differences(codes_file.config, model.config)
    if diffs:
        raise CLIError(f"model {model.name} does not match {args.input} (encoded with "
                       f"{codes_file.model_name or 'an unnamed model'}); differing config fields "
                       f"(file vs model): {'; '.join(diffs)}")
    model.noise_seed = args.noise_seed

    start = time.perf_counter()
    written = decode_file(model, codes_file.codes, args.output, num_samples=codes_file.num_samples,
                          subtype="FLOAT" if args.float32 else None, progress=None if not args.quiet else False)
    decode_s = time.perf_counter() - start

    cfg = model.config
    duration = codes_file.duration_s
    frames = [c.shape[-1] for c in codes_file.codes]
    say(args, f"codes   {args.input}: {' / '.join(map(str, frames))} per level (coarse first), "
              f"{duration:.2f} s at {codes_file.sample_rate} Hz"
              + (f" (source was {codes_file.source_sample_rate} Hz)" if codes_file.source_sample_rate else ""))
    say(args, f"model   {model_label(model)} ({cfg.bitrate_bps / 1000:.2f} kbps nominal) on {device}, "
              f"loaded in {load_s:.2f} s, noise seed {args.noise_seed}")
    say(args, f"time    decode {decode_s:.2f} s, real-time factor {decode_s / duration:.3f} "
              f"(processing time / audio duration)")
    say(args, f"wrote   {args.output}: {written} samples at {codes_file.sample_rate} Hz, "
              f"{'32-bit float' if args.float32 else WRITE_FORMATS[suffix][1]} ({_file_size(args.output)})")
    return 0


def _file_size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"
