"""The model's arithmetic with two backends, PyTorch and the Triton kernels: the modules call these functions
and never ask which backend runs.

``conv`` is the single entry point the offline layers (on the Triton backend) and every streaming op call.
Its input is the virtual concatenation of an optional ``context`` (the streaming cache of earlier inputs)
and the new chunk ``x``: offline calls pass ``padding``, streaming calls pass the cache. Snake activations
before and after the conv, the residual add, SNAC's noise multiply and the final tanh are folded into the
same call, so the Triton backend runs each as one fused kernel. ``codebook_nearest`` and ``codebook_lookup``
are the residual quantizer's two halves (encode: nearest codebook entry; decode: the entry's latent
contribution), one fused kernel each on the Triton backend.

The backend of a call comes from ``use_backend`` (a context variable set by ``SNAC`` and the streaming
objects for the duration of a call), together with the precision of the Triton matrix products (the dense
convs and the codebook search; see ``snac_stream.kernels.precision``). PyTorch is the default, so modules
called directly keep the reference arithmetic bit for bit.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from ..kernels.derived import DerivedTensors
from ..kernels.precision import DEFAULT_PRECISION, check_precision
from ..kernels.rows import Context, gathered
from .noise import positional_randn

BACKENDS = ("auto", "triton", "torch")

_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("snac_stream_backend", default="torch")
_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar("snac_stream_precision", default=DEFAULT_PRECISION)
# How the Triton backend multiplies a transposed conv's frame pairs (``conv_transpose``): "cublas", one cuBLAS
# product of rows built by ``kernels.upsampling.phase_pairs``; "conv", the dense-conv kernel as a 2-tap conv
# (snake and context read in the kernel, tf32x3 on tensor cores); "conv_split", the same on operands split
# before the kernel; "rows", the dense-conv kernel as a 1x1 conv over the rows ``phase_pairs`` builds (tf32x3
# split in registers, rows first on CUDA); "frames", the same product reading each frame's values once,
# from overlapping rows. Measured against each other by bench/upsampling_cost.py and
# bench/engine_capacity.py; "auto", the default, picks per launch (``_upsampling_product``).
UPSAMPLING_PRODUCTS = ("cublas", "conv", "conv_split", "rows", "frames")
_FRAMES_PRODUCT_MIN = 64  # frame pairs a stream from which "auto" reads single frames (the 24 kHz step's last two)
_KERNEL_SPAN = 2**31  # elements a Triton kernel's operand may span along time (kernels.common.check_tensor)
_UPSAMPLING_PRODUCT: contextvars.ContextVar[str] = contextvars.ContextVar("snac_stream_upsampling_product",
                                                                          default="auto")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the triton package is installed (looked up once: every streaming push asks)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """``"auto"`` -> Triton on CUDA when it is installed, else PyTorch; ``"triton"`` checked to be usable.

    Triton also runs on the CPU under its interpreter (``TRITON_INTERPRET=1``, slow: tests only).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package: pip install 'snac-stream[triton]'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' runs on CUDA devices; the model is on {device} "
            "(set TRITON_INTERPRET=1 before importing snac_stream to use Triton's CPU interpreter)"
        )
    return "triton"


@contextlib.contextmanager
def use_backend(backend: str, precision: str = DEFAULT_PRECISION) -> Iterator[None]:
    """Run the enclosed model calls on a resolved backend (``"torch"`` or ``"triton"``), the Triton matrix
    products (dense convs, codebook search) with ``precision`` (one of ``PRECISIONS``)."""
    check_precision(precision)
    tokens = _BACKEND.set(backend), _PRECISION.set(precision)
    try:
        yield
    finally:
        _BACKEND.reset(tokens[0])
        _PRECISION.reset(tokens[1])


@contextlib.contextmanager
def use_upsampling_product(product: str) -> Iterator[None]:
    """Multiply the enclosed transposed convs' frame pairs on the Triton backend in the form ``product`` (one
    of ``UPSAMPLING_PRODUCTS``; benchmarks and tests compare them). Like ``use_backend``, it holds for the
    calling thread only."""
    if product != "auto" and product not in UPSAMPLING_PRODUCTS:
        raise ValueError(f"product must be auto or one of {', '.join(UPSAMPLING_PRODUCTS)}, got {product!r}")
    token = _UPSAMPLING_PRODUCT.set(product)
    try:
        yield
    finally:
        _UPSAMPLING_PRODUCT.reset(token)


