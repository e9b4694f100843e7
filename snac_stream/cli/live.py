"""The live demos: ``live`` (microphone -> codec -> speaker) and ``play-tokens`` (LLM token stream -> speaker).

Their loops, devices and codec transports live in :mod:`snac_stream.live` and :mod:`snac_stream.audio_io`;
with ``--server`` they stream through a running ``serve`` (transports in :mod:`snac_stream.remote`) instead
of a model loaded here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from .. import audio_io
from ..audio import save_audio
from ..live import (CodecTransport, InProcessCodec, InProcessTokenDecoder, LatencyMeter, LiveStats,
                    TokenTransport, read_text_chunks, run_codec, run_token_playback)
from ..loading import load_model, resolve_device
from ..tokens import LAYOUTS, TokenTextParser, get_layout
from ..llm import ORPHEUS_VOICES, PROMPT_FORMATS, SamplingParams
from .common import (CLIError, add_common_options, add_model_option, audio_suffix, check_output, model_label,
                     non_negative_float, non_negative_int, positive_float, positive_int, say)


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``live`` and ``play-tokens``."""
    p = subparsers.add_parser(
        "live", help="microphone -> codec -> speaker, live",
        description="Stream the microphone through the streaming encoder and decoder to the speaker, showing "
                    "the measured latency (a sample's capture to its playback), bitrate, token rate, dropped "
                    "blocks and underruns. --input/--output replace the devices with files.")
    add_model_option(p)
    p.add_argument("--block", type=positive_int, default=480, metavar="SAMPLES",
                   help="samples per block at the model's rate (default: 480, 20 ms at 24 kHz)")
    p.add_argument("--lookahead", type=non_negative_int, default=None, metavar="SAMPLES",
                   help="decoder latency dial: samples of look-ahead before audio is emitted (default: exact "
                        "decoding; smaller is earlier and approximate)")
    p.add_argument("--input", type=Path, default=None, metavar="FILE", help="read audio from a file, not a device")
    p.add_argument("--output", type=Path, default=None, metavar="FILE",
                   help="write the decoded audio to a file (.wav is 32-bit float), not a device")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--as-fast-as-possible", dest="as_fast_as_possible", action="store_true",
                      help="with --input: push the file as fast as the codec takes it instead of at its real "
                           "pace (the default, as a microphone would); the delays shown are then queueing, "
                           "not latency")
    pace.add_argument("--realtime", action="store_true", help=argparse.SUPPRESS)  # the default now; kept as a no-op
    p.add_argument("--seconds", type=float, default=None, help="stop after this many seconds of input")
    p.add_argument("--save-input", type=Path, default=None, metavar="FILE",
                   help="also write the audio the encoder received (at the model's rate) to FILE")
    _add_server_options(p, "roundtrip")
    _add_device_options(p, ("input", "output"))
    add_common_options(p)
    p.set_defaults(func=run_live)

    p = subparsers.add_parser(
        "play-tokens", help="LLM token stream -> speaker, as the tokens arrive",
        description="Play an Orpheus-style token stream (<custom_token_N> text or integer ids, from a file, "
                    "stdin or a websocket) as it arrives: each coarse frame is decoded as soon as its last token "
                    "is in. Reports the time to first audio and underruns.")
    p.add_argument("tokens", nargs="?", default=None,
                   help="token file, - for stdin (default), or a ws:// URL streaming tokens (text messages, or "
                        "binary messages of int32 LE ids) until it closes; not with --llm")
    llm = p.add_argument_group(
        "speech from an LLM server", "--llm URL streams a completion from an OpenAI-compatible /v1/completions "
        "endpoint (vLLM, SGLang, llama.cpp serving a TTS model such as Orpheus) and plays its audio tokens as "
        "they arrive, instead of reading TOKENS. With --server, the server calls the LLM and decodes (an llm "
        "session: its 'serve --allow-llm' must list URL, which it must reach) and this process only plays")
    llm.add_argument("--llm", default=None, metavar="URL", help="http(s):// base URL of the LLM server")
    llm.add_argument("--llm-model", default=None, metavar="NAME", help="model name the LLM server serves")
    llm.add_argument("--prompt", default=None, metavar="TEXT", help="the text to speak")
    llm.add_argument("--voice", default=None,
                     help="voice (orpheus formats: " + ", ".join(ORPHEUS_VOICES) + "; default: tara)")
    llm.add_argument("--prompt-format", default="orpheus", metavar="FORMAT",
                     help=f"{', '.join(PROMPT_FORMATS)} or a template with {{text}} and {{voice}} (default: orpheus)")
    llm.add_argument("--temperature", type=non_negative_float, default=None,
                     help=f"sampling temperature (default: {SamplingParams().temperature})")
    llm.add_argument("--top-p", type=positive_float, default=None,
                     help=f"nucleus sampling (default: {SamplingParams().top_p})")
    llm.add_argument("--max-tokens", type=positive_int, default=None,
                     help=f"most tokens to generate (default: {SamplingParams().max_tokens}); a completion cut "
                          "inside a coarse frame is an error after its whole frames played")
    llm.add_argument("--llm-api-key", default=None, metavar="KEY",
                     help="bearer key for the LLM server (default: $OPENAI_API_KEY if set; with --server only this "
                          "flag's key is sent, else the server uses its own 'serve --llm-api-key')")
    p.add_argument("--source-token", default=None, metavar="T",
                   help="bearer token for a ws:// token source (sent as an Authorization header)")
    add_model_option(p)
    p.add_argument("--layout", default="orpheus", choices=LAYOUTS, help="token layout (default: orpheus)")
    p.add_argument("--token-offset", type=non_negative_int, default=0,
                   help="subtracted from integer ids (128266 for raw Orpheus LLM vocabulary ids; default: 0)")
    p.add_argument("--lookahead", type=non_negative_int, default=None, metavar="SAMPLES",
                   help="decoder latency dial (default: exact decoding; 0 is the earliest, approximate)")
    p.add_argument("--output", type=Path, default=None, metavar="FILE",
                   help="write the audio to a file (.wav is 32-bit float), not a device")
    _add_server_options(p, "decode")
    _add_device_options(p, ("output",))
    add_common_options(p)
    p.set_defaults(func=run_play_tokens)


