"""Launch parameters of the convolution kernels: a table keyed by layer shape, and a default rule.

Every kernel asks :func:`launch_config` for its block sizes, ``num_warps`` and ``num_stages``. The table
holds measured entries; shapes it lacks get the default rule of their backend:

- ``"cuda"``: Hopper-sized tiles. The depthwise kernel is memory bound (one read and one write per
  element), so it wants long time tiles and few channels per program; the dense kernel is an implicit GEMM
  whose tiles feed ``tl.dot``.
- ``"interpreter"``: Triton's CPU interpreter pays a fixed cost per program and per operation, so the
  tiles cover as much of the problem as possible (small tiles make it an order of magnitude slower).

Block sizes are powers of two and at least 16 along every ``tl.dot`` dimension.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Dict, Optional

import torch

from .common import interpreting, pow2_in

DWCONV = "snake_dwconv"
CONV = "snake_conv"
CONV_ROWS_FIRST = "snake_conv_rows_first"  # the dense kernel's rows-first product: tiles of its own


@dataclass(frozen=True)
class ShapeKey:
    """What the best launch parameters depend on. ``t_bucket`` is the output length rounded up to a power of
    two and clamped to [64, 65536]: beyond that the grid is simply longer. ``many_rows``: an entry tuned on a
    launch of many batch rows (an engine step, whose dense launches tile (stream, frame) pairs); launches of
    several rows take it before a one-row entry of the same shape."""

    kernel: str
    backend: str
    c_in: int
    c_out: int
    kernel_size: int
    stride: int
    dilation: int
    t_bucket: int
    many_rows: bool = False


@dataclass(frozen=True)
class LaunchConfig:
    """Compile-time block sizes (passed to the kernel by name) and the launch's warps and pipeline depth.

    ``snake_dwconv`` takes ``BLOCK_C`` (channels), ``BLOCK_T`` (frames) and ``WINDOW`` (1: load a
    ``BLOCK_T`` window once and rotate it in registers for each tap; 0: one load per tap). ``snake_conv``
    takes ``BLOCK_O`` (output channels), ``BLOCK_T`` (output frames) and ``BLOCK_R`` (reduction step over
    (input channel, tap) pairs).
    """

    blocks: Dict[str, int] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 1


def t_bucket(length: int) -> int:
    """``ShapeKey.t_bucket`` of a launch of ``length`` output frames."""
    return pow2_in(length, 64, 65536)


# Measured entries (H200, `python bench/tune.py`, 2026-12-01; tf32x3, so the K > 1 shapes take the split-operand
# path): shapes of the 24 kHz model on 10 s of audio where a sweep of 12 tilings beat the default rule by more than
# 5%. Keys absent here use the rule. Most of them are launches the rule gives 16 x 16 tiles (``_fill_gpu``: fewer
# programs than two per SM with plain tiles), which 64 x 64 tiles beat. Timings: bench/RESULTS.md.
TABLE: Dict[ShapeKey, LaunchConfig] = {
    ShapeKey(CONV, "cuda", 192, 384, 16, 8, 1, 4096): LaunchConfig({"BLOCK_O": 128, "BLOCK_T": 64, "BLOCK_R": 16}, 4, 3),
    ShapeKey(CONV, "cuda", 384, 768, 16, 8, 1, 512): LaunchConfig({"BLOCK_O": 64, "BLOCK_T": 64, "BLOCK_R": 16}, 4, 3),
    ShapeKey(CONV, "cuda", 96, 192, 8, 4, 1, 32768): LaunchConfig({"BLOCK_O": 64, "BLOCK_T": 128, "BLOCK_R": 16}, 4, 3),
    ShapeKey(CONV, "cuda", 512, 512, 1, 1, 1, 4096): LaunchConfig({"BLOCK_O": 128, "BLOCK_T": 64, "BLOCK_R": 32}, 4, 3),
    ShapeKey(CONV, "cuda", 48, 96, 4, 2, 1, 65536): LaunchConfig({"BLOCK_O": 128, "BLOCK_T": 64, "BLOCK_R": 16}, 4, 3),
    ShapeKey(CONV, "cuda", 64, 64, 1, 1, 1, 65536): LaunchConfig({"BLOCK_O": 64, "BLOCK_T": 64, "BLOCK_R": 16}, 4, 3),
    ShapeKey(CONV, "cuda", 1, 48, 7, 1, 1, 65536): LaunchConfig({"BLOCK_O": 128, "BLOCK_T": 64, "BLOCK_R": 64}, 4, 3),
    ShapeKey(CONV, "cuda", 384, 384, 1, 1, 1, 4096): LaunchConfig({"BLOCK_O": 64, "BLOCK_T": 64, "BLOCK_R": 64}, 4, 3),
    ShapeKey(CONV, "cuda", 48, 48, 1, 1, 1, 65536): LaunchConfig({"BLOCK_O": 64, "BLOCK_T": 64, "BLOCK_R": 64}, 4, 3),
    ShapeKey(CONV, "cuda", 96, 96, 1, 1, 1, 65536): LaunchConfig({"BLOCK_O": 128, "BLOCK_T": 64, "BLOCK_R": 32}, 4, 3),
    ShapeKey(CONV, "cuda", 768, 1024, 1, 1, 1, 512): LaunchConfig({"BLOCK_O": 64, "BLOCK_T": 64, "BLOCK_R": 64}, 4, 3),
    # An engine step's launches (H100, `python bench/tune.py --engine-streams 2048`, 2026-12-06): the 24 kHz
    # decoder's 64-channel 1x1 convs at 2048 streams, 2519 -> 1563 us with 32-frame tiles; the 128- and
    # 256-channel ones found nothing better than the rule.
    ShapeKey(CONV, "cuda", 64, 64, 1, 1, 1, 2048, True): LaunchConfig({"BLOCK_O": 64, "BLOCK_T": 32, "BLOCK_R": 32}, 4, 3),
    # The 256 -> 128 upsampling as a 2-tap conv on split operands (`--upsampling-product conv_split`, same
    # day): 5039 -> 4679 us with 128-frame tiles and 8 warps. Its three other layers' best were within 5 %.
    ShapeKey(CONV, "cuda", 256, 512, 2, 1, 1, 256, True): LaunchConfig({"BLOCK_O": 128, "BLOCK_T": 128, "BLOCK_R": 16}, 8, 3),
    # The 24 kHz encoder's step at 4096 streams (`--engine-kinds encode`, same day): its 1x1 convs take 32-frame
    # tiles too (48 channels 3970 -> 2373 us, 192: 2624 -> 2178, 384: 1143 -> 972), its last strided conv 8 warps
    # (5768 -> 5315 us). The step's p95 at 4096 streams: 92.4 -> 83.5 ms, inside the 85.3 ms budget.
    ShapeKey(CONV, "cuda", 192, 384, 16, 8, 1, 64, True): LaunchConfig({"BLOCK_O": 128, "BLOCK_T": 128, "BLOCK_R": 16}, 8, 3),
    ShapeKey(CONV, "cuda", 48, 48, 1, 1, 1, 2048, True): LaunchConfig({"BLOCK_O": 64, "BLOCK_T": 32, "BLOCK_R": 16}, 4, 3),
    ShapeKey(CONV, "cuda", 192, 192, 1, 1, 1, 256, True): LaunchConfig({"BLOCK_O": 64, "BLOCK_T": 32, "BLOCK_R": 32}, 4, 3),
    ShapeKey(CONV, "cuda", 384, 384, 1, 1, 1, 64, True): LaunchConfig({"BLOCK_O": 64, "BLOCK_T": 32, "BLOCK_R": 32}, 4, 3),
    # The rows-first products of the 24 kHz decoder's step at 2048 streams (H100, `--kernels snake_conv_rows_first`,
    # 2026-12-07): the two upsampling products launched on flat row lists (512 -> 512 pairs 3130 -> 2805 us,
    # 2048 -> 4096: 1524 -> 1443) and three 1x1 convs (64 channels 929 -> 790, 256: 964 -> 884, 512: 571 -> 527).
    # The 4096-stream step's graph replay: 85.3 -> 83.9 ms.
    ShapeKey(CONV_ROWS_FIRST, "cuda", 512, 512, 1, 1, 1, 65536): LaunchConfig({"BLOCK_O": 64, "BLOCK_T": 128, "BLOCK_R": 32}, 4, 3),
    ShapeKey(CONV_ROWS_FIRST, "cuda", 2048, 4096, 1, 1, 1, 8192): LaunchConfig({"BLOCK_O": 128, "BLOCK_T": 128, "BLOCK_R": 32}, 8, 3),
    ShapeKey(CONV_ROWS_FIRST, "cuda", 256, 256, 1, 1, 1, 256, True): LaunchConfig({"BLOCK_O": 64, "BLOCK_T": 128, "BLOCK_R": 32}, 4, 3),
    ShapeKey(CONV_ROWS_FIRST, "cuda", 64, 64, 1, 1, 1, 2048, True): LaunchConfig({"BLOCK_O": 64, "BLOCK_T": 64, "BLOCK_R": 64}, 4, 3),
    ShapeKey(CONV_ROWS_FIRST, "cuda", 512, 512, 1, 1, 1, 64, True): LaunchConfig({"BLOCK_O": 128, "BLOCK_T": 128, "BLOCK_R": 32}, 8, 3),
    # The same for the 44 kHz decoder's step at 1024 streams (same day): its four upsampling products (1536 -> 3072
    # pairs 28.4 -> 24.8 ms, 3072 -> 6144: 23.6 -> 13.2, 768 -> 576: 25.2 -> 19.6, 384 -> 192: 12.9 -> 10.0) and
    # three 1x1 convs (192 channels 9.95 -> 6.89 ms, 384: 7.91 -> 7.28, 768: 3.61 -> 3.24).
    ShapeKey(CONV_ROWS_FIRST, "cuda", 1536, 3072, 1, 1, 1, 65536): LaunchConfig({"BLOCK_O": 128, "BLOCK_T": 128, "BLOCK_R": 32}, 8, 3),
    ShapeKey(CONV_ROWS_FIRST, "cuda", 3072, 6144, 1, 1, 1, 32768): LaunchConfig({"BLOCK_O": 128, "BLOCK_T": 128, "BLOCK_R": 32}, 8, 3),
    ShapeKey(CONV_ROWS_FIRST, "cuda", 768, 576, 1, 1, 1, 65536): LaunchConfig({"BLOCK_O": 64, "BLOCK_T": 128, "BLOCK_R": 32}, 4, 3),
    ShapeKey(CONV_ROWS_FIRST, "cuda", 384, 192, 1, 1, 1, 65536): LaunchConfig({"BLOCK_O": 64, "BLOCK_T": 128, "BLOCK_R": 32}, 4, 3),
    ShapeKey(CONV_ROWS_FIRST, "cuda", 192, 192, 1, 1, 1, 8192, True): LaunchConfig({"BLOCK_O": 64, "BLOCK_T": 128, "BLOCK_R": 32}, 4, 3),
    ShapeKey(CONV_ROWS_FIRST, "cuda", 384, 384, 1, 1, 1, 2048, True): LaunchConfig({"BLOCK_O": 128, "BLOCK_T": 128, "BLOCK_R": 32}, 8, 3),
    ShapeKey(CONV_ROWS_FIRST, "cuda", 768, 768, 1, 1, 1, 256, True): LaunchConfig({"BLOCK_O": 128, "BLOCK_T": 128, "BLOCK_R": 32}, 8, 3),
}


def _default_dwconv(key: ShapeKey, length: int) -> LaunchConfig:
    halo = key.dilation * (key.kernel_size - 1)
    if key.c_out == 1 < key.c_in:  # reducing launch: one tile of every channel (no channel loop)
        block_c = pow2_in(key.c_in, 1, 256)
        if key.backend == "interpreter":
            block_t = pow2_in(max(length + halo, 2 * halo), 16, 1024)
        else:  # about 8K elements a tile: the window stays in registers
            block_t = max(pow2_in(2 * halo, 16, 4096), 8192 // block_c)
        return LaunchConfig({"BLOCK_C": block_c, "BLOCK_T": block_t, "WINDOW": 1}, num_warps=4)
    if key.backend == "interpreter":
        block_t = pow2_in(max(length + halo, 2 * halo), 16, 1024)
        return LaunchConfig({"BLOCK_C": pow2_in(key.c_in, 1, 64), "BLOCK_T": block_t, "WINDOW": 1})
    # Memory bound: long time tiles (4 x 1024 with 4 warps come closest to the copy bandwidth); more channels
    # per tile spill or shuffle more. Short launches (a streaming step: a few to a few hundred frames per
    # stream) take the time tile they need and more channels, about 2K elements, rather than a tile of mostly
    # masked lanes.
    block_t = pow2_in(length + halo, 32, 1024 if length > 2048 else 512)
    return LaunchConfig({"BLOCK_C": max(4, min(64, 2048 // block_t)), "BLOCK_T": block_t, "WINDOW": 1}, num_warps=4)


def _default_conv(key: ShapeKey, length: int, split: bool = False) -> LaunchConfig:
    reduction = key.c_in * key.kernel_size
    if key.backend == "interpreter":
        return LaunchConfig({"BLOCK_O": pow2_in(key.c_out, 16, 128), "BLOCK_T": pow2_in(length, 16, 512),
                             "BLOCK_R": pow2_in(reduction, 16, 128)})
    # 128 x 64 tiles with 4 warps and 3 stages beat 128 x 128 with 8 warps on 1x1 convs and match them on
    # strided ones. Narrow outputs (C_out = 1 padded to 16) take longer time tiles and a shorter reduction step.
    # Split operands load four tiles per reduction step (high parts and rests of both): every split shape of
    # the 24 kHz model tuned best with 16-wide steps.
    block_o = pow2_in(key.c_out, 16, 128)
    if block_o <= 32:
        return LaunchConfig({"BLOCK_O": block_o, "BLOCK_T": 128, "BLOCK_R": 16}, num_warps=8, num_stages=3)
    return LaunchConfig({"BLOCK_O": block_o, "BLOCK_T": 64 if block_o >= 128 else 128,
                         "BLOCK_R": 32 if reduction >= 32 and not split else 16}, num_warps=4, num_stages=3)


def _rows_first_conv(c_out: int, reduction: int) -> LaunchConfig:
    """Tiles of the rows-first product: 64 frames (one warp group's rows) by up to 128 output channels."""
    return LaunchConfig({"BLOCK_O": pow2_in(c_out, 16, 128), "BLOCK_T": 64,
                         "BLOCK_R": 32 if reduction >= 32 else 16}, num_warps=4, num_stages=3)


def _fit_dwconv(cfg: LaunchConfig, halo: int) -> LaunchConfig:
    """A window must hold the taps of at least as many outputs as it wastes on the halo: otherwise the
    kernel loads once per tap. A table entry without ``WINDOW`` means 0."""
    window = int(bool(cfg.blocks.get("WINDOW", 0)) and 2 * halo <= cfg.blocks["BLOCK_T"])
    if cfg.blocks.get("WINDOW") != window:
        return replace(cfg, blocks={**cfg.blocks, "WINDOW": window})
    return cfg


# Smaller tiles a dense launch steps down to when its plain ones leave SMs idle (``_fill_gpu``), largest first.
FILL_TILES = ((64, 64), (32, 32), (16, 16))  # (BLOCK_O, BLOCK_T); 16 is ``tl.dot``'s minimum


def _fill_gpu(cfg: LaunchConfig, key: ShapeKey, length: int, batch: int, programs_wanted: int) -> LaunchConfig:
    """The largest of ``FILL_TILES`` that gives a dense launch ``programs_wanted`` programs, for launches whose
    plain tiles give fewer (the last layers of a one-row encode: 1024 channels x 1120 frames is 144 programs
    with 128 x 64 tiles, 288 with 64 x 64; a streaming step of a few streams: 512 channels x 32 frames takes
    16 x 16). A tile too small loads the same operands again for every few outputs: on that encode layer 16 x 16
    tiles ran several times slower than cuBLAS (bench/RESULTS.md). At most four variants per layer shape,
    whatever the batch: every new tile shape is a kernel compilation, and a server sees many batch sizes. The
    reduction step is kept, so each output's sum runs in the same order whatever the tiling."""
    def programs(block_o: int, block_t: int) -> int:
        return -(-key.c_out // block_o) * -(-length // block_t) * batch

    block_o, block_t = cfg.blocks["BLOCK_O"], cfg.blocks["BLOCK_T"]
    if programs(block_o, block_t) >= programs_wanted:
        return cfg
    for fill_o, fill_t in FILL_TILES:
        fill_o, fill_t = min(fill_o, block_o), min(fill_t, block_t)
        if programs(fill_o, fill_t) >= programs_wanted or fill_o == fill_t == 16:
            return replace(cfg, blocks={**cfg.blocks, "BLOCK_O": fill_o, "BLOCK_T": fill_t})
    raise AssertionError("FILL_TILES ends with 16 x 16")


@functools.lru_cache(maxsize=16)
def _programs_wanted(device: torch.device) -> int:
    """Two programs per streaming multiprocessor."""
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def launch_config(kernel: str, *, device: torch.device, c_in: int, c_out: int, kernel_size: int, stride: int,
                  dilation: int, length: int, batch: int = 1, split: bool = False,
                  rows_first: bool = False) -> LaunchConfig:
    """Launch parameters for ``kernel`` (``"snake_dwconv"`` or ``"snake_conv"``) on a layer of this shape
    producing ``length`` output frames for each of ``batch`` rows; ``split``: a dense conv on split operands
    (the default rule steps its reduction differently); ``rows_first``: a dense conv's rows-first product
    (frames are its products' rows: a rule of its own)."""
    backend = "interpreter" if interpreting() or device.type != "cuda" else "cuda"
    if rows_first and kernel == CONV and backend == "cuda":
        kernel = CONV_ROWS_FIRST  # entries and a rule of its own: its products' rows are the frames
    shape = (kernel, backend, c_in, c_out, kernel_size, stride, dilation, t_bucket(length))
    key = ShapeKey(*shape)
    wanted = _programs_wanted(device) if backend == "cuda" and kernel != DWCONV else 0
    many: Optional[LaunchConfig] = TABLE.get(ShapeKey(*shape, True)) if batch > 1 else None
    # Else an entry tuned on one row (used for any batch), as its grid was.
    cfg: Optional[LaunchConfig] = many if many is not None else TABLE.get(key)
    if cfg is None:  # the batch matters to the rule only through the fill (one memo entry otherwise)
        return _default(key, length, batch if wanted else 1, wanted, split)
    if kernel == DWCONV:
        return _fit_dwconv(cfg, dilation * (kernel_size - 1))
    # Tuned on a full engine step: a step of a few streams still takes the smallest tiles where the tuned ones
    # would leave SMs idle.
    return _fill_gpu(cfg, key, length, batch, wanted) if many is not None and wanted else cfg


@functools.lru_cache(maxsize=4096)
def _default(key: ShapeKey, length: int, batch: int = 1, programs_wanted: int = 0, split: bool = False) -> LaunchConfig:
    """The default rule, memoised: it runs on every launch, and streaming launches repeat the same shapes."""
    if key.kernel == DWCONV:
        return _fit_dwconv(_default_dwconv(key, length), key.dilation * (key.kernel_size - 1))
    if key.kernel == CONV_ROWS_FIRST:
        cfg = _rows_first_conv(key.c_out, key.c_in * key.kernel_size)
    elif key.kernel == CONV:
        cfg = _default_conv(key, length, split)
    else:
        raise ValueError(f"unknown kernel {key.kernel!r}")
    return _fill_gpu(cfg, key, length, batch, programs_wanted) if programs_wanted else cfg