def current_backend() -> str:
    """The backend of the enclosing ``use_backend``: ``"torch"`` (the default) or ``"triton"``."""
    return _BACKEND.get()


def snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Snake activation ``x + sin(alpha x)^2 / (alpha + 1e-9)``, written as the reference computes it."""
    shape = x.shape
    x = x.reshape(shape[0], shape[1], -1)
    x = x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)
    return x.reshape(shape)


def snake_layer(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """A snake no conv absorbs (before a transposed conv): one Triton pass on the Triton backend."""
    if current_backend() == "triton":
        from ..kernels import conv as kernels

        return kernels.snake_activation(x, alpha)
    return snake(x, alpha)


def conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    groups: int = 1,
    stride: int = 1,
    dilation: int = 1,
    padding: int = 0,
    context: Optional[Context] = None,
    length: Optional[int] = None,
    alpha: Optional[torch.Tensor] = None,
    alpha_out: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    residual_context: Optional[Context] = None,
    residual_offset: int = 0,
    noise_seed: Optional[int] = None,
    noise_start: int | torch.Tensor = 0,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """``act(residual + noise * conv1d(snake(cat(context, x)), weight, bias))``, each part optional.

    Args:
        x: (B, C_in, T) new frames; ``context``: (B, C_in, L) frames before them (streaming), or None. Either
            context may be rows of an engine's batch (``kernels.rows.RowsOf``): the kernels read the depthwise
            conv's and the residual's where they lie; elsewhere they are gathered.
        weight: (C_out, C_in / groups, K); ``groups`` is 1 (dense) or C_in (depthwise).
        padding: zeros on both ends of ``cat(context, x)`` (offline layers; streaming passes 0).
        length: outputs to compute (default: all the input allows).
        alpha / alpha_out: snake before / after the conv (per channel, (1, C, 1)).
        residual: (B, C_out, *) added to output ``j`` from ``cat(residual_context, residual)[j + residual_offset]``.
        noise_seed / noise_start: multiply output ``j`` by the deterministic noise at position ``noise_start + j``
            (``noise_start`` an int, or an int64 tensor (B,) with one start per stream).
        activation: ``"tanh"`` or None.

    Returns:
        (B, C_out, length) outputs.
    """
    if current_backend() == "triton":
        return _conv_triton(**locals())
    context, residual_context = gathered(context), gathered(residual_context)
    xin = x if context is None or context.shape[-1] == 0 else torch.cat([context, x], dim=-1)
    if length is not None and padding == 0:
        # Streaming: read only the inputs the requested outputs need.
        xin = xin[..., : (length - 1) * stride + dilation * (weight.shape[-1] - 1) + 1]
    if alpha is not None:
        xin = snake(xin, alpha)
    y = F.conv1d(xin, weight, bias, stride, padding, dilation, groups)
    if length is not None:
        y = y[..., :length]
    if alpha_out is not None:
        y = snake(y, alpha_out)
    if noise_seed is not None:
        n = positional_randn(noise_seed, noise_start, y.shape[-1], y.device).to(y.dtype)
        y = n.view(-1, 1, y.shape[-1]) * y
    if residual is not None:
        r = residual if residual_context is None else torch.cat([residual_context, residual], dim=-1)
        y = r[..., residual_offset : residual_offset + y.shape[-1]] + y
    if activation == "tanh":
        y = torch.tanh(y)
    elif activation is not None:
        raise ValueError(f"unknown activation {activation!r}")
    return y


# 1x1 conv views of linear layers' weights, one per weight: the dense kernel keeps its own forms of a weight
# (split operands) per weight object, so a new view every call would remake them every call.
_LINEAR_AS_CONV = DerivedTensors()


def linear_as_conv(weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight (C_out, C_in) as the 1x1 conv weight (C_out, C_in, 1) that :func:`conv` takes."""
    return _LINEAR_AS_CONV.get(weight, lambda w: w.unsqueeze(-1))


