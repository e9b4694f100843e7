"""Shared pytest setup: put this directory on sys.path so tests can ``from helpers import ...``.

pytest runs with ``--import-mode=importlib``, which does not add test directories to sys.path itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)