def _add_server_options(p: argparse.ArgumentParser, session: str) -> None:
    p.add_argument("--server", default=None, metavar="ws://HOST:PORT",
                   help=f"stream through a running 'snac-stream serve' ({session} session) instead of a model "
                        "in this process; the server's model is used and --model is ignored")
    p.add_argument("--token", default=None,
                   help="auth token for --server (default: $SNAC_STREAM_TOKEN)")


def _add_device_options(p: argparse.ArgumentParser, directions: Sequence[str]) -> None:
    for kind in directions:
        p.add_argument(f"--{kind}-device", default=None, metavar="NAME|INDEX",
                       help=f"{kind} sound device: index or (part of) its name (default: the system default)")
    p.add_argument("--list-devices", action="store_true", help="list the sound devices and exit")
    p.add_argument("--device-rate", type=positive_int, default=None, metavar="HZ",
                   help="open the sound device(s) at this rate (default: the model's rate if the device "
                        "takes it, else the device's default rate; audio is resampled to and from the model)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 is often fastest for the small pushes of "
                        "live streaming on a busy machine")
    p.add_argument("--buffer", type=float, default=100.0, metavar="MS",
                   help="output jitter buffer: audio queued before playback starts or resumes after an "
                        "underrun (default: 100 ms)")


# ---- live ----------------------------------------------------------------------------------------------
def run_live(args: argparse.Namespace) -> int:
    """Stream the microphone (or ``--input``) through the codec to the speaker (or ``--output``)."""
    if _listed_devices(args):
        return 0
    if (args.realtime or args.as_fast_as_possible) and args.input is None:
        raise CLIError(f"--{'realtime' if args.realtime else 'as-fast-as-possible'} sets the pace of an --input "
                       "file; the microphone is real time already")
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
    codec: CodecTransport
    if args.server is not None:
        from ..remote import WebSocketCodec

        codec = WebSocketCodec(args.server, token=token)
        ready = codec.ready
        rate = ready.sample_rate
        say(args, f"{_server_line(args, ready)}; algorithmic latency {codec.latency_samples} samples "
                  f"({codec.latency_samples / rate * 1000:.0f} ms, exact decoding)")
    else:
        model = load_model(args.model, device)
        rate = model.sampling_rate
        codec = InProcessCodec(model, lookahead_samples=args.lookahead)
        say(args, f"model   {model_label(model)} ({rate} Hz, {model.config.bitrate_bps / 1000:.2f} kbps) on {device}; "
                  f"algorithmic latency {codec.latency_samples} samples ({codec.latency_samples / rate * 1000:.0f} "
                  f"ms" + (", exact decoding)" if args.lookahead is None else
                           f", decoder look-ahead {codec.decoder.lookahead_samples})"))
    try:
        return _run_live_codec(args, codec, rate, in_device if args.input is None else None)
    finally:
        _close_remote(codec)


