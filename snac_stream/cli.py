"""The ``snac-stream`` command line.

    snac-stream encode IN.wav OUT.npz [--model M] [--device D] [--quiet]
    snac-stream decode IN.npz OUT.wav [--model M] [--device D] [--noise-seed N] [--float] [--quiet]
    snac-stream live [--input-device D | --input FILE] [--output-device D | --output FILE] [--model M]
                     [--block N] [--lookahead N] [--seconds S] [--realtime] [--list-devices]
                     [--server ws://HOST:PORT [--token T]]
    snac-stream play-tokens [TOKENS|-|ws://URL] [--output-device D | --output FILE] [--model M] [--layout L]
                            [--server ws://HOST:PORT [--token T]]
    snac-stream serve [--model M] [--random-weights] [--host 127.0.0.1] [--port 8765] [--device D]
                      [--max-sessions N] [--token T] [--allow-origin O] [--threads N] [--no-web] ...
    snac-stream bench-latency [--model M] [--random-weights] [--clients N] [--duration S] [--threads N]
                              [--device D] [--json P]

``serve`` runs the websocket server (protocol in docs/protocol.md) and serves the browser client page on the
same port (``GET /``; ``--no-web`` turns it off); ``bench-latency`` runs N real-time
roundtrip clients against an in-process server on loopback and prints end-to-end latency percentiles.

``--model`` takes a hub id (``hubertsiuzdak/snac_24khz``), a preset name (``24khz``) or a local checkpoint
directory. Each subcommand is one ``add_*_parser`` function registering its options and one ``run_*``
function doing the work; new subcommands add a pair and an entry in ``COMMANDS``. ``live`` and
``play-tokens`` are the live demos (``demos/live_codec.py``, ``demos/play_tokens.py``); their loops, devices and
codec transports live in ``snac_stream.live`` and ``snac_stream.audio_io``. With ``--server`` they stream through
a running ``serve`` (roundtrip and decode sessions; transports in ``snac_stream.remote``) instead of a model
loaded here.

Expected failures (missing files, bad checkpoints, offline hub, corrupt codes or token streams, model mismatch,
unusable torch or sound device, unsupported sample rate, a ``--server`` that is unreachable or refuses the
session) print a single ``error: ...`` line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from . import __version__, audio_io, live
from .audio import WRITE_FORMATS, load_audio, save_audio, to_tensor
from .codesfile import config_differences, load_codes, save_codes
from .config import HUB_IDS, PRESETS
from .model import SNAC
from .tokens import LAYOUTS, get_layout

DEFAULT_MODEL = HUB_IDS["24khz"]
EXIT_ERROR = 2


class CLIError(Exception):
    """A user-facing failure: printed as one ``error:`` line, exit status 2."""


# ---- shared helpers ------------------------------------------------------------------------------------
def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA if available, else CPU) or any torch device string, checked to be usable here."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise CLIError(f"--device {spec!r} is not a torch device ({exc}); try cpu, cuda or cuda:0") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise CLIError(f"--device {spec}: CUDA is not available ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CLIError(f"--device {spec}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {spec}: MPS is not available on this machine; use --device cpu")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:  # torch raises either for devices it was not built for
        raise CLIError(f"--device {spec}: cannot use this device ({exc})") from exc
    return device


def load_model(spec: str, device: torch.device) -> SNAC:
    """Load a hub id, preset name or local directory onto ``device``; ``model.name`` is canonical.

    Local directories are recorded by absolute path and presets by their hub id, so a codes file names
    a model that ``decode`` can find again from any working directory.
    """
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"--model {spec}: is a file; pass the checkpoint directory holding config.json")
        name = str(path.resolve())
    elif _looks_like_path(spec):
        raise CLIError(f"--model {spec}: no such checkpoint directory")
    else:
        name = HUB_IDS.get(spec.lower().removeprefix("snac_"), spec)
    model = SNAC.from_pretrained(name, map_location=device)
    model.name = name
    return model


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "owner/name"; anything anchored or deeper is meant as a directory.
    return (spec.startswith((".", "~")) or os.path.isabs(spec) or spec.count("/") > 1
            or (os.sep != "/" and os.sep in spec))


def _check_output(path: Path) -> None:
    """Fail before any model work if the output cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"output directory does not exist: {parent}")
    if path.is_dir():
        raise CLIError(f"output path is a directory: {path}")


