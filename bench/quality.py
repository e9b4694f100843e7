"""Codec quality on held-out speech: STOI, multi-scale mel distance and SI-SDR of what comes back.

    python bench/quality.py                          # the bundled mini model and its untrained twin, on the CPU
    python bench/quality.py --model DIR --device cuda   # any checkpoint (e.g. a proxy trained by snac-stream train)

Input: held-out espeak-ng sentences (``snac_stream.training.espeak.EVAL_SENTENCES``, which no training text
holds), several voices, synthesised here. Rows:

- ``offline``: ``model.encode`` then ``model.decode``;
- ``streaming``: the streaming encoder and decoder, one coarse frame per push (must equal offline: the row
  also gives the largest sample difference);
- ``dial N``: the exact codes decoded with the latency dial at look-ahead N samples (earlier, approximate);
- ``precision P`` (Triton backend only: on a GPU, or ``--triton`` under the CPU interpreter): the model's
  precision for the dense convs and the codebook search;
- ``format``: the session formats of a voice agent, both ways around the codec: the client's audio in that
  format and rate into ``snac_stream.formats.InputDecoder``, the codec, ``OutputEncoder`` back to the format,
  decoded by the client; scored at the client's rate against the client's original.

Outputs are aligned to their reference by cross-correlation (formats and resamplers add delay) before
scoring. STOI is in [0, 1] (higher is better), mel distance is the training loss's multi-scale log-mel L1
(lower is better), SI-SDR in dB (waveform fidelity; mel-trained codecs do not keep phase, so it stays low).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import soxr
import torch
from pystoi import stoi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming_cost import commit  # noqa: E402

from snac_stream import SNAC  # noqa: E402
from snac_stream import formats as fmt  # noqa: E402
from snac_stream.audio import load_audio  # noqa: E402
from snac_stream.kernels.precision import PRECISIONS  # noqa: E402
from snac_stream.training import espeak  # noqa: E402
from snac_stream.training.losses import MultiScaleMelLoss  # noqa: E402

DIAL = (0, 512, 1024, 2048)
FORMATS = (("pcm16", 24000), ("mulaw", 8000), ("alaw", 8000), ("pcm16", 16000), ("opus", 48000))
FORMAT_NAMES = tuple(dict.fromkeys(name for name, _ in FORMATS))


def si_sdr(ref: np.ndarray, est: np.ndarray) -> float:
    """Scale-invariant signal-to-distortion ratio in dB."""
    ref, est = ref.astype(np.float64) - ref.mean(), est.astype(np.float64) - est.mean()
    target = ref * (est @ ref) / max(ref @ ref, 1e-12)
    return float(10 * np.log10(max(target @ target, 1e-12) / max((est - target) @ (est - target), 1e-12)))


def delay(ref: np.ndarray, est: np.ndarray, max_lag: int) -> int:
    """The lag in [0, max_lag] samples by which ``est`` best matches ``ref`` (cross-correlation)."""
    n = ref.shape[0] + max_lag
    spectrum = np.fft.rfft(est[:n], 2 * n) * np.conj(np.fft.rfft(ref, 2 * n))
    return int(np.argmax(np.fft.irfft(spectrum)[: max_lag + 1]))


class Scorer:
    def __init__(self, rate: int):
        self.mel = MultiScaleMelLoss(rate)
        self.rate = rate

    def __call__(self, refs: List[np.ndarray], outs: List[np.ndarray], rate: Optional[int] = None,
                 lags: Optional[List[int]] = None) -> Dict[str, float]:
        rate = rate or self.rate
        scores = {"stoi": [], "mel": [], "si_sdr": []}
        for i, (ref, out) in enumerate(zip(refs, outs)):
            out = out[lags[i] if lags else 0:][: ref.shape[0]]
            out = np.pad(out, (0, ref.shape[0] - out.shape[0]))
            scores["stoi"].append(stoi(ref, out, rate, extended=False))
            scores["si_sdr"].append(si_sdr(ref, out))
            at_model = [x if rate == self.rate else soxr.resample(x, rate, self.rate) for x in (ref, out)]
            scores["mel"].append(float(self.mel(torch.from_numpy(at_model[1]).view(1, 1, -1),
                                                torch.from_numpy(at_model[0]).view(1, 1, -1))))
        return {k: float(np.mean(v)) for k, v in scores.items()}


def offline(model: SNAC, clip: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(clip).to(model.device).view(1, 1, -1)
    return model.decode(model.encode(x))[0, 0].float().cpu().numpy()


def streaming(model: SNAC, clip: np.ndarray, lookahead: Optional[int] = None, exact_codes: bool = False
              ) -> np.ndarray:
    x = torch.from_numpy(clip).to(model.device).view(1, 1, -1)
    frame = model.config.frame_samples
    if exact_codes:
        codes = model.encode(x)
    else:
        enc = model.streaming_encoder()
        pieces = [enc.push(x[..., i: i + frame]) for i in range(0, x.shape[-1], frame)] + [enc.flush()]
        codes = [torch.cat(level, dim=-1) for level in zip(*pieces)]
    dec = model.streaming_decoder(lookahead_samples=lookahead)
    ratios = [c.shape[-1] // codes[0].shape[-1] for c in codes]
    out = [dec.push([c[:, k * r: (k + 1) * r] for c, r in zip(codes, ratios)]) for k in range(codes[0].shape[-1])]
    return torch.cat(out + [dec.flush()], dim=-1)[0, 0].float().cpu().numpy()


def through_format(model: Optional[SNAC], clip_client: np.ndarray, name: str, rate: int, model_rate: int
                   ) -> np.ndarray:
    """The client's audio (float at ``rate``) sent in ``name``, coded by ``model`` (``None``: passed through,
    to measure the format's own delay), and received back in ``name``."""
    uplink = fmt.OutputEncoder(name, rate, model_rate=rate)  # the client encodes its own audio
    sent = uplink.push(clip_client) + uplink.flush()
    server_in = fmt.InputDecoder(name, rate, model_rate=model_rate)
    audio = np.concatenate([server_in.push(sent), server_in.flush()])
    decoded = audio.astype(np.float32) if model is None else offline(model, audio.astype(np.float32))
    server_out = fmt.OutputEncoder(name, rate, model_rate=model_rate)
    back = server_out.push(decoded) + server_out.flush()
    client_in = fmt.InputDecoder(name, rate, model_rate=rate)
    return np.concatenate([client_in.push(back), client_in.flush()])