def _run_live_codec(args: argparse.Namespace, codec: CodecTransport, rate: int, in_device) -> int:
    # An unpaced file arrives faster than real time: output waits in queues for input that came early, so
    # the delays measured are queueing, not the latency a microphone would see.
    paced = args.input is None or not args.as_fast_as_possible
    meter = LatencyMeter(rate, label="latency" if paced else "queueing")
    if args.input is not None:
        source = audio_io.FileSource(args.input, rate, args.block, realtime=paced)
        where_in = f"{args.input}" + (" (real-time pace; --as-fast-as-possible to skip the wait)" if paced else
                                      " (as fast as possible: delays shown are queueing, not latency)")
    else:
        in_rate = audio_io.device_rate(in_device, "input", rate, args.device_rate)
        source = audio_io.DeviceSource(in_device, rate, in_rate, args.block)
        where_in = f"input device {in_device}" + (f" at {in_rate} Hz, resampled" if in_rate != rate else "")
    sink = _make_sink(args, rate, args.block, meter.played)
    where_out = (f"{args.output}" if args.output is not None else
                 "output device" + (f" at {sink.device_rate} Hz, resampled" if sink.device_rate != rate else ""))
    saved: List[np.ndarray] = []
    say(args, f"live    {where_in} -> {where_out}, blocks of {args.block} samples; Ctrl-C stops")
    stats = run_codec(source, codec, sink, latency=meter,
                      max_samples=None if args.seconds is None else round(args.seconds * rate),
                      tee=saved.append if args.save_input is not None else None,
                      on_status=_status_printer(args),
                      on_start=lambda: say(args, "started (streams open)"))
    if sys.stderr.isatty() and not args.quiet:
        print(file=sys.stderr)
    if args.save_input is not None and saved:
        save_audio(args.save_input, np.concatenate(saved), rate, subtype="FLOAT" if args.save_input.suffix.lower() == ".wav" else None)
    summary = meter.summary()
    lat = (f"{meter.label} median {summary[0] * 1000:.0f} ms (min {summary[1] * 1000:.0f}, max "
           f"{summary[2] * 1000:.0f})" if summary else f"{meter.label} n/a")
    if summary and not paced:
        lat += " (input sent faster than real time: time waiting in queues, not latency)"
    say(args, f"summary {stats.audio_seconds:.2f} s in, {stats.produced} samples out; {lat}; "
              f"{stats.bitrate / 1000:.2f} kbps, {stats.token_rate:.1f} tokens/s; dropped blocks "
              f"{stats.dropped_blocks}, underruns {stats.underruns}")
    warnings = getattr(codec, "warnings", [])
    behind = [w for w in warnings if isinstance(w, dict) and w.get("code") == "behind"]
    if not paced and behind:
        # Expected: the file went in faster than real time, so the server's output trails the input.
        say(args, f"note    the server reported its output trailing the input {len(behind)} time"
                  f"{'s' if len(behind) > 1 else ''}, as expected for a file sent faster than real time")
        warnings = [w for w in warnings if w not in behind]
    if warnings:
        say(args, f"server  {len(warnings)} warning{'s' if len(warnings) > 1 else ''}; the last: "
                  f"{warnings[-1].get('message', warnings[-1])}")
    if args.output is not None:
        say(args, f"wrote   {args.output}")
    return 0


