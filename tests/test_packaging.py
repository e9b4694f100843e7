"""The build maps the repository's kernels/ folder into the snac_stream namespace, and only there, and ships
the browser client's static files."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_exposes_kernels_inside_the_namespace(tmp_path: Path) -> None:
    # A fresh interpreter outside the checkout: the repository root must not be on sys.path.
    probe = ("import importlib.util as u; import snac_stream.kernels.conv; "
             "print(u.find_spec('snac_stream.kernels') is not None, u.find_spec('kernels') is None)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"], out.stdout


@pytest.mark.slow
def test_wheel_places_kernels_under_snac_stream(tmp_path: Path) -> None:
    """A normal (non-editable) build: the wheel holds snac_stream/kernels/*.py and no top-level kernels/, and
    the page served by ``snac-stream serve``."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("snac_stream-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "snac_stream/kernels/conv.py" in names and "snac_stream/kernels/codebook.py" in names
    assert not any(name.startswith("kernels/") for name in names)
    # The browser client ships with the server.
    for name in ("index.html", "app.js", "opus.js", "worklet.js"):
        assert f"snac_stream/server/static/{name}" in names
