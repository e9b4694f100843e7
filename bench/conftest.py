"""Kernel benchmarks: Triton's CPU interpreter unless a CUDA GPU is present (set before any kernel is defined)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_report_header(config) -> str:
    if torch.cuda.is_available():
        return f"kernel benchmarks on {torch.cuda.get_device_name()} (full sizes)"
    return ("kernel benchmarks on the CPU under TRITON_INTERPRET=1, at tiny sizes: a smoke run of the kernels, "
            "not a measurement of them (run on a CUDA GPU for the real figures)")
