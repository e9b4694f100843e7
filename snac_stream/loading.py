"""Models and devices by name, as a user writes them on a command line.

:func:`load_model` takes a hub id (``hubertsiuzdak/snac_24khz``), a preset name (``24khz``) or a local
checkpoint directory, or builds a preset with random weights; :func:`resolve_device` turns ``auto``, ``cpu``,
``cuda``, ``cuda:N`` (any torch device string) into a device checked to be usable here, and
:func:`resolve_devices` a comma list of them (or every visible GPU), for the server's engine sets. They are
shared by the ``snac-stream`` command line, its server commands and the demos.

A name or device that cannot be used raises :class:`ModelLoadError`; its message names the ``--model`` and
``--device`` options those callers take. Failures inside a checkpoint (missing config or weights, an offline
hub) are the model's own :class:`snac_stream.CheckpointError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch

from .config import HUB_IDS, PRESETS
from .streaming import SNAC
from .model.checkpoint import looks_like_path

__all__ = ["DEFAULT_MODEL", "ModelLoadError", "load_model", "resolve_device", "resolve_devices"]

#: The model used when none is named: the 24 kHz speech model.
DEFAULT_MODEL = HUB_IDS["24khz"]


class ModelLoadError(Exception):
    """A model name or device spec that cannot be used here (the message says why and what to pass)."""


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA if available, else CPU) or any torch device string, checked to be usable here."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"--device {spec!r} is not a torch device ({exc}); try cpu, cuda or cuda:0") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise ModelLoadError(f"--device {spec}: CUDA is not available ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ModelLoadError(f"--device {spec}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"--device {spec}: MPS is not available on this machine; use --device cpu")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:  # torch raises either for devices it was not built for
        raise ModelLoadError(f"--device {spec}: cannot use this device ({exc})") from exc
    return device


def resolve_devices(spec: str, all_gpus: bool = False) -> List[torch.device]:
    """The devices of ``--device`` for a server: one spec (as :func:`resolve_device`) or a comma list such as
    ``cuda:0,cuda:1``, each entry checked; with ``all_gpus`` every visible CUDA device (``spec`` then must be
    ``auto`` or ``cuda``).

    In a list, ``cuda`` is the current CUDA device; a GPU may appear once (one engine set per GPU), ``cpu`` any
    number of times (several engine sets on the CPU); all entries must be of one device type, since sessions
    are placed by free slots alone, not by device speed.
    """
    if all_gpus:
        if spec not in ("auto", "cuda"):
            raise ModelLoadError(f"--all-gpus takes every visible GPU; it cannot be combined with --device {spec}")
        cuda = resolve_device("cuda")  # raises, saying why, without CUDA
        return [torch.device(cuda.type, i) for i in range(torch.cuda.device_count())]
    if "," not in spec:
        return [resolve_device(spec)]
    entries = [entry.strip() for entry in spec.split(",")]
    if not all(entries):
        raise ModelLoadError(f"--device {spec!r}: empty entry in the list; write devices separated by single "
                             "commas, e.g. cuda:0,cuda:1")
    devices = []
    for entry in entries:
        device = resolve_device(entry)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.type != "cpu" and device in devices:
            raise ModelLoadError(f"--device {spec!r}: {device} appears twice; a GPU runs one engine set (only cpu "
                                 "may repeat)")
        devices.append(device)
    types = sorted({device.type for device in devices})
    if len(types) > 1:
        raise ModelLoadError(f"--device {spec!r} mixes device types ({', '.join(types)}); sessions are placed by "
                             "free slots, not speed: list devices of one type")
    return devices


def load_model(spec: str, device: torch.device, *, random_weights: bool = False) -> SNAC:
    """Load a hub id, preset name or local directory onto ``device``; ``model.name`` is canonical.

    Local directories are recorded by absolute path and presets by their hub id, so a codes file names
    a model that ``decode`` can find again from any working directory.

    With ``random_weights`` the preset named by ``spec`` (``24khz``, or its hub id) is built with random
    weights from a fixed seed instead, in eval mode and named by the preset: for benchmarks, whose audio is
    noise.
    """
    if random_weights:
        return _random_model(spec, device)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"--model {spec}: is a file; pass the checkpoint directory holding config.json")
        name = str(path.resolve())
    elif looks_like_path(spec):
        raise ModelLoadError(f"--model {spec}: no such checkpoint directory")
    else:
        name = HUB_IDS.get(spec.lower().removeprefix("snac_"), spec)
    model = SNAC.from_pretrained(name, map_location=device)
    model.name = name
    return model


def _random_model(spec: str, device: torch.device) -> SNAC:
    preset = spec.lower().removeprefix("hubertsiuzdak/").removeprefix("snac_")
    if preset not in PRESETS:
        raise ModelLoadError(f"--random-weights needs a preset name ({', '.join(PRESETS)}), got {spec!r}")
    torch.manual_seed(0)
    model = SNAC.from_config(PRESETS[preset]).to(device).eval()
    model.name = preset
    return model