def _say(args: argparse.Namespace, line: str) -> None:
    if not args.quiet:
        print(line, file=sys.stderr)


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="torch device: auto (CUDA if available, else CPU), cpu, cuda, cuda:1, ... "
                             "(default: auto)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")


# ---- encode --------------------------------------------------------------------------------------------
def add_encode_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "encode", help="audio file -> codes (.npz)",
        description="Encode an audio file (wav, flac, ogg; any rate, channels mixed to mono) into SNAC codes.")
    p.add_argument("input", type=Path, help="audio file to encode")
    p.add_argument("output", type=Path, help="codes file to write (.npz)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id, preset (24khz, 32khz, 44khz) or checkpoint directory (default: {DEFAULT_MODEL})")
    _add_common_options(p)
    p.set_defaults(func=run_encode)


def run_encode(args: argparse.Namespace) -> int:
    if not args.input.exists():
        raise FileNotFoundError(f"input audio file not found: {args.input}")
    _check_output(args.output)
    device = resolve_device(args.device)

    start = time.perf_counter()
    model = load_model(args.model, device)
    load_s = time.perf_counter() - start
    cfg = model.config

    audio, source_rate = load_audio(args.input, cfg.sampling_rate)
    duration = audio.shape[0] / cfg.sampling_rate
    start = time.perf_counter()
    with torch.inference_mode():
        codes = model.encode(to_tensor(audio).to(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    encode_s = time.perf_counter() - start
    save_codes(args.output, codes, cfg, model_name=model.name, num_samples=audio.shape[0],
               source_sample_rate=source_rate)

    frames = [c.shape[-1] for c in codes]
    bits = sum(frames) * math.log2(cfg.codebook_size)
    rate_note = f"resampled to {cfg.sampling_rate} Hz" if source_rate != cfg.sampling_rate else "no resampling"
    _say(args, f"input   {args.input}: {duration:.2f} s, {source_rate} Hz -> {rate_note} "
               f"({audio.shape[0]} samples)")
    _say(args, f"model   {model.name} ({cfg.sampling_rate} Hz, {cfg.n_codebooks} levels x {cfg.codebook_size} "
               f"codes) on {device}, loaded in {load_s:.2f} s")
    _say(args, f"codes   {' / '.join(map(str, frames))} per level (coarse first), {sum(frames)} in all")
    _say(args, f"bitrate {cfg.bitrate_bps / 1000:.2f} kbps nominal; {bits / duration / 1000:.2f} kbps for this "
               f"file (padded to whole frames)")
    _say(args, f"time    encode {encode_s:.2f} s, real-time factor {encode_s / duration:.3f} "
               f"(processing time / audio duration)")
    _say(args, f"wrote   {args.output} ({_size(args.output)})")
    return 0


# ---- decode --------------------------------------------------------------------------------------------
def add_decode_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "decode", help="codes (.npz) -> audio file",
        description="Decode a codes file back to audio at the model's sample rate, trimmed to the original "
                    "length. The output format follows the suffix: " + ", ".join(WRITE_FORMATS) + ".")
    p.add_argument("input", type=Path, help="codes file written by `snac-stream encode`")
    p.add_argument("output", type=Path, help="audio file to write (.wav, .flac or .ogg)")
    p.add_argument("--model", default=None,
                   help="hub id, preset or checkpoint directory (default: the model recorded in the codes "
                        "file); its config must match the file's")
    p.add_argument("--noise-seed", type=_non_negative_int, default=0,
                   help="seed of the decoder's deterministic noise (default: 0)")
    p.add_argument("--float", dest="float32", action="store_true",
                   help="write 32-bit float samples (wav only) instead of 16-bit PCM")
    _add_common_options(p)
    p.set_defaults(func=run_decode)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a positive integer, got 0")
    return value


def run_decode(args: argparse.Namespace) -> int:
    suffix = args.output.suffix.lower()
    if suffix not in WRITE_FORMATS:
        raise CLIError(f"cannot write {args.output}: unsupported suffix {args.output.suffix or '(none)'!r}; "
                       f"use one of {', '.join(WRITE_FORMATS)}")
    if args.float32 and suffix != ".wav":
        raise CLIError("--float needs a .wav output (flac and ogg have no float sample format)")
    _check_output(args.output)
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
    except CLIError as exc:
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
    with torch.inference_mode():
        audio = model.decode(codes_file.codes)[0, 0, : codes_file.num_samples]
        audio = audio.float().cpu()
    decode_s = time.perf_counter() - start
    subtype = "FLOAT" if args.float32 else None
    save_audio(args.output, audio, codes_file.sample_rate, subtype=subtype)

    cfg = model.config
    duration = codes_file.duration_s
    frames = [c.shape[-1] for c in codes_file.codes]
    _say(args, f"codes   {args.input}: {' / '.join(map(str, frames))} per level (coarse first), "
               f"{duration:.2f} s at {codes_file.sample_rate} Hz"
               + (f" (source was {codes_file.source_sample_rate} Hz)" if codes_file.source_sample_rate else ""))
    _say(args, f"model   {model.name} ({cfg.bitrate_bps / 1000:.2f} kbps nominal) on {device}, "
               f"loaded in {load_s:.2f} s, noise seed {args.noise_seed}")
    _say(args, f"time    decode {decode_s:.2f} s, real-time factor {decode_s / duration:.3f} "
               f"(processing time / audio duration)")
    _say(args, f"wrote   {args.output}: {audio.shape[-1]} samples at {codes_file.sample_rate} Hz, "
               f"{'32-bit float' if args.float32 else WRITE_FORMATS[suffix][1]} ({_size(args.output)})")
    return 0


# ---- live ----------------------------------------------------------------------------------------------
def _add_device_options(p: argparse.ArgumentParser, directions: Sequence[str]) -> None:
    for kind in directions:
        p.add_argument(f"--{kind}-device", default=None, metavar="NAME|INDEX",
                       help=f"{kind} sound device: index or (part of) its name (default: the system default)")
    p.add_argument("--list-devices", action="store_true", help="list the sound devices and exit")
    p.add_argument("--device-rate", type=_positive_int, default=None, metavar="HZ",
                   help="open the sound device(s) at this rate (default: the model's rate if the device "
                        "takes it, else the device's default rate; audio is resampled to and from the model)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 is often fastest for the small pushes of "
                        "live streaming on a busy machine")
    p.add_argument("--buffer", type=float, default=100.0, metavar="MS",
                   help="output jitter buffer: audio queued before playback starts or resumes after an "
                        "underrun (default: 100 ms)")
def add_live_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "live", help="microphone -> codec -> speaker, live",
        description="Stream the microphone through the streaming encoder and decoder to the speaker, showing "
                    "the measured latency (a sample's capture to its playback), bitrate, token rate, dropped "
                    "blocks and underruns. --input/--output replace the devices with files.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id, preset (24khz, 32khz, 44khz) or checkpoint directory (default: {DEFAULT_MODEL})")
    p.add_argument("--block", type=_positive_int, default=480, metavar="SAMPLES",
                   help="samples per block at the model's rate (default: 480, 20 ms at 24 kHz)")
    p.add_argument("--lookahead", type=_non_negative_int, default=None, metavar="SAMPLES",
                   help="decoder latency dial: samples of look-ahead before audio is emitted (default: exact "
                        "decoding; smaller is earlier and approximate)")
    p.add_argument("--input", type=Path, default=None, metavar="FILE", help="read audio from a file, not a device")
    p.add_argument("--output", type=Path, default=None, metavar="FILE",
                   help="write the decoded audio to a file (.wav is 32-bit float), not a device")
    p.add_argument("--realtime", action="store_true", help="with --input: release the file at its real pace")
    p.add_argument("--seconds", type=float, default=None, help="stop after this many seconds of input")
    p.add_argument("--save-input", type=Path, default=None, metavar="FILE",
                   help="also write the audio the encoder received (at the model's rate) to FILE")
    _add_server_options(p, "roundtrip")
    _add_device_options(p, ("input", "output"))
    _add_common_options(p)
    p.set_defaults(func=run_live)


