"""``serve`` (the websocket server and its browser page) and ``bench-latency`` (N real-time roundtrip or decode
clients against an in-process server on loopback), on one device or several (``--device cuda:0,cuda:1``,
``--all-gpus``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..loading import load_model, resolve_devices
from ..protocol import AUDIO_FORMATS
from .common import (CLIError, add_common_options, add_model_option, check_output, non_negative_float,
                     non_negative_int, positive_float, positive_int, say)


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``serve`` and ``bench-latency``."""
    p = subparsers.add_parser(
        "serve", help="websocket server: encode, decode and roundtrip sessions",
        description="Serve one model over websockets (protocol: docs/protocol.md). Binds to 127.0.0.1 unless "
                    "--host says otherwise; a non-loopback address needs --token (or $SNAC_STREAM_TOKEN).")
    _add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=non_negative_int, default=8765, help="TCP port (default: 8765; 0 picks one)")
    p.add_argument("--max-sessions", type=positive_int, default=8,
                   help="concurrent sessions per device (engine set); more are refused with server_full "
                        "(default: 8)")
    _add_frontends_option(p)
    p.add_argument("--max-frame-bytes", type=positive_int, default=1 << 20,
                   help="largest message accepted, in bytes (default: 1048576)")
    p.add_argument("--idle-timeout", type=positive_float, default=30.0,
                   help="seconds without a message before a session is closed (default: 30)")
    p.add_argument("--max-backlog", type=positive_float, default=2.0,
                   help="seconds of unprocessed input per session before the server stops reading it (default: 2)")
    p.add_argument("--max-output-bytes", type=positive_int, default=4 << 20,
                   help="queued output per session before a client that does not read is dropped (default: 4 MiB)")
    p.add_argument("--token", default=None,
                   help="auth token clients must present (hello.auth or 'Authorization: Bearer'); "
                        "default: $SNAC_STREAM_TOKEN")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="browser Origin allowed besides loopback pages (repeatable; '*' allows any)")
    p.add_argument("--behind-warning", type=non_negative_float, default=1.0, metavar="SECONDS",
                   help="warn an encode or roundtrip session (JSON 'warning', code 'behind') when its output "
                        "answers input received more than this long ago (default: 1; 0: never)")
    p.add_argument("--no-web", action="store_true",
                   help="do not serve the browser page (GET /) on the websocket port (GET /healthz, /readyz and "
                        "/metrics are answered either way)")
    p.add_argument("--drain-timeout", type=non_negative_float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or SIGINT: refuse new sessions (error 'draining') and let open ones finish for "
                        "up to this long, then end the rest (close code 1001) and exit 0; a second signal ends "
                        "them at once (default: 30)")
    p.add_argument("--allow-llm", action="append", default=[], metavar="URL",
                   help="let decode sessions name this LLM endpoint in their hello (hello.llm: the server streams "
                        "the completion and decodes it); repeatable. A URL allows its /v1/completions endpoint "
                        "exactly; a prefix ending in /* (http://llm.internal:8000/*) every one under it. Default: "
                        "none (llm sessions are refused, llm_not_allowed)")
    p.add_argument("--llm-api-key", default=None, metavar="KEY",
                   help="bearer key sent to the allowed LLMs when a hello gives none (default: "
                        "$SNAC_STREAM_LLM_API_KEY); never logged or sent to clients")
    p.add_argument("--server-id", default=None,
                   help="this instance's name in 'ready' (server_id), to tell servers behind a load balancer apart "
                        "(default: <hostname>:<port>)")
    add_common_options(p, several_devices=True)
    p.set_defaults(func=run_serve)

    p = subparsers.add_parser(
        "bench-latency", help="end-to-end latency of N real-time roundtrip or decode clients on loopback",
        description="Start a server in this process on 127.0.0.1, run N concurrent real-time paced clients (in "
                    "worker processes) and print p50/p95/p99 of the end-to-end latency per output sample split into "
                    "algorithmic delay, server time (queue + compute) and transport, plus errors, whether the "
                    "server keeps up, the server's tick times, the server process's CPU time (and the front ends', "
                    "--frontends) and its memory over time, and the client worker processes' CPU time (one near "
                    "1 s per s of wall is saturated: the load generator would be the limit). --kind roundtrip "
                    "(default) clients stream audio through the codec and back; --kind decode clients are an "
                    "LLM-driven TTS: they send random SNAC tokens (in the server's default layout) at real-time "
                    "rate, each message when the audio it describes would have been generated, and receive the "
                    "audio. The clients may speak any client format and rate (--sample-format, --sample-rate; "
                    "decode clients: their output).")
    _add_model_options(p)
    p.add_argument("--kind", default="roundtrip", choices=["roundtrip", "decode"],
                   help="the clients' sessions: roundtrip (audio in, audio out: a live call) or decode (SNAC tokens "
                        "in at real-time rate, audio out: an LLM-driven TTS); the algorithmic latency reported is "
                        "that kind's, as ready announces it (default: roundtrip)")
    p.add_argument("--clients", type=positive_int, default=4, help="concurrent clients (default: 4)")
    p.add_argument("--duration", type=positive_float, default=10.0,
                   help="seconds of audio per client (decode: rounded up to whole decoder steps) (default: 10)")
    p.add_argument("--chunk-ms", type=positive_float, default=None,
                   help="milliseconds of audio per client message: roundtrip, of audio sent (default: 20); decode, "
                        "of audio the message's tokens describe, rounded up to whole coarse frames (default: one "
                        "coarse frame's tokens, frame_samples of audio)")
    p.add_argument("--sample-format", default="pcm16", choices=list(AUDIO_FORMATS),
                   help="what the clients send and receive (decode clients: receive), as a hello's sample_format "
                        "(docs/protocol.md, 'Formats and sample rates'): anything but PCM at the model's rate is "
                        "converted by the server; opus/webm roundtrip clients send one Opus frame (--chunk-ms: 10, "
                        "20, 40 or 60) a message; clients decode what comes back as it arrives (default: pcm16)")
    p.add_argument("--sample-rate", type=positive_int, default=None, metavar="HZ",
                   help="the clients' sample rate, 8000-48000 (default: the format's, as in a hello: the model's "
                        "for pcm16/float32, 8000 for mulaw/alaw, 48000, the only one, for opus/webm)")
    p.add_argument("--client-processes", type=non_negative_int, default=None, metavar="N",
                   help="worker processes running the clients, as remote callers would (default: half the cores "
                        "less one, at least 1; 0 runs them in the server's process)")
    _add_frontends_option(p)
    p.add_argument("--scrape-hz", type=non_negative_float, default=0.0, metavar="HZ",
                   help="GET /metrics this many times a second during the run, as Prometheus would, to see what "
                        "scraping costs the engine step (default: 0, no scrapes)")
    p.add_argument("--json", type=Path, default=None, help="write the full report (figures, machine) as JSON")
    add_common_options(p, several_devices=True)
    p.set_defaults(func=run_bench_latency)