def evaluate(model: SNAC, clips: List[np.ndarray], triton: bool, formats: Sequence[str] = FORMAT_NAMES
             ) -> List[Dict[str, object]]:
    rate = model.sampling_rate
    score = Scorer(rate)
    rows: List[Dict[str, object]] = []

    def row(name: str, run: Callable[[np.ndarray], np.ndarray], **extra) -> List[np.ndarray]:
        with torch.inference_mode():
            outs = [run(c) for c in clips]
        rows.append({"condition": name, **score(clips, outs), **extra})
        return outs

    base = row("offline", lambda c: offline(model, c))
    streamed = [streaming(model, c) for c in clips]
    diff = max(float(np.abs(a[: b.shape[0]] - b[: a.shape[0]]).max()) for a, b in zip(base, streamed))
    rows.append({"condition": "streaming", **score(clips, streamed), "max_abs_diff_vs_offline": diff})
    for lookahead in DIAL:
        row(f"dial {lookahead}", lambda c: streaming(model, c, lookahead, exact_codes=True))
    if triton:
        saved = model.precision
        for precision in PRECISIONS:
            model.precision = precision
            row(f"precision {precision}", lambda c: offline(model, c))
        model.precision = saved
    for name, client_rate in FORMATS:
        if name not in formats:
            continue
        refs = [c if client_rate == rate else soxr.resample(c, rate, client_rate) for c in clips]
        with torch.inference_mode():
            outs = [through_format(model, r.astype(np.float32), name, client_rate, rate) for r in refs]
        # The format's own delay, measured on the waveform it keeps (the codec does not keep phase).
        lags = [delay(r, through_format(None, r.astype(np.float32), name, client_rate, rate), client_rate // 10)
                for r in refs]
        rows.append({"condition": f"format {name} @ {client_rate} Hz", **score(refs, outs, client_rate, lags),
                     "format_delay_samples": max(lags)})
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None,
                        help="checkpoint directory, preset or 'mini' (repeatable; default: mini)")
    parser.add_argument("--untrained", action="store_true", default=None,
                        help="also score each model's structure with random weights (default with mini)")
    parser.add_argument("--clips", type=int, default=8, help="held-out sentences (default 8)")
    parser.add_argument("--clips-dir", type=Path, default=None,
                        help="read the held-out clips (24 kHz audio files) from here instead of running espeak-ng")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--triton", action="store_true", help="run the Triton backend (default on CUDA)")
    parser.add_argument("--formats", default=",".join(FORMAT_NAMES),
                        help=f"comma-separated session formats to score (default: all of {','.join(FORMAT_NAMES)}; "
                             "opus needs PyAV; 'none' scores none)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    formats = [] if args.formats == "none" else [f for f in args.formats.split(",") if f]
    unknown = sorted(set(formats) - set(FORMAT_NAMES))
    if unknown:
        parser.error(f"--formats: unknown {', '.join(unknown)} (choose from {', '.join(FORMAT_NAMES)})")
    models = args.model or ["mini"]
    untrained = args.untrained if args.untrained is not None else models == ["mini"]
    backend = "triton" if args.triton or args.device.startswith("cuda") else "torch"

    if args.clips_dir is not None:
        paths = sorted(p for p in args.clips_dir.iterdir() if p.suffix in (".wav", ".flac"))[: args.clips]
        clips24 = [load_audio(p, 24000)[0] for p in paths]
    else:
        with tempfile.TemporaryDirectory() as work:
            _, paths = espeak.generate(work, 24000, 0, args.clips, seed=0)
            clips24 = [load_audio(p, 24000)[0] for p in paths]

    results = []
    for name in models:
        model = SNAC.from_pretrained(name, backend=backend).to(args.device).eval()
        variants = [(name, model)]
        if untrained:
            torch.manual_seed(0)
            variants.append((f"{name} untrained", SNAC.from_config(model.config, backend=backend).to(args.device).eval()))
        for label, m in variants:
            clips = clips24 if m.sampling_rate == 24000 else [soxr.resample(c, 24000, m.sampling_rate) for c in clips24]
            for r in evaluate(m, clips, triton=backend == "triton", formats=formats):
                results.append({"model": label, **r})

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(), "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda")
            else platform.processor() or platform.machine(), "backend": backend, "torch": torch.__version__,
            "clips": len(clips24), "seconds": round(sum(c.shape[0] for c in clips24) / 24000, 1)}
    print(f"# {meta['date']}, commit {meta['commit']}, {meta['device']}, backend {backend}, "
          f"{meta['clips']} held-out espeak-ng sentences ({meta['seconds']} s)")
    print("| model | condition | STOI | mel distance | SI-SDR (dB) | note |")
    print("|---|---|---|---|---|---|")
    for r in results:
        note = (f"max diff vs offline {r['max_abs_diff_vs_offline']:.1e}" if "max_abs_diff_vs_offline" in r
                else f"format delay {r['format_delay_samples']} samples" if "format_delay_samples" in r else "")
        print(f"| {r['model']} | {r['condition']} | {r['stoi']:.3f} | {r['mel']:.3f} | {r['si_sdr']:.1f} | {note} |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