def _add_server_options(p: argparse.ArgumentParser, session: str) -> None:
    p.add_argument("--server", default=None, metavar="ws://HOST:PORT",
                   help=f"stream through a running 'snac-stream serve' ({session} session) instead of a model "
                        "in this process; the server's model is used and --model is ignored")
    p.add_argument("--token", default=None,
                   help="auth token for --server (default: $SNAC_STREAM_TOKEN)")


def _server_token(args: argparse.Namespace) -> Optional[str]:
    if args.server is None:
        if args.token is not None:
            raise CLIError("--token goes with --server")
        return None
    if args.lookahead is not None:
        raise CLIError("--lookahead sets the in-process decoder; a server decodes exactly")
    from .server.server import TOKEN_ENV
    return args.token or os.environ.get(TOKEN_ENV) or None


def _server_line(args: argparse.Namespace, ready) -> str:
    """What a demo says about the server it streams through (from its ``ready`` message)."""
    return (f"server  {args.server}: {ready.model} ({ready.sample_rate} Hz"
            f"{', RANDOM WEIGHTS' if ready.random_weights else ''}), {ready.server}")


def _listed_devices(args: argparse.Namespace) -> bool:
    """Handle --list-devices and --threads; returns True when the command is done."""
    if args.list_devices:
        print(audio_io.list_devices())
        return True
    if args.buffer < 0:
        raise CLIError(f"--buffer must be >= 0 ms, got {args.buffer}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return False


def _make_sink(args: argparse.Namespace, rate: int, block: int, on_play) -> "audio_io.DeviceSink | audio_io.FileSink":
    if args.output is not None:
        return audio_io.FileSink(args.output, rate, on_play=on_play)
    device = audio_io.find_device(args.output_device, "output")
    dev_rate = audio_io.device_rate(device, "output", rate, args.device_rate)
    return audio_io.DeviceSink(device, rate, dev_rate, block, prebuffer=round(args.buffer * rate / 1000),
                               on_play=on_play)


def _check_audio_output(path: Optional[Path]) -> None:
    if path is None:
        return
    if path.suffix.lower() not in WRITE_FORMATS:
        raise CLIError(f"cannot write {path}: unsupported suffix {path.suffix or '(none)'!r}; "
                       f"use one of {', '.join(WRITE_FORMATS)}")
    _check_output(path)


def _status_printer(args: argparse.Namespace):
    tty = sys.stderr.isatty()

    def show(stats) -> None:
        if not args.quiet:
            # A refreshed line on a terminal; one line per update when stderr is a file or a pipe.
            print(("\r" if tty else "") + stats.status(), end="" if tty else "\n", file=sys.stderr, flush=True)
    return show


def run_live(args: argparse.Namespace) -> int:
    if _listed_devices(args):
        return 0
    if args.realtime and args.input is None:
        raise CLIError("--realtime paces an --input file; the microphone is real time already")
    if args.input is not None and not args.input.exists():
        raise FileNotFoundError(f"input audio file not found: {args.input}")
    _check_audio_output(args.output)
    _check_audio_output(args.save_input)
    if args.seconds is not None and args.seconds <= 0:
        raise CLIError(f"--seconds must be positive, got {args.seconds}")
    token = _server_token(args)
    device = resolve_device(args.device) if args.server is None else None
    # Devices are checked before the model loads, so a wrong name fails in a moment.
    if args.input is None:
        in_device = audio_io.find_device(args.input_device, "input")
    if args.output is None:
        audio_io.find_device(args.output_device, "output")
    codec: "live.CodecTransport"
    if args.server is not None:
        from .remote import WebSocketCodec

        codec = WebSocketCodec(args.server, token=token)
        ready = codec.ready
        rate = ready.sample_rate
        _say(args, f"{_server_line(args, ready)}; algorithmic latency {codec.latency_samples} samples "
                   f"({codec.latency_samples / rate * 1000:.0f} ms, exact decoding)")
    else:
        model = load_model(args.model, device)
        rate = model.sampling_rate
        codec = live.InProcessCodec(model, lookahead_samples=args.lookahead)
        _say(args, f"model   {model.name} ({rate} Hz, {model.config.bitrate_bps / 1000:.2f} kbps) on {device}; "
                   f"algorithmic latency {codec.latency_samples} samples ({codec.latency_samples / rate * 1000:.0f} "
                   f"ms" + (", exact decoding)" if args.lookahead is None else
                            f", decoder look-ahead {codec.decoder.lookahead_samples})"))
    try:
        return _run_live_codec(args, codec, rate, in_device if args.input is None else None)
    finally:
        close = getattr(codec, "close", None)
        if close is not None:  # a remote session left open by an error (a no-op after flush)
            close()


def _run_live_codec(args: argparse.Namespace, codec: "live.CodecTransport", rate: int, in_device) -> int:
    meter = live.LatencyMeter(rate)
    if args.input is not None:
        source = audio_io.FileSource(args.input, rate, args.block, realtime=args.realtime)
        where_in = f"{args.input}" + (" (real-time pace)" if args.realtime else "")
    else:
        in_rate = audio_io.device_rate(in_device, "input", rate, args.device_rate)
        source = audio_io.DeviceSource(in_device, rate, in_rate, args.block)
        where_in = f"input device {in_device}" + (f" at {in_rate} Hz, resampled" if in_rate != rate else "")
    sink = _make_sink(args, rate, args.block, meter.played)
    where_out = (f"{args.output}" if args.output is not None else
                 "output device" + (f" at {sink.device_rate} Hz, resampled" if sink.device_rate != rate else ""))
    saved: List = []
    _say(args, f"live    {where_in} -> {where_out}, blocks of {args.block} samples; Ctrl-C stops")
    stats = live.run_codec(source, codec, sink, latency=meter,
                           max_samples=None if args.seconds is None else round(args.seconds * rate),
                           tee=saved.append if args.save_input is not None else None,
                           on_status=_status_printer(args),
                           on_start=lambda: _say(args, "started (streams open)"))
    if sys.stderr.isatty() and not args.quiet:
        print(file=sys.stderr)
    if args.save_input is not None and saved:
        save_audio(args.save_input, np.concatenate(saved), rate, subtype="FLOAT" if args.save_input.suffix.lower() == ".wav" else None)
    summary = meter.summary()
    lat = (f"latency median {summary[0] * 1000:.0f} ms (min {summary[1] * 1000:.0f}, max {summary[2] * 1000:.0f})"
           if summary else "latency n/a")
    _say(args, f"summary {stats.audio_seconds:.2f} s in, {stats.produced} samples out; {lat}; "
               f"{stats.bitrate / 1000:.2f} kbps, {stats.token_rate:.1f} tokens/s; dropped blocks "
               f"{stats.dropped_blocks}, underruns {stats.underruns}")
    warnings = getattr(codec, "warnings", [])
    if warnings:
        _say(args, f"server  {len(warnings)} warning{'s' if len(warnings) > 1 else ''}; the last: "
                   f"{warnings[-1].get('message', warnings[-1])}")
    if args.output is not None:
        _say(args, f"wrote   {args.output}")
    return 0


# ---- play-tokens ---------------------------------------------------------------------------------------
def add_play_tokens_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "play-tokens", help="LLM token stream -> speaker, as the tokens arrive",
        description="Play an Orpheus-style token stream (<custom_token_N> text or integer ids, from a file, "
                    "stdin or a websocket) as it arrives: each coarse frame is decoded as soon as its last token "
                    "is in. Reports the time to first audio and underruns.")
    p.add_argument("tokens", nargs="?", default="-",
                   help="token file, - for stdin (default), or a ws:// URL streaming tokens (text messages, or "
                        "binary messages of int32 LE ids) until it closes")
    p.add_argument("--source-token", default=None, metavar="T",
                   help="bearer token for a ws:// token source (sent as an Authorization header)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id, preset or checkpoint directory (default: {DEFAULT_MODEL})")
    p.add_argument("--layout", default="orpheus", choices=LAYOUTS, help="token layout (default: orpheus)")
    p.add_argument("--token-offset", type=_non_negative_int, default=0,
                   help="subtracted from integer ids (128266 for raw Orpheus LLM vocabulary ids; default: 0)")
    p.add_argument("--lookahead", type=_non_negative_int, default=None, metavar="SAMPLES",
                   help="decoder latency dial (default: exact decoding; 0 is the earliest, approximate)")
    p.add_argument("--output", type=Path, default=None, metavar="FILE",
                   help="write the audio to a file (.wav is 32-bit float), not a device")
    _add_server_options(p, "decode")
    _add_device_options(p, ("output",))
    _add_common_options(p)
    p.set_defaults(func=run_play_tokens)