def _add_frontends_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frontends", type=non_negative_int, default=0, metavar="N",
                   help="serve the websockets from N front-end processes on the same port (SO_REUSEPORT), the "
                        "engines staying in this one: for more sessions than one event loop carries (README, "
                        "'Sessions per server'). Same protocol, endpoints and limits (default: 0, all in this "
                        "process)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    add_model_option(p)
    p.add_argument("--random-weights", action="store_true",
                   help="build the --model preset with random weights instead of loading a checkpoint "
                        "(benchmarking only: the audio is noise; reported as such to clients)")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "triton"],
                   help="compute path (default: the model's, auto = Triton on CUDA, PyTorch elsewhere)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads of the engine worker (default: 1 with every engine on a GPU, else "
                        "torch's count less one core for the event loop, at least 1)")


def run_serve(args: argparse.Namespace) -> int:
    """Serve the model until interrupted."""
    import asyncio
    import logging
    import signal
    from typing import Optional, Union

    from ..server import ServerOptions, SNACServer, web
    from ..server.frontends import MultiProcessServer
    from ..server.options import LLM_KEY_ENV
    from ..protocol import TOKEN_ENV

    options = ServerOptions(host=args.host, port=args.port, max_sessions=args.max_sessions,
                            max_frame_bytes=args.max_frame_bytes, idle_timeout_s=args.idle_timeout,
                            max_backlog_s=args.max_backlog, max_output_bytes=args.max_output_bytes,
                            token=args.token or os.environ.get(TOKEN_ENV) or None,
                            allowed_origins=args.allow_origin, backend=args.backend, threads=args.threads,
                            web=not args.no_web, behind_warning_s=args.behind_warning, server_id=args.server_id,
                            allow_llm=args.allow_llm,
                            llm_api_key=args.llm_api_key or os.environ.get(LLM_KEY_ENV) or None)
    try:
        options.check()
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    devices = resolve_devices(args.device, args.all_gpus)
    model = load_model(args.model, devices[0], random_weights=args.random_weights).eval()
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        server: Optional[Union[SNACServer, MultiProcessServer]] = None

        def on_signal(name: str) -> None:
            if not stop.is_set():
                say(args, f"{name}: draining (no new sessions; open ones have up to {args.drain_timeout:g} s)")
                stop.set()
            elif server is not None:
                say(args, f"{name} again: ending the open sessions now")
                server.hurry()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
        common = dict(model_name=model.name, random_weights=args.random_weights, devices=devices)
        server = (MultiProcessServer(model, options, frontends=args.frontends, **common,
                                     log_level=logging.WARNING if args.quiet else logging.INFO)
                  if args.frontends else SNACServer(model, options, **common))
        async with server:
            cfg = model.config
            slots = (f"{server.workers.slots} sessions ({options.max_sessions} per device)" if len(devices) > 1
                     else f"{options.max_sessions} sessions")
            say(args, f"serving {model.name}{' (RANDOM WEIGHTS)' if args.random_weights else ''} on "
                      f"{','.join(server.devices)} at {server.url}: {cfg.sampling_rate} Hz, step "
                      f"{server.step_samples} samples, algorithmic latency (samples) {server.latency}; up to "
                      f"{slots}{', token required' if options.token else ''}"
                      + (f"; websockets served by {args.frontends} front-end processes" if args.frontends else ""))
            if options.allow_llm:
                say(args, f"llm sessions allowed to: {', '.join(options.allow_llm)}")
            if options.web:
                say(args, f"browser client (mic -> codec -> speaker): {web.page_url(server)}")
            serving = asyncio.ensure_future(server.serve_forever())
            await stop.wait()
            summary = await server.drain(args.drain_timeout)
            serving.cancel()
            say(args, f"drained in {summary['seconds']:g} s: {summary['sessions_open_at_start']} sessions open at "
                      f"the signal, {summary['sessions_ended_at_timeout']} ended at the timeout (going away)")

    try:
        asyncio.run(main())
    except OSError as exc:
        raise CLIError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return 0


