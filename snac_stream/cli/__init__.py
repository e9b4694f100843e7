"""The ``snac-stream`` command line.

    snac-stream encode IN.wav OUT.npz [--model M] [--device D] [--quiet]
    snac-stream decode IN.npz OUT.wav [--model M] [--device D] [--noise-seed N] [--float] [--quiet]
    snac-stream live [--input-device D | --input FILE] [--output-device D | --output FILE] [--model M]
                     [--block N] [--lookahead N] [--seconds S] [--as-fast-as-possible] [--list-devices]
                     [--server ws://HOST:PORT [--token T]]
    snac-stream play-tokens [TOKENS|-|ws://URL] [--output-device D | --output FILE] [--model M] [--layout L]
                            [--server ws://HOST:PORT [--token T]]
    snac-stream play-tokens --llm URL --llm-model NAME --prompt TEXT [--voice V] [--prompt-format F]
                            [--temperature T] [--top-p P] [--max-tokens N] [--output-device D | --output FILE]
    snac-stream serve [--model M] [--random-weights] [--host 127.0.0.1] [--port 8765] [--device D]
                      [--max-sessions N] [--token T] [--allow-origin O] [--threads N] [--no-web] ...
    snac-stream bench-latency [--model M] [--random-weights] [--clients N] [--duration S] [--threads N]
                              [--sample-format F] [--sample-rate HZ] [--device D] [--json P]
    snac-stream train --out DIR (--data DIR | --espeak) [--config NAME|PATH] [--init DIR|PRESET] [--steps N] ...
    snac-stream random-checkpoint DIR [--preset 24khz|32khz|44khz|mini] [--seed N] [--force]

One module per stage, each registering its subcommands with ``add_parsers(subparsers)`` and one ``run_*``
handler per subcommand: :mod:`.codec` (``encode``, ``decode``), :mod:`.live` (``live``, ``play-tokens``, the
live demos ``demos/live_codec.py`` and ``demos/play_tokens.py``) and :mod:`.serve` (``serve``, which runs the
websocket server of docs/protocol.md and serves the browser client page on the same port, and
``bench-latency``, which prints end-to-end latency percentiles of N real-time roundtrip clients against an
in-process server on loopback), :mod:`.train` (``train``: training and fine-tuning) and :mod:`.tools`
(``random-checkpoint``: a random-weight checkpoint directory for trying the commands). :mod:`.common` holds the error type, argument types and options they share;
a new stage adds a module and an entry in :data:`STAGES`.

``--model`` takes a hub id (``hubertsiuzdak/snac_24khz``), a preset name (``24khz``) or a local checkpoint
directory (:mod:`snac_stream.loading`).

Expected failures (missing files, bad checkpoints, offline hub, corrupt codes or token streams, model mismatch,
unusable torch or sound device, unsupported sample rate, a ``--server`` that is unreachable or refuses the
session) print a single ``error: ...`` line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .. import __version__, audio_io
from ..loading import ModelLoadError
from . import codec, live, serve, tools, train
from .common import CLIError

__all__ = ["CLIError", "build_parser", "main"]

EXIT_ERROR = 2

#: The stage modules, in the order their subcommands are listed.
STAGES = (codec, live, serve, train, tools)


def build_parser() -> argparse.ArgumentParser:
    """The ``snac-stream`` parser with every stage's subcommands."""
    parser = argparse.ArgumentParser(
        prog="snac-stream", description="SNAC neural audio codec: encode audio to codes and decode them back, "
                                        "or serve streams over websockets.")
    parser.add_argument("--version", action="version", version=f"snac-stream {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for stage in STAGES:
        stage.add_parsers(subparsers)
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
    except (CLIError, ModelLoadError, FileNotFoundError, ValueError, OSError, audio_io.AudioIOError) as exc:
        # Messages may carry a hint on a second line; keep the report to one line.
        message = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
