"""``python -m snac_stream.cli``: the ``snac-stream`` command."""

import sys

from . import main

sys.exit(main())