def run_play_tokens(args: argparse.Namespace) -> int:
    if _listed_devices(args):
        return 0
    _check_audio_output(args.output)
    from_stdin = args.tokens == "-"
    from_websocket = args.tokens.startswith(("ws://", "wss://"))
    if not from_stdin and not from_websocket and not Path(args.tokens).is_file():
        raise FileNotFoundError(f"token file not found: {args.tokens}")
    token = _server_token(args)
    device = resolve_device(args.device) if args.server is None else None
    if args.output is None:
        audio_io.find_device(args.output_device, "output")
    where = f"reading {'stdin' if from_stdin else args.tokens}"
    decoder: "live.TokenTransport"
    if args.server is not None:
        from .remote import WebSocketTokenDecoder

        # The layout's shape comes from the server's model (said in ready); only its name and offset are ours.
        decoder = WebSocketTokenDecoder(args.server, args.layout, token_offset=args.token_offset, token=token)
        ready = decoder.ready
        rate = ready.sample_rate
        _say(args, f"{_server_line(args, ready)}, layout {args.layout} ({ready.token_layout['frame_tokens']} tokens "
                   f"per coarse frame), decoder latency {ready.algorithmic_latency_samples} samples; {where}")
    else:
        model = load_model(args.model, device)
        layout = get_layout(args.layout, model.config, token_offset=args.token_offset)
        rate = model.sampling_rate
        decoder = live.InProcessTokenDecoder(model, layout, lookahead_samples=args.lookahead)
        _say(args, f"model   {model.name} ({rate} Hz) on {device}, layout {layout.name} ({layout.frame_tokens} "
                   f"tokens per coarse frame), decoder latency "
                   f"{decoder.decoder.latency_samples if args.lookahead is None else decoder.decoder.lookahead_samples}"
                   f" samples; {where}")
    sink = _make_sink(args, rate, 480 * rate // 24000, None)
    parser = live.TokenTextParser(source="stdin" if from_stdin else str(args.tokens))
    fd = None if from_websocket else sys.stdin.fileno() if from_stdin else os.open(args.tokens, os.O_RDONLY)
    if fd is None:
        from .remote import token_text_from_websocket

        chunks = token_text_from_websocket(args.tokens, token=args.source_token)
    else:
        chunks = live.read_text_chunks(fd)
    try:
        stats = live.run_token_playback(
            chunks, parser, decoder, sink,
            on_first_audio=lambda st: _say(args, f"first audio: {st.samples} samples, {st.tokens} tokens in"))
    finally:
        if fd is not None and not from_stdin:
            os.close(fd)
        close = getattr(decoder, "close", None)
        if close is not None:  # a remote session left open by an error (a no-op after flush)
            close()
    ttfa = stats.time_to_first_audio
    _say(args, f"summary {stats.tokens} tokens -> {stats.samples} samples ({stats.samples / rate:.2f} s); time to "
               f"first audio {'n/a' if ttfa is None else f'{ttfa * 1000:.0f} ms'} (first token in -> first sample "
               f"{'written' if args.output is not None else 'played'}); underruns {stats.underruns}")
    if args.output is not None:
        _say(args, f"wrote   {args.output}")
    return 0


# ---- serve / bench-latency ------------------------------------------------------------------------------
def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id, preset (24khz, 32khz, 44khz) or checkpoint directory (default: {DEFAULT_MODEL})")
    p.add_argument("--random-weights", action="store_true",
                   help="build the --model preset with random weights instead of loading a checkpoint "
                        "(benchmarking only: the audio is noise; reported as such to clients)")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "triton"],
                   help="compute path (default: the model's, auto = Triton on CUDA, PyTorch elsewhere)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads of the engine worker (default: torch's count less one core for the "
                        "event loop, at least 1)")


