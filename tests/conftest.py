"""Shared pytest setup.

- Triton kernels run in Triton's CPU interpreter unless a CUDA GPU is present. The variable must be set before
  any ``@triton.jit`` function is defined, hence here, before any test module imports the kernels.
- Puts this directory on sys.path so tests can ``from helpers import ...`` (pytest runs with
  ``--import-mode=importlib``, which does not add test directories to sys.path itself).
- PyTorch's own GPU convs and matmuls run in full fp32 for the whole session: the torch references the
  tests compare against would otherwise use TF32 (cuDNN's default for convs).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


@pytest.fixture(autouse=True, scope="session")
def full_fp32_torch():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
