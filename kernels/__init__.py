"""Triton kernels for snac-stream, installed as ``snac_stream.kernels``.

This folder sits at the repository root but is never importable as a bare ``kernels`` module (that name
belongs to another PyPI package); the build maps it into the ``snac_stream`` namespace.
"""

__all__: list[str] = []