def _server_model(args: argparse.Namespace, device: torch.device) -> SNAC:
    if args.random_weights:
        preset = args.model.lower().removeprefix("hubertsiuzdak/").removeprefix("snac_")
        if preset not in PRESETS:
            raise CLIError(f"--random-weights needs a preset name ({', '.join(PRESETS)}), got {args.model!r}")
        torch.manual_seed(0)
        model = SNAC.from_config(PRESETS[preset]).to(device).eval()
        model.name = preset
        return model
    return load_model(args.model, device).eval()


def _positive_float(text: str, zero: bool = False) -> float:
    what = "a number >= 0" if zero else "a positive number"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (value >= 0 if zero else value > 0) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    return _positive_float(text, zero=True)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="websocket server: encode, decode and roundtrip sessions",
        description="Serve one model over websockets (protocol: docs/protocol.md). Binds to 127.0.0.1 unless "
                    "--host says otherwise; a non-loopback address needs --token (or $SNAC_STREAM_TOKEN).")
    _add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_non_negative_int, default=8765, help="TCP port (default: 8765; 0 picks one)")
    p.add_argument("--max-sessions", type=_positive_int, default=8,
                   help="concurrent sessions; more are refused with server_full (default: 8)")
    p.add_argument("--max-frame-bytes", type=_positive_int, default=1 << 20,
                   help="largest message accepted, in bytes (default: 1048576)")
    p.add_argument("--idle-timeout", type=_positive_float, default=30.0,
                   help="seconds without a message before a session is closed (default: 30)")
    p.add_argument("--max-backlog", type=_positive_float, default=2.0,
                   help="seconds of unprocessed input per session before the server stops reading it (default: 2)")
    p.add_argument("--max-output-bytes", type=_positive_int, default=4 << 20,
                   help="queued output per session before a client that does not read is dropped (default: 4 MiB)")
    p.add_argument("--token", default=None,
                   help="auth token clients must present (hello.auth or 'Authorization: Bearer'); "
                        "default: $SNAC_STREAM_TOKEN")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="browser Origin allowed besides loopback pages (repeatable; '*' allows any)")
    p.add_argument("--behind-warning", type=_non_negative_float, default=1.0, metavar="SECONDS",
                   help="warn an encode or roundtrip session (JSON 'warning', code 'behind') when its output "
                        "answers input received more than this long ago (default: 1; 0: never)")
    p.add_argument("--no-web", action="store_true",
                   help="do not serve the browser page (GET /) on the websocket port")
    _add_common_options(p)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from .server import ServerOptions, SNACServer, web
    from .server.server import TOKEN_ENV

    options = ServerOptions(host=args.host, port=args.port, max_sessions=args.max_sessions,
                            max_frame_bytes=args.max_frame_bytes, idle_timeout_s=args.idle_timeout,
                            max_backlog_s=args.max_backlog, max_output_bytes=args.max_output_bytes,
                            token=args.token or os.environ.get(TOKEN_ENV) or None,
                            allowed_origins=args.allow_origin, backend=args.backend, threads=args.threads,
                            web=not args.no_web, behind_warning_s=args.behind_warning)
    try:
        options.check()
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    device = resolve_device(args.device)
    model = _server_model(args, device)
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    async def main() -> None:
        async with SNACServer(model, options, model_name=model.name, random_weights=args.random_weights) as server:
            cfg = model.config
            _say(args, f"serving {model.name}{' (RANDOM WEIGHTS)' if args.random_weights else ''} on {device} at "
                       f"{server.url}: {cfg.sampling_rate} Hz, step {server.step_samples} samples, algorithmic "
                       f"latency (samples) {server.latency}; up to {options.max_sessions} sessions"
                       f"{', token required' if options.token else ''}")
            if options.web:
                _say(args, f"browser client (mic -> codec -> speaker): {web.page_url(server)}")
            await server.serve_forever()

    try:
        asyncio.run(main())
    except OSError as exc:
        raise CLIError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return 0


