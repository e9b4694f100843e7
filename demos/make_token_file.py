"""Make an Orpheus-style token file by encoding speech: what an LLM would emit for that audio.

    python demos/make_token_file.py OUT.txt --say "Hello from the codec." [--model DIR|HUB_ID|PRESET]
    python demos/make_token_file.py OUT.txt --audio speech.wav [--ids]

``--say`` synthesises the sentence with espeak-ng (``apt-get install -y espeak-ng``); ``--audio`` takes any
wav/flac/ogg file. The file holds one coarse frame per line: 7 ``<custom_token_N>`` tokens in the Orpheus
order (``--ids``: the integer ids ``code + position * 4096`` instead). Play it back with
``python demos/play_tokens.py OUT.txt --model mini``, or feed it slowly to see streaming:
``while read -r line; do echo "$line"; sleep 0.05; done < OUT.txt | python demos/play_tokens.py - --model mini``.

The model defaults to ``mini``, the small speech model bundled with the package (no download). Its tokens are
its own: only ``mini`` decodes them, and Orpheus TTS neither emits nor reads them. For tokens in the official
code space, what Orpheus emits, pass ``--model hubertsiuzdak/snac_24khz`` here and play them back without
``--model``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from snac_stream.audio import load_audio, to_tensor
from snac_stream.loading import ModelLoadError, load_model, resolve_device

DEFAULT_MODEL = "mini"  # bundled: runs offline; the official weights are one --model away
from snac_stream.tokens import OrpheusLayout, format_custom_tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="token file to write")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--say", metavar="TEXT", help="speak TEXT with espeak-ng and encode it")
    source.add_argument("--audio", type=Path, metavar="FILE", help="encode this audio file")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"24 kHz model (default: {DEFAULT_MODEL})")
    parser.add_argument("--ids", action="store_true", help="write integer ids instead of <custom_token_N>")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model, resolve_device(args.device))
        layout = OrpheusLayout(model.config)
        with tempfile.TemporaryDirectory() as tmp:
            path = args.audio
            if args.say is not None:
                espeak = shutil.which("espeak-ng")
                if espeak is None:
                    raise FileNotFoundError("--say needs espeak-ng (apt-get install -y espeak-ng); "
                                            "or pass --audio FILE")
                path = Path(tmp) / "say.wav"
                subprocess.run([espeak, "-w", str(path), args.say], check=True, capture_output=True)
            audio, _ = load_audio(path, model.sampling_rate)
        with torch.inference_mode():
            ids = layout.to_flat(model.encode(to_tensor(audio).to(model.device)))[0].tolist()
        text = ("\n".join(" ".join(map(str, ids[k : k + 7])) for k in range(0, len(ids), 7)) + "\n" if args.ids
                else format_custom_tokens(ids))
        args.output.write_text(text)
    except (ModelLoadError, OSError, ValueError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {len(ids)} tokens ({len(ids) // 7} coarse frames, "
          f"{len(ids) // 7 * model.config.frame_samples / model.sampling_rate:.2f} s) from {args.say or args.audio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
