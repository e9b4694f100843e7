"""Shared pytest setup.

- Triton kernels run in Triton's CPU interpreter unless a CUDA GPU is present. The variable must be set before
  any ``@triton.jit`` function is defined, hence here, before any test module imports the kernels.
- Puts this directory on sys.path so tests can ``from helpers import ...`` (pytest runs with
  ``--import-mode=importlib``, which does not add test directories to sys.path itself).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)
