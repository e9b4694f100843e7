"""Play an LLM's Orpheus-style token stream as it arrives.

    your_llm ... | python demos/play_tokens.py - [--model DIR|HUB_ID|PRESET] [--output FILE]
    python demos/play_tokens.py speech_tokens.txt --model mini [--output-device NAME|INDEX]

The same as ``snac-stream play-tokens`` (see its ``--help``). Tokens are ``<custom_token_N>`` text or integer
ids, read chunk by chunk as they arrive; each coarse frame (7 tokens at 24 kHz) is decoded as soon as its last
token is in. Reports the time from the first token to the first audio, and underruns (the stream arriving
slower than real time). ``demos/make_token_file.py`` makes a token file from speech, with the bundled ``mini``
model by default: play it with ``--model mini``. An Orpheus LLM's tokens are in the official code space: play
them with the default model (the official 24 kHz weights, from the hub).
"""

from __future__ import annotations

import sys

from snac_stream.cli import main

if __name__ == "__main__":
    sys.exit(main(["play-tokens", *sys.argv[1:]]))