def add_bench_latency_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench-latency", help="end-to-end latency of N real-time roundtrip clients on loopback",
        description="Start a server in this process on 127.0.0.1, stream real-time paced audio from N concurrent "
                    "roundtrip clients (in worker processes), and print p50/p95/p99 of the end-to-end latency per "
                    "output sample split into algorithmic delay, server time (queue + compute) and transport, plus "
                    "errors, the server's tick times and the process's memory over time.")
    _add_model_options(p)
    p.add_argument("--clients", type=_positive_int, default=4, help="concurrent clients (default: 4)")
    p.add_argument("--duration", type=_positive_float, default=10.0, help="seconds of audio per client (default: 10)")
    p.add_argument("--chunk-ms", type=_positive_float, default=20.0,
                   help="milliseconds of audio per client message (default: 20)")
    p.add_argument("--sample-format", default="pcm16", choices=["pcm16", "float32"])
    p.add_argument("--client-processes", type=_non_negative_int, default=None, metavar="N",
                   help="worker processes running the clients, as remote callers would (default: half the cores "
                        "less one, at least 1; 0 runs them in the server's process)")
    p.add_argument("--json", type=Path, default=None, help="write the full report (figures, machine) as JSON")
    _add_common_options(p)
    p.set_defaults(func=run_bench_latency)


