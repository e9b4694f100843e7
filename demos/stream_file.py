"""Stream an audio file through the codec chunk by chunk, as a live source would arrive.

    python demos/stream_file.py IN.wav OUT.wav [--model DIR|HUB_ID|PRESET] [--chunk 480] [--lookahead N]

Audio is pushed into the streaming encoder ``--chunk`` samples at a time; every code frame it emits goes
straight into the streaming decoder, whose audio is written out as it comes. At the end the script checks
the streamed codes against offline ``encode`` and prints when the first codes and the first audio came out
(in samples of input, i.e. the algorithmic delay), the token rate and the real-time factor.

The model defaults to ``mini``, the small speech model bundled with the package (no download); the official
weights are ``--model 24khz`` (or ``32khz``, ``44khz``), fetched from the hub.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from snac_stream.audio import load_audio, save_audio
from snac_stream.loading import ModelLoadError, load_model, resolve_device

DEFAULT_MODEL = "mini"  # bundled: runs offline; the official weights are one --model away


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory, hub id or preset (default: {DEFAULT_MODEL})")
    parser.add_argument("--chunk", type=int, default=480, help="samples per push (default 480: 20 ms at 24 kHz)")
    parser.add_argument("--lookahead", type=int, default=None,
                        help="decoder latency dial in samples (default: exact decoding)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.chunk < 1:
        parser.error("--chunk must be >= 1")
    try:
        model = load_model(args.model, resolve_device(args.device))
        samples, _ = load_audio(args.input, model.sampling_rate)
    except (ModelLoadError, OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    audio = torch.from_numpy(samples).to(model.device).view(1, 1, -1)
    enc = model.streaming_encoder()
    dec = model.streaming_decoder(lookahead_samples=args.lookahead)
    levels = model.n_codebooks
    codes_out, audio_out = [], []
    first_codes = first_audio = None
    start = time.perf_counter()
    with torch.inference_mode():
        for pos in range(0, audio.shape[-1] + args.chunk, args.chunk):
            chunk = audio[..., pos : pos + args.chunk]
            codes = enc.push(chunk) if chunk.shape[-1] else enc.flush()
            if codes[0].shape[-1]:
                first_codes = first_codes if first_codes is not None else min(pos + args.chunk, audio.shape[-1])
                codes_out.append(codes)
                out = dec.push(codes)
                if out.shape[-1]:
                    first_audio = first_audio if first_audio is not None else min(pos + args.chunk, audio.shape[-1])
                    audio_out.append(out)
            if not chunk.shape[-1]:
                break
        audio_out.append(dec.flush())
        elapsed = time.perf_counter() - start
        streamed = [torch.cat([c[i] for c in codes_out], -1) for i in range(levels)]
        exact = all(torch.equal(a, b) for a, b in zip(streamed, model.encode(audio)))
    decoded = torch.cat(audio_out, -1)[..., : audio.shape[-1]]
    save_audio(args.output, decoded[0, 0].cpu().numpy(), model.sampling_rate)
    seconds = audio.shape[-1] / model.sampling_rate
    rate = model.sampling_rate / 1000
    print(f"streamed {seconds:.2f} s in {args.chunk}-sample chunks: {sum(c.shape[-1] for c in streamed)} tokens "
          f"({model.config.bitrate_bps / 1000:.2f} kbps), real-time factor {elapsed / seconds:.3f}")
    print(f"first codes after {first_codes} input samples ({first_codes / rate:.1f} ms; encoder latency "
          f"{enc.latency_samples} samples), first audio after {first_audio} ({first_audio / rate:.1f} ms)")
    print(f"streamed codes {'equal' if exact else 'DIFFER FROM'} offline encode; wrote {args.output}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