def _status_printer(args: argparse.Namespace) -> Callable[[LiveStats], None]:
    tty = sys.stderr.isatty()

    def show(stats: LiveStats) -> None:
        if not args.quiet:
            # A refreshed line on a terminal; one line per update when stderr is a file or a pipe.
            print(("\r" if tty else "") + stats.status(), end="" if tty else "\n", file=sys.stderr, flush=True)
    return show


# ---- play-tokens ---------------------------------------------------------------------------------------
def run_play_tokens(args: argparse.Namespace) -> int:
    """Play a token stream (file, stdin or websocket) as it arrives."""
    if _listed_devices(args):
        return 0
    _check_audio_output(args.output)
    if args.llm is not None:
        return _play_llm(args)
    llm_only = [name for name in ("llm_model", "prompt", "voice", "temperature", "top_p", "max_tokens",
                                  "llm_api_key") if getattr(args, name) is not None]
    if llm_only or args.prompt_format != "orpheus":
        flag = "--" + (llm_only[0] if llm_only else "prompt_format").replace("_", "-")
        raise CLIError(f"{flag} goes with --llm URL")
    if args.tokens is None:
        args.tokens = "-"
    from_stdin = args.tokens == "-"
    from_websocket = args.tokens.startswith(("ws://", "wss://"))
    if not from_stdin and not from_websocket and not Path(args.tokens).is_file():
        raise FileNotFoundError(f"token file not found: {args.tokens}")
    token = _server_token(args)
    device = resolve_device(args.device) if args.server is None else None
    if args.output is None:
        audio_io.find_device(args.output_device, "output")
    where = f"reading {'stdin' if from_stdin else args.tokens}"
    decoder: TokenTransport
    if args.server is not None:
        from ..remote import WebSocketTokenDecoder

        # The layout's shape comes from the server's model (said in ready); only its name and offset are ours.
        decoder = WebSocketTokenDecoder(args.server, args.layout, token_offset=args.token_offset, token=token)
        ready = decoder.ready
        rate = ready.sample_rate
        say(args, f"{_server_line(args, ready)}, layout {args.layout} ({ready.token_layout['frame_tokens']} tokens "
                  f"per coarse frame), decoder latency {ready.algorithmic_latency_samples} samples; {where}")
    else:
        model = load_model(args.model, device)
        layout = get_layout(args.layout, model.config, token_offset=args.token_offset)
        rate = model.sampling_rate
        decoder = InProcessTokenDecoder(model, layout, lookahead_samples=args.lookahead)
        say(args, f"model   {model_label(model)} ({rate} Hz) on {device}, layout {layout.name} ({layout.frame_tokens} "
                  f"tokens per coarse frame), decoder latency "
                  f"{decoder.decoder.latency_samples if args.lookahead is None else decoder.decoder.lookahead_samples}"
                  f" samples; {where}")
    sink = _make_sink(args, rate, 480 * rate // 24000, None)
    parser = TokenTextParser(source="stdin" if from_stdin else str(args.tokens))
    fd = None if from_websocket else sys.stdin.fileno() if from_stdin else os.open(args.tokens, os.O_RDONLY)
    if fd is None:
        from ..remote import token_text_from_websocket

        chunks = token_text_from_websocket(args.tokens, token=args.source_token)
    else:
        chunks = read_text_chunks(fd)
    try:
        stats = run_token_playback(
            chunks, parser, decoder, sink,
            on_first_audio=lambda st: say(args, f"first audio: {st.samples} samples, {st.tokens} tokens in"))
    finally:
        if fd is not None and not from_stdin:
            os.close(fd)
        _close_remote(decoder)
    ttfa = stats.time_to_first_audio
    say(args, f"summary {stats.tokens} tokens -> {stats.samples} samples ({stats.samples / rate:.2f} s); time to "
              f"first audio {'n/a' if ttfa is None else f'{ttfa * 1000:.0f} ms'} (first token in -> first sample "
              f"{'written' if args.output is not None else 'played'}); underruns {stats.underruns}")
    if args.output is not None:
        say(args, f"wrote   {args.output}")
    return 0


def _play_llm(args: argparse.Namespace) -> int:
    """``play-tokens --llm URL``: speak ``--prompt`` through the LLM server, decoding frames as they arrive."""
    from ..llm import LLMStreamError, completions_url, get_prompt_format, speak

    if args.tokens is not None:
        raise CLIError(f"--llm streams the tokens from the LLM server; drop the token source {args.tokens!r}")
    token = _server_token(args)
    if not args.llm_model:
        raise CLIError("--llm needs --llm-model NAME (the model the LLM server serves)")
    if args.prompt is None or not args.prompt.strip():
        raise CLIError("--llm needs --prompt TEXT (the text to speak)")
    endpoint = completions_url(args.llm)
    prompt_format = get_prompt_format(args.prompt_format)
    prompt_format.format(args.prompt, args.voice)  # an unknown voice fails before the model loads
    if args.server is not None:
        return _play_llm_on_server(args, token, endpoint)
    defaults = SamplingParams()
    params = SamplingParams(
        temperature=defaults.temperature if args.temperature is None else args.temperature,
        top_p=defaults.top_p if args.top_p is None else args.top_p,
        max_tokens=defaults.max_tokens if args.max_tokens is None else args.max_tokens)
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise CLIError("--llm needs aiohttp: pip install 'snac-stream[llm]'") from None
    device = resolve_device(args.device)
    if args.output is None:
        audio_io.find_device(args.output_device, "output")
    model = load_model(args.model, device)
    layout = get_layout(args.layout, model.config, token_offset=args.token_offset)
    rate = model.sampling_rate
    say(args, f"model   {model_label(model)} ({rate} Hz) on {device}, layout {layout.name}; "
              f"LLM {endpoint} model {args.llm_model}, prompt format {prompt_format.name}")
    sink = _make_sink(args, rate, 480 * rate // 24000, None)
    written = [0]
    seen: List = []

    def write(samples: np.ndarray) -> None:
        sink.write(samples)
        written[0] += samples.shape[0]

    def first_audio(stats) -> None:
        seen.append(stats)
        say(args, f"first audio: time to first token {_ms(stats.first_token_s)}, to first audio "
                  f"{_ms(stats.first_audio_s)} (from sending the request)")

    sink.start()
    try:
        stats = speak(args.llm, args.llm_model, args.prompt, model, write, on_first_audio=first_audio,
                      voice=args.voice, prompt_format=prompt_format, params=params, layout=layout,
                      lookahead_samples=args.lookahead,
                      api_key=args.llm_api_key or os.environ.get("OPENAI_API_KEY") or None)
    except (LLMStreamError, ValueError) as exc:
        # Keep what was produced: the frames that completed before the failure are in the output.
        if written[0]:
            sink.close()
            if args.output is not None:
                say(args, f"wrote   {args.output}: {written[0] / rate:.2f} s of audio before the error")
        else:
            sink.abort()
        raise CLIError(f"LLM stream from {endpoint}: {exc}") from None
    except BaseException:
        sink.abort()
        raise
    sink.close()
    say(args, f"summary {stats.tokens} audio tokens -> {stats.samples} samples ({stats.audio_s:.2f} s); time to "
              f"first token {_ms(stats.first_token_s)}, time to first audio {_ms(stats.first_audio_s)} (from sending "
              f"the request); finished in {_ms(stats.finished_s)} ({stats.finish_reason or 'no finish reason'}); "
              f"underruns {sink.underruns}")
    if args.output is not None:
        say(args, f"wrote   {args.output}")
    return 0


def _play_llm_on_server(args: argparse.Namespace, token: Optional[str], endpoint: str) -> int:
    """``play-tokens --llm URL --server WS_URL``: an llm session; the server streams the completion and decodes
    it, this process only plays (or writes) the audio it sends."""
    import asyncio

    from ..client import LLMSessionStats, ServerError, llm_speech
    from ..protocol import LLMHello

    if args.output is None:
        audio_io.find_device(args.output_device, "output")
    # Only an explicit --llm-api-key goes to the server ($OPENAI_API_KEY stays here): the server may hold its own.
    llm = LLMHello(url=args.llm, model=args.llm_model, prompt=args.prompt, voice=args.voice,
                   prompt_format=args.prompt_format, temperature=args.temperature, top_p=args.top_p,
                   max_tokens=args.max_tokens, api_key=args.llm_api_key)
    stats = LLMSessionStats()
    sink: List = []  # opened at the first audio, at the rate ready announced

    async def main() -> None:
        async for frame in llm_speech(args.server, llm, stats=stats, auth=token, token_layout=args.layout,
                                      token_offset=args.token_offset):
            first = not sink
            if first:
                ready = stats.ready
                say(args, f"{_server_line(args, ready)}, layout {args.layout}; LLM {endpoint} (called by the server) "
                          f"model {args.llm_model}, prompt format {llm.prompt_format}")
                sink.append(_make_sink(args, ready.sample_rate, 480 * ready.sample_rate // 24000, None))
                sink[0].start()
            sink[0].write(frame.data)
            if first:
                say(args, f"first audio: time to first token {_ms(stats.first_token_s)} (at the server, from its "
                          f"request), to first audio {_ms(stats.first_audio_s)} (here, from the hello)")

    from websockets.exceptions import WebSocketException

    try:
        asyncio.run(main())
    except (ServerError, OSError, WebSocketException) as exc:
        # Keep what was produced: the whole frames' audio (and their tail) came before an llm_error.
        if sink:
            sink[0].close()
            if args.output is not None:
                say(args, f"wrote   {args.output}: {stats.samples / stats.ready.sample_rate:.2f} s of audio before "
                          "the error")
        what = (f"{exc.code}: {exc.message}" if isinstance(exc, ServerError)
                else f"cannot stream from {args.server}: {exc}")
        raise CLIError(f"LLM session on {args.server}: {what}") from None
    except BaseException:
        if sink:
            sink[0].abort()
        raise
    if not sink:
        raise CLIError(f"LLM session on {args.server}: the completion held no audio tokens")
    sink[0].close()
    rate = stats.ready.sample_rate
    say(args, f"summary {stats.tokens} audio tokens -> {stats.samples} samples ({stats.samples / rate:.2f} s); time "
              f"to first token {_ms(stats.first_token_s)} (at the server), time to first audio "
              f"{_ms(stats.first_audio_s)} (here, from the hello); finished in {_ms(stats.finished_s)} "
              f"({stats.finish_reason or 'no finish reason'}); underruns {sink[0].underruns}")
    if args.output is not None:
        say(args, f"wrote   {args.output}")
    return 0


def _ms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


# ---- shared by both ------------------------------------------------------------------------------------
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


def _check_audio_output(path: Optional[Path]) -> None:
    if path is not None:
        audio_suffix(path)
        check_output(path)


def _server_token(args: argparse.Namespace) -> Optional[str]:
    if args.server is None:
        if args.token is not None:
            raise CLIError("--token goes with --server")
        return None
    if args.lookahead is not None:
        raise CLIError("--lookahead sets the in-process decoder; a server decodes exactly")
    from ..protocol import TOKEN_ENV
    return args.token or os.environ.get(TOKEN_ENV) or None


def _server_line(args: argparse.Namespace, ready) -> str:
    """What a demo says about the server it streams through (from its ``ready`` message)."""
    return (f"server  {args.server}: {ready.model} ({ready.sample_rate} Hz"
            f"{', RANDOM WEIGHTS' if ready.random_weights else ''}), {ready.server}")


def _make_sink(args: argparse.Namespace, rate: int, block: int,
               on_play: Optional[audio_io.PlayCallback]) -> "audio_io.DeviceSink | audio_io.FileSink":
    if args.output is not None:
        return audio_io.FileSink(args.output, rate, on_play=on_play)
    device = audio_io.find_device(args.output_device, "output")
    dev_rate = audio_io.device_rate(device, "output", rate, args.device_rate)
    return audio_io.DeviceSink(device, rate, dev_rate, block, prebuffer=round(args.buffer * rate / 1000),
                               on_play=on_play)


def _close_remote(transport: object) -> None:
    close = getattr(transport, "close", None)
    if close is not None:  # a remote session left open by an error (a no-op after flush)
        close()
