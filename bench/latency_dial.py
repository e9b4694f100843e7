"""The decoder latency dial: error of early emission against exact streaming decoding, in dB SNR.

``model.streaming_decoder(lookahead_samples=N)`` emits audio only ``N`` samples behind the received code
frames; the samples it emits before their codes' whole receptive field has arrived are computed as if the
stream ended there. This script decodes the same codes exactly and at each look-ahead, pushing one coarse
frame at a time, and reports SNR = 10 log10(sum(exact^2) / sum((early - exact)^2)) over the whole clip.

Weights: ``--model DIR`` (a checkpoint directory; real weights give the meaningful figures) or, by default,
random weights with the preset's structure, which only show how the error shrinks as the look-ahead grows.
The input is speech from espeak-ng when it is installed, else a synthetic chirp; say which in the report.

    python bench/latency_dial.py [--preset 24khz | --model DIR] [--seconds 4]
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming_cost import commit, describe_machine  # noqa: E402

from snac_stream import SNAC  # noqa: E402
from snac_stream.audio import load_audio  # noqa: E402


def speech_or_chirp(rate: int, seconds: float) -> tuple[torch.Tensor, str]:
    espeak = shutil.which("espeak-ng")
    if espeak:
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "speech.wav"
            text = "The quick brown fox jumps over the lazy dog, while streaming audio flows frame by frame."
            subprocess.run([espeak, "-w", str(wav), text], check=True, capture_output=True)
            samples, _ = load_audio(wav, rate)
        audio, source = torch.from_numpy(samples), "espeak-ng speech"
    else:
        t = torch.arange(int(seconds * rate)) / rate
        audio, source = 0.3 * torch.sin(2 * math.pi * (100 + 400 * t) * t), "synthetic chirp"
    return audio[: int(seconds * rate)].reshape(1, 1, -1), source


def decode_frames(model: SNAC, codes, lookahead) -> torch.Tensor:
    dec = model.streaming_decoder(lookahead_samples=lookahead)
    frames = codes[0].shape[-1]
    parts = [dec.push([c[:, j * c.shape[1] // frames : (j + 1) * c.shape[1] // frames] for c in codes])
             for j in range(frames)]
    return torch.cat(parts + [dec.flush()], dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="24khz")
    parser.add_argument("--model", help="checkpoint directory (default: random weights with --preset's structure)")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = (SNAC.from_pretrained(args.model) if args.model else SNAC.from_config(args.preset)).eval()
    weights = args.model or f"random weights, {args.preset} structure"
    cfg = model.config
    audio, source = speech_or_chirp(cfg.sampling_rate, args.seconds)
    with torch.inference_mode():
        codes = model.encode(audio)
        exact = model.decode(codes)
        full = model.streaming_decoder().latency_samples
        steps = sorted({0, 256, 512, 1024, 2048, 3072, full // 2, full - 512, full - 128, full})
        print(f"# latency dial, {cfg.sampling_rate} Hz, {weights}, {source}, "
              f"{exact.shape[-1] / cfg.sampling_rate:.2f} s; commit {commit()}, {describe_machine(torch.device('cpu'))}")
        print("| look-ahead (samples) | look-ahead (ms) | latency saved (ms) | SNR vs exact (dB) |")
        print("|---|---|---|---|")
        for lookahead in steps:
            if lookahead < 0 or lookahead > full:
                continue
            early = decode_frames(model, codes, lookahead)
            err = (early - exact).pow(2).sum().item()
            snr = math.inf if err == 0 else 10 * math.log10(exact.pow(2).sum().item() / err)
            print(f"| {lookahead} | {1e3 * lookahead / cfg.sampling_rate:.1f} "
                  f"| {1e3 * (full - lookahead) / cfg.sampling_rate:.1f} | {snr:.1f} |", flush=True)


if __name__ == "__main__":
    main()