def _conv_triton(*, x, weight, bias, groups, stride, dilation, padding, context, length, alpha, alpha_out,
                 residual, residual_context, residual_offset, noise_seed, noise_start, activation) -> torch.Tensor:
    from ..kernels import conv as kernels

    depthwise = groups > 1
    if alpha_out is not None and (residual is not None or noise_seed is not None or activation is not None):
        raise ValueError("alpha_out (a snake right after the conv) excludes the other epilogues")
    if depthwise and not (groups == x.shape[1] == weight.shape[0] and weight.shape[1] == 1):
        raise ValueError("the Triton backend runs dense (groups=1) and depthwise (groups=C) convs only")
    if depthwise:
        # Depthwise convs in SNAC are never followed by a residual add, noise or tanh.
        if residual is not None or noise_seed is not None or activation is not None or stride != 1:
            raise ValueError("depthwise conv epilogues are limited to a snake")
        return kernels.snake_dwconv(x, weight, bias, alpha=alpha, dilation=dilation, padding=padding,
                                    context=context, length=length, alpha_out=alpha_out)
    y = kernels.snake_conv(x, weight, bias, alpha=alpha, stride=stride, dilation=dilation, padding=padding,
                           context=context, length=length, residual=residual, residual_context=residual_context,
                           residual_offset=residual_offset, noise_seed=noise_seed, noise_start=noise_start,
                           activation=activation, precision=_PRECISION.get())
    return snake(y, alpha_out) if alpha_out is not None else y  # dense + snake epilogue: non-depthwise models only


