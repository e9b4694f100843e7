"""Live mic-to-speaker codec: microphone -> streaming encoder -> codes -> streaming decoder -> speaker.

    python demos/live_codec.py --model mini [--input-device NAME|INDEX] [--output-device NAME|INDEX]
                               [--list-devices] [--block 480] [--lookahead N] [--seconds S]
                               [--input FILE] [--output FILE] [--realtime] [--save-input FILE]

The same as ``snac-stream live`` (see ``snac-stream live --help``). A status line on stderr shows the measured
latency (a sample's capture time to its playback time, from the sound devices' timestamps), the bitrate,
the token rate, and the input blocks dropped and output underruns. Use headphones: a speaker feeding the
microphone makes the codec echo itself.

``--model mini`` is the small speech model bundled with the package (no download); without ``--model`` the
official 24 kHz weights are fetched from the hub (or pass a checkpoint directory, hub id or preset).
"""

from __future__ import annotations

import sys

from snac_stream.cli import main

if __name__ == "__main__":
    sys.exit(main(["live", *sys.argv[1:]]))
