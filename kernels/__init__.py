"""Triton kernels of snac-stream, imported as ``snac_stream.kernels``.

This folder sits at the repository root (``kernels/``), not under ``snac_stream/``: the build installs it as
the ``snac_stream.kernels`` package (``package-dir`` in pyproject.toml), and in a checkout
``snac_stream/kernels`` is a symlink to it. Always import it as ``snac_stream.kernels``; a bare top-level
``kernels`` module would clash with another package of that name on PyPI.

- ``conv``: fused snake + depthwise / dense conv1d, offline and streaming.
- ``codebook``: the residual quantizer's nearest-entry search and codebook lookup.
- ``upsampling``: the data movement around the decoder's upsampling product (its input rows, its output).
- ``common``: device helpers the kernels share, and the host-side argument checks.
- ``tuning``: the convolutions' launch parameters.
- ``precision``: the precisions of the matrix products (``PRECISIONS``), without importing Triton.

The model reaches the kernels only through ``snac_stream.model.functional``. This package imports nothing
itself, so ``snac_stream.kernels.precision`` works without Triton installed.
"""

__all__: list[str] = []