def conv_transpose(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    stride: int,
    context: Optional[Context] = None,
    padding: int = 0,
    crop: int = 0,
    length: Optional[int] = None,
    alpha: Optional[torch.Tensor] = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """SNAC's upsampling: ``conv_transpose1d`` (kernel ``2 * stride``, stride ``stride``, ``weight`` of shape
    (C_in, C_out, 2s)) of ``snake(cat(context, x))`` (the snake only with ``alpha``), the same on both
    backends.

    Output frame ``j`` of a 2-tap conv over the input frames (zero-padded by ``padding`` frames at both ends)
    yields samples ``[j*s, (j+1)*s)``: ``z[j*s + r] = W[:, :, s+r] . xp[j] + W[:, :, r] . xp[j+1]``. With
    ``padding=1`` that is the whole transposed conv, before its own padding ``p`` crops it (``crop=p``);
    streaming passes the previous input frame as ``context``. Unlike ``conv_transpose1d`` this needs no
    overlap-add of neighbouring frames, so a chunk's samples need only its frames and one before, and every
    (row, frame) of a batch is one row of a single matrix product.

    The product's output row ``j`` holds those samples in time order, channels innermost (column ``r * C_out +
    o``): the rows are the samples channels-last. On the Triton backend one pass builds the product's input
    rows (snake, context, padding and pairing; ``kernels.upsampling``), cuBLAS multiplies them, and one pass
    turns the output channels-first; in PyTorch that is a snake, a join and a gather on the way in and a
    transposing copy on the way out. Where the dense-conv kernel is faster (``_upsampling_product``: an
    engine step's batched launches) it multiplies the rows instead.

    Args:
        x: (B, C_in, T) frames; context: (B, C_in, L) frames before them, or None (rows of an engine's batch
            are gathered).
        crop / length: return samples ``crop .. crop + length - 1`` of ``z`` (default: all after ``crop``).
        alpha: the snake before the layer (per channel), or None.
        channels_last: return the samples as the product wrote them, a view with strides (*, 1, C_out), and
            skip the pass that writes them channels-first: for a consumer that reads any strides (the noise
            block's kernel), which then reads them once instead of twice.

    Returns:
        (B, C_out, length) samples at the output rate: contiguous unless ``channels_last``.
    """
    if weight.dim() != 3 or weight.shape[-1] != 2 * stride:
        raise ValueError(f"weight must have shape (C_in, C_out, {2 * stride}), got {tuple(weight.shape)}")
    triton = _BACKEND.get() == "triton"
    context = gathered(context)
    b, c_in, c_out = x.shape[0], weight.shape[0], weight.shape[1]
    held = 0 if context is None else context.shape[-1]
    frames = held + x.shape[-1] + 2 * padding - 1
    end = frames * stride if length is None else crop + length
    if crop < 0 or end > frames * stride or end < crop:
        raise ValueError(f"samples {crop}..{end - 1} are out of range: {frames} frames give {frames * stride}")
    precision = _PRECISION.get() if triton else None
    # Kept per bias on the Triton backend (no autograd there); PyTorch's keeps the bias's gradient.
    phase_bias = None if bias is None else _phase_bias(bias, stride) if triton else bias.repeat(stride)
    # One matrix product for every (row, frame): (B * frames, 2 C_in) @ (2 C_in, s * C_out).
    if triton:
        from ..kernels import upsampling

        product = _upsampling_product(_UPSAMPLING_PRODUCT.get(), b, frames, precision)
        if product in ("rows", "frames"):
            from ..kernels import conv

            if product == "rows":
                pairs = upsampling.phase_pairs(x, context, alpha, padding)
                row_frames = frames
            else:
                # Each padded frame once, frames-major (B * (frames + 1), C_in): the pair of frames f and f + 1
                # is the run of 2 C_in values from frame f on, so the rows are overlapping views of it. Each
                # stream gets one more row, pairing its last frame with the next stream's first: its samples
                # come after the last one kept, and the view's last row, past the end, is never computed.
                single = upsampling.phase_pairs(x, context, alpha, padding, taps=1)
                row_frames = frames + 1
                pairs = single.as_strided((max(0, b * row_frames - 1), 2 * c_in), (c_in, 1))
            # The rows (B * frames, 2 C_in) as one batch row of 2 C_in channels, and the output rows likewise:
            # views, the kernel reads and writes any strides. Its int32 offsets along time cover at most
            # _KERNEL_SPAN elements, so many rows (a 44 kHz step of 1024 streams) go in several launches.
            z = torch.empty(b * row_frames, c_out * stride, device=x.device, dtype=torch.float32)
            w = _phase_weight(weight).view(c_out * stride, 2 * c_in, 1)
            chunk = (_KERNEL_SPAN - 1) // max(2 * c_in, c_out * stride)
            for start in range(0, pairs.shape[0], chunk):
                rows = slice(start, min(start + chunk, pairs.shape[0]))
                conv.snake_conv(pairs[rows].t().unsqueeze(0), w, phase_bias, precision=precision, split=False,
                                out=z[rows].t().unsqueeze(0))
            return _samples(z, b, c_out, crop, end, channels_last)
        if product != "cublas":
            from ..kernels import conv

            # The same product as a 2-tap conv of s * C_out channels over the frames, written (B, frames,
            # s * C_out) as the cuBLAS product's rows are.
            z = torch.empty(b, frames, c_out * stride, device=x.device, dtype=torch.float32)
            conv.snake_conv(x, _conv_phase_weight(weight), phase_bias, alpha=alpha, padding=padding,
                            context=context, precision=precision,
                            split=product == "conv_split", out=z.transpose(1, 2))
            return _samples(z, b, c_out, crop, end, channels_last)
        pairs = upsampling.phase_pairs(x, context, alpha, padding)
    else:
        xin = x if not held else torch.cat([context, x], dim=-1)
        if alpha is not None:
            xin = snake(xin, alpha)
        if padding:
            xin = F.pad(xin, (padding, padding))
        pairs = xin.unfold(-1, 2, 1).permute(0, 2, 3, 1).reshape(b * frames, 2 * c_in)  # [frame f, frame f+1]
    # The Triton backend's precision reaches this cuBLAS product too: one TF32 tensor-core product for "tf32",
    # full fp32 otherwise. For "tf32x3" split operands on TF32 tensor cores were measured on an H100: three
    # products with the splits in PyTorch were slower than the fp32 GEMM; one product of rows split in the
    # rows' own pass was up to 2.4x faster on the wide layers, but cuBLAS's tensor-core accumulation made its
    # error 10x the fp32 GEMM's (bench/RESULTS.md). So "tf32x3" keeps fp32 here.
    w = _phase_weight(weight).view(c_out * stride, 2 * c_in).t()
    with _tf32_matmuls(x.device, precision == "tf32") if precision else contextlib.nullcontext():
        z = pairs @ w if phase_bias is None else torch.addmm(phase_bias, pairs, w)
    return _samples(z, b, c_out, crop, end, channels_last)


def _samples(z: torch.Tensor, batch: int, c_out: int, crop: int, end: int, channels_last: bool) -> torch.Tensor:
    """The upsampling product's rows ``z`` (B * frames, s * C_out), its samples channels-last, as (B, C_out,
    end - crop): samples ``crop .. end - 1`` of each batch item, as a view (``channels_last``) or contiguous."""
    samples = z.view(batch, -1, c_out)
    if channels_last:
        return samples[:, crop:end].transpose(1, 2)
    if _BACKEND.get() == "triton":
        from ..kernels import upsampling

        return upsampling.channels_first(samples, crop, end - crop)
    return samples[:, crop:end].transpose(1, 2).contiguous()


def _upsampling_product(product: str, batch: int, frames: int, precision: str) -> str:
    """The product form ``"auto"`` (the default) stands for: for tf32x3 launches of several rows (an engine
    step's streams), the dense kernel on the built rows (``"rows"``), which an H100 measured 1.2-1.8x faster
    than each other form at every layer of a 2048-stream step, and 2-6x more accurate than the cuBLAS fp32
    product; read from overlapping rows of single frames (``"frames"``) where each stream has at least
    ``_FRAMES_PRODUCT_MIN`` frame pairs, so that its one extra row a stream costs little; cuBLAS for one
    row's long calls (offline). Figures: bench/RESULTS.md."""
    if product != "auto":
        return product
    if precision != "tf32x3" or batch == 1:
        return "cublas"
    return "frames" if frames >= _FRAMES_PRODUCT_MIN else "rows"


@contextlib.contextmanager
def _tf32_matmuls(device: torch.device, enabled: bool) -> Iterator[None]:
    """cuBLAS fp32 matrix products on TF32 tensor cores (``enabled``) or in full fp32, for the enclosed calls
    on a CUDA ``device`` (the setting is process-wide: restored on exit). On other devices it changes nothing."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    # torch >= 2.9 names the setting fp32_precision; mixing it with the legacy allow_tf32 raises, so use one.
    name, value = (("fp32_precision", "tf32" if enabled else "ieee") if hasattr(flags, "fp32_precision")
                   else ("allow_tf32", enabled))
    saved = getattr(flags, name)
    setattr(flags, name, value)
    try:
        yield
    finally:
        setattr(flags, name, saved)


# Phase-form weights of transposed convs, made once per weight and remade when it changes (moved, loaded in
# place): a CUDA-graph replay must not redo them every step.
_PHASE_WEIGHTS = DerivedTensors()
_CONV_PHASE_WEIGHTS = DerivedTensors()
_PHASE_BIASES = DerivedTensors()


def _phase_weight(weight: torch.Tensor) -> torch.Tensor:
    return _PHASE_WEIGHTS.get(weight, phase_weight)


def _conv_phase_weight(weight: torch.Tensor) -> torch.Tensor:
    """``phase_weight`` as a dense conv's weight (s * C_out, C_in, 2): taps innermost, the kernel's order."""
    return _CONV_PHASE_WEIGHTS.get(weight, lambda w: phase_weight(w).transpose(1, 2).contiguous())


def _phase_bias(bias: torch.Tensor, stride: int) -> torch.Tensor:
    """A transposed conv's bias (C_out,) for each of its s * C_out phase channels."""
    return _PHASE_BIASES.get(bias, lambda v: v.repeat(stride))


def phase_weight(weight: torch.Tensor) -> torch.Tensor:
    """A transposed conv's weight (C_in, C_out, 2s) as the weights (s * C_out, 2, C_in) of the same layer
    written as a 2-tap conv over input frames (see ``conv_transpose``), tap-major to match the product's input
    rows: output channel ``r * C_out + o`` is phase ``r`` of channel ``o`` (phase-major, so that a row of
    outputs is its samples in time order, channels innermost); its tap 0 reads the previous frame
    (``W[:, o, s + r]``), tap 1 the current one (``W[:, o, r]``). Made once per weight tensor
    (``_phase_weight``): a CUDA-graph replay must not redo it."""
    c_in, c_out, kernel_size = weight.shape
    s = kernel_size // 2
    taps = torch.stack([weight[:, :, s:], weight[:, :, :s]], dim=-1)  # (C_in, C_out, s, 2)
    return taps.permute(2, 1, 3, 0).reshape(s * c_out, 2, c_in).contiguous()


def codebook_nearest(z: torch.Tensor, in_weight: torch.Tensor, in_bias: torch.Tensor,
                     codebook: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A quantizer level's encode: ``z_e = in_proj(z)`` and the codebook entry nearest to each frame of it.

    Args:
        z: (B, D, T) latents at the level's rate (already average-pooled by its stride).
        in_weight: (d, D, 1) ``in_proj`` weight; in_bias: (d,).
        codebook: (N, d) codebook (the raw embedding; entries are compared after L2 normalisation).

    Returns:
        (B, T) int64 codes and (B, d, T) ``z_e``. On the Triton backend, one fused kernel whose products run
        at the ``use_backend`` precision.
    """
    if current_backend() == "triton":
        from ..kernels import codebook as kernels

        return kernels.codebook_nearest(z, in_weight, in_bias, F.normalize(codebook), return_projection=True,
                                        precision=_PRECISION.get())
    z_e = F.conv1d(z, in_weight, in_bias)
    return nearest_entry(z_e, codebook), z_e


def nearest_entry(z_e: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(B, d, T) projected latents -> (B, T) int64 index of the entry of the (N, d) codebook with the highest
    cosine similarity: the reference's distance arithmetic, op for op, in PyTorch on every backend."""
    B = z_e.shape[0]
    encodings = F.normalize(z_e.transpose(1, 2).reshape(-1, z_e.shape[1]))
    codebook = F.normalize(codebook)
    dist = (
        encodings.pow(2).sum(1, keepdim=True)
        - 2 * encodings @ codebook.t()
        + codebook.pow(2).sum(1, keepdim=True).t()
    )
    return (-dist).max(1)[1].reshape(B, -1)


def codebook_lookup(indices: torch.Tensor, codebook: torch.Tensor, out_weight: torch.Tensor,
                    out_bias: torch.Tensor, *, repeat: int = 1, z_e: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A quantizer level's latent contribution: ``out_proj(codebook[indices])`` repeated ``repeat`` times along
    time; with ``z_e`` the reference's straight-through form ``out_proj(z_e + (codebook[indices] - z_e))``.

    Args:
        indices: (B, T) int64 codes, all in [0, N) (the model checks the codes it is given).
        codebook: (N, d) codebook; out_weight: (D, d, 1) ``out_proj`` weight; out_bias: (D,).
        repeat: the level's stride, in latent frames per code.
        z_e: (B, d, T) ``in_proj`` output of the encoded frames (``codebook_nearest``), or None.
        out: (B, D, T * repeat) latents to add the contribution to, in place, or None.

    Returns:
        (B, D, T * repeat): ``out`` when given, else a new tensor.
    """
    if current_backend() == "triton":
        from ..kernels import codebook as kernels

        return kernels.codebook_lookup(indices, codebook, out_weight, out_bias, repeat=repeat, z_e=z_e, out=out,
                                       check_range=False)
    z_q = F.embedding(indices, codebook).transpose(1, 2)
    if z_e is not None:
        z_q = z_e + (z_q - z_e)
    y = F.conv1d(z_q, out_weight, out_bias)
    if repeat > 1:
        y = y.repeat_interleave(repeat, dim=-1)
    return y if out is None else out.add_(y)