def run_bench_latency(args: argparse.Namespace) -> int:
    """Run the loopback latency benchmark; exit status 1 if any client saw an error."""
    import asyncio
    import json

    from ..server.loadtest import client_format, run_latency_bench

    if args.json is not None:
        check_output(args.json)
    devices = resolve_devices(args.device, args.all_gpus)
    model = load_model(args.model, devices[0], random_weights=args.random_weights).eval()
    try:
        client_format(args.sample_format, args.sample_rate, args.chunk_ms, model.config.sampling_rate,
                      kind=args.kind, frame_samples=model.config.frame_samples)
    except ValueError as exc:
        given = (f" --sample-rate {args.sample_rate}" if args.sample_rate is not None else "") + (
            f" --chunk-ms {args.chunk_ms:g}" if args.chunk_ms is not None else "")
        raise CLIError(f"--sample-format {args.sample_format}{given}: {exc}") from None
    report = asyncio.run(run_latency_bench(
        model, devices=devices, clients=args.clients, duration_s=args.duration, chunk_ms=args.chunk_ms,
        kind=args.kind, sample_format=args.sample_format, sample_rate=args.sample_rate, model_name=model.name,
        random_weights=args.random_weights,
        backend=args.backend, threads=args.threads, client_processes=args.client_processes,
        scrape_hz=args.scrape_hz, frontends=args.frontends, say=lambda line: say(args, line)))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        say(args, f"wrote   {args.json}")
    return 0 if report["errors"] == 0 else 1