def run_bench_latency(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from .server.latency import run_latency_bench

    if args.json is not None:
        _check_output(args.json)
    device = resolve_device(args.device)
    model = _server_model(args, device)
    report = asyncio.run(run_latency_bench(
        model, clients=args.clients, duration_s=args.duration, chunk_ms=args.chunk_ms,
        sample_format=args.sample_format, model_name=model.name, random_weights=args.random_weights,
        backend=args.backend, threads=args.threads, client_processes=args.client_processes,
        say=lambda line: _say(args, line)))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        _say(args, f"wrote   {args.json}")
    return 0 if report["errors"] == 0 else 1


# ---- entry point ---------------------------------------------------------------------------------------
COMMANDS: List[Callable[[argparse._SubParsersAction], None]] = [
    add_encode_parser, add_decode_parser, add_live_parser, add_play_tokens_parser, add_serve_parser,
    add_bench_latency_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snac-stream", description="SNAC neural audio codec: encode audio to codes and decode them back, "
                                        "or serve streams over websockets.")
    parser.add_argument("--version", action="version", version=f"snac-stream {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 error) instead of exiting."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help / usage errors; report the status instead
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else EXIT_ERROR
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    try:
        return args.func(args)
    except (CLIError, FileNotFoundError, ValueError, OSError, audio_io.AudioIOError) as exc:
        # Messages may carry a hint on a second line; keep the report to one line.
        message = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
