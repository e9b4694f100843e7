"""Flat token streams <-> per-level SNAC codes.

SNAC codes are a list of per-level int64 tensors ``codes[i]`` of shape (B, T_i), coarse level first. Level
``i`` holds ``r_i = vq_strides[0] // vq_strides[i]`` codes per coarse frame, so one coarse frame is
``sum(r_i)`` codes (7 for the 24 kHz model, 15 for 32/44 kHz). A language model emits them as one flat
stream; a *layout* fixes the order of the codes inside a coarse frame and the id each one carries.

One mechanism serves every layout: :class:`TokenLayout` is driven by a table with one row per position
``p`` of the frame, ``(level, index, id_offset)``; the token at position ``p`` of coarse frame ``j`` is
``codes[level][:, j * r_level + index] + id_offset(p)``, with ``id_offset(p) = token_offset + offsets[p]``.

* :class:`InterleavedLayout`: depth-first walk of the code tree of each coarse frame (``c0[j]``, then the
  first child ``c1[2j]`` and its own children, then the next child, ...). Ids are raw codes, or with
  ``level_offsets=True`` level ``i`` adds ``i * codebook_size``.
* :class:`OrpheusLayout`: the same depth-first order on the 24 kHz model (which is exactly the Orpheus TTS
  order ``c0[j], c1[2j], c2[4j], c2[4j+1], c1[2j+1], c2[4j+2], c2[4j+3]``) with a per-*position* offset
  ``p * 4096``.

Ids are range-checked position by position, so in layouts whose positions have disjoint id ranges
(Orpheus, and between levels with ``level_offsets=True``) a dropped or inserted token is caught at once
instead of silently shifting every later code to the wrong level.

Token *text* has one grammar here: :func:`parse_custom_tokens` reads a whole ``<custom_token_N>`` text and
:class:`TokenTextParser` a stream of such tokens and integer ids arriving in pieces (the live demos).
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .config import PRESETS, SNACConfig

__all__ = [
    "TokenLayout",
    "InterleavedLayout",
    "OrpheusLayout",
    "TokenParser",
    "TokenTextParser",
    "AudioTokenText",
    "depth_first_order",
    "parse_custom_tokens",
    "format_custom_tokens",
    "get_layout",
    "LAYOUTS",
    "ORPHEUS_CUSTOM_TOKEN_BASE",
    "ORPHEUS_LLM_TOKEN_OFFSET",
]

TokensLike = Union[torch.Tensor, Sequence[int], Sequence[Sequence[int]]]

# Orpheus writes audio tokens as ``<custom_token_N>`` with N = 10 + code + p * 4096 (N = 0..9 are control
# tokens such as start/end of speech), and its Llama-3 tokenizer puts ``<custom_token_N>`` at vocabulary id
# 128256 + N, so the raw LLM id of an audio token is 128266 + code + p * 4096.
ORPHEUS_CUSTOM_TOKEN_BASE = 10
ORPHEUS_LLM_TOKEN_OFFSET = 128256 + ORPHEUS_CUSTOM_TOKEN_BASE

# The grammar of token text. An item is ``<custom_token_N>`` (id ``N - 10``), a bare integer id, or a run of
# separators (whitespace, commas); :func:`parse_custom_tokens` admits custom tokens and whitespace only.
_CUSTOM_TOKEN = r"<custom_token_(\d+)>"
_CUSTOM_TOKEN_RE = re.compile(_CUSTOM_TOKEN)
_TOKEN_TEXT_RE = re.compile(_CUSTOM_TOKEN + r"|(\d+)|([\s,]+)")
# A proper prefix of ``<custom_token_N>`` at the end of the text: the rest may come with the next piece.
_PARTIAL_CUSTOM_TOKEN_RE = re.compile(r"<(c(u(s(t(o(m(_(t(o(k(e(n(_\d*)?)?)?)?)?)?)?)?)?)?)?)?)?$")


def depth_first_order(vq_strides: Sequence[int]) -> List[Tuple[int, int]]:
    """``(level, index)`` of each position of a coarse frame, walking the code tree depth first.

    ``index`` counts the level's codes within the coarse frame (0 .. r_level - 1). Each code of level ``i``
    has ``r_{i+1} / r_i`` children at level ``i + 1``, so the strides must nest (each divides the previous).
    """
    strides = [int(s) for s in vq_strides]
    if not strides or any(s < 1 for s in strides) or any(strides[0] % s for s in strides):
        raise ValueError(f"vq_strides {list(vq_strides)} must be positive and each must divide the first one")
    rates = [strides[0] // s for s in strides]
    for level in range(1, len(rates)):
        if rates[level] % rates[level - 1]:
            raise ValueError(
                f"vq_strides {strides} do not nest: level {level} has {rates[level]} codes per coarse frame, "
                f"not a multiple of level {level - 1}'s {rates[level - 1]}, so the codes do not form a tree "
                "and a depth-first interleave is undefined"
            )
    order: List[Tuple[int, int]] = []

    def visit(level: int, index: int) -> None:
        order.append((level, index))
        if level + 1 < len(rates):
            fan = rates[level + 1] // rates[level]
            for child in range(fan):
                visit(level + 1, index * fan + child)

    visit(0, 0)
    return order


def parse_custom_tokens(text: str) -> List[int]:
    """Orpheus ``<custom_token_N>`` text -> ``N - 10`` per token, i.e. position-offset ids ``code + p * 4096``.

    This is Orpheus' own convention: its decoder computes the code as ``int(N) - 10 - ((index % 7) * 4096)``.
    The result feeds an :class:`OrpheusLayout` with the default ``token_offset=0``. Whitespace between tokens
    is allowed; any other text, and control tokens (N < 10), raise ``ValueError``: strip them before parsing.
    :class:`TokenTextParser` reads the same tokens from text arriving in pieces, and integer ids as well.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_custom_tokens expects a str, got {type(text).__name__}")
    leftover = _CUSTOM_TOKEN_RE.sub(" ", text).strip()
    if leftover:
        raise ValueError(
            f"text holds something other than <custom_token_N> tokens and whitespace: {leftover[:60]!r}"
        )
    return TokenTextParser(source="text").feed(text, final=True)


def format_custom_tokens(ids: Sequence[int], per_line: int = 7) -> str:
    """Position-offset ids -> ``<custom_token_N>`` text (``N = id + 10``), ``per_line`` tokens per line.

    The inverse of :func:`parse_custom_tokens`; 7 per line puts one Orpheus coarse frame on each line.
    """
    ids = [int(i) for i in ids]
    if any(i < 0 for i in ids):
        raise ValueError("token ids must be >= 0")
    tokens = [f"<custom_token_{i + ORPHEUS_CUSTOM_TOKEN_BASE}>" for i in ids]
    lines = ["".join(tokens[k : k + per_line]) for k in range(0, len(tokens), max(1, per_line))]
    return "\n".join(lines) + ("\n" if lines else "")


class TokenTextParser:
    """Incremental reader of an Orpheus-style token stream, fed text as it arrives.

    Accepts ``<custom_token_N>`` (id ``N - 10``, the convention of :func:`parse_custom_tokens`) and bare
    integers (ids as they are; a layout's ``token_offset`` handles e.g. raw Orpheus LLM vocabulary ids),
    separated by whitespace or commas. A token split across two chunks is held back until it is complete.
    Anything else, and control tokens (N < 10), raise ``ValueError`` naming the line and column.
    """

    def __init__(self, source: str = "token stream") -> None:
        self.source = source
        self._pending = ""
        self._line, self._col = 1, 1  # position of _pending[0]
        self.count = 0  # tokens parsed so far
        #: (line, column) of each token of the current :meth:`feed` result, for error messages downstream
        self.positions: List[Tuple[int, int]] = []

    def _advance(self, text: str) -> None:
        newlines = text.count("\n")
        if newlines:
            self._line += newlines
            self._col = len(text) - text.rfind("\n")
        else:
            self._col += len(text)

    def where(self, line: int, col: int) -> str:
        """``line L, column C of SOURCE``, for messages."""
        return f"line {line}, column {col} of {self.source}"

    def feed(self, text: str, final: bool = False) -> List[int]:
        """Ids of the tokens completed by ``text``; ``final`` marks the end of the stream."""
        buf = self._pending + text
        ids: List[int] = []
        self.positions = []
        pos = 0
        while pos < len(buf):
            match = _TOKEN_TEXT_RE.match(buf, pos)
            # A number that reaches the end of the buffer may continue in the next chunk ("12" + "34").
            if match is not None and match.end() == len(buf) and not final and match.group(2) is not None:
                break
            if match is None:
                if not final and _PARTIAL_CUSTOM_TOKEN_RE.match(buf, pos):
                    break
                bad = re.match(r"\S{1,40}", buf[pos:])
                raise ValueError(f"not a token at {self.where(self._line, self._col)}: "
                                 f"{bad.group(0) if bad else buf[pos:pos + 20]!r} (expected <custom_token_N> "
                                 "or an integer id, separated by whitespace or commas)")
            custom, number = match.group(1), match.group(2)
            if custom is not None or number is not None:
                if custom is not None:
                    value = int(custom)
                    if value < ORPHEUS_CUSTOM_TOKEN_BASE:
                        raise ValueError(f"{match.group(0)} at {self.where(self._line, self._col)} (token "
                                         f"{self.count}) is an Orpheus control token, not audio")
                    value -= ORPHEUS_CUSTOM_TOKEN_BASE
                else:
                    value = int(number)
                ids.append(value)
                self.positions.append((self._line, self._col))
                self.count += 1
            self._advance(match.group(0))
            pos = match.end()
        self._pending = buf[pos:]
        return ids


class AudioTokenText:
    """Incremental ``<custom_token_N>`` extraction from LLM text, which may split a token between pieces.

    Audio tokens (N >= 10) become ids ``N - 10`` (:func:`parse_custom_tokens`' convention, the input of an
    :class:`OrpheusLayout` with ``token_offset=0``). Orpheus' control
    tokens (N < 10: start/end of speech, ...) and any other text (``<|eot_id|>``, whitespace) are skipped;
    ``skipped`` counts them, ``other_text`` keeps the first 200 characters of non-whitespace text seen.

    The lenient reading of the grammar above, for LLM output; :class:`TokenTextParser` is the strict one.
    """

    def __init__(self) -> None:
        self._pending = ""
        self.tokens = 0
        self.skipped = 0
        self.other_text = ""

    def feed(self, text: str, final: bool = False) -> List[int]:
        """Ids of the audio tokens completed by ``text``; ``final`` marks the end of the stream."""
        buf = self._pending + text
        ids: List[int] = []
        pos = 0
        for match in _CUSTOM_TOKEN_RE.finditer(buf):
            self._other(buf[pos:match.start()])
            value = int(match.group(1))
            if value >= ORPHEUS_CUSTOM_TOKEN_BASE:
                ids.append(value - ORPHEUS_CUSTOM_TOKEN_BASE)
            else:
                self.skipped += 1
            pos = match.end()
        rest = buf[pos:]
        start = rest.rfind("<")
        if not final and start >= 0 and _PARTIAL_CUSTOM_TOKEN_RE.match(rest, start):
            self._other(rest[:start])
            self._pending = rest[start:]  # may be the start of a token split between pieces
        else:
            self._other(rest)
            self._pending = ""
        self.tokens += len(ids)
        return ids

    def _other(self, text: str) -> None:
        if text.strip():
            self.skipped += 1
            if len(self.other_text) < 200:
                self.other_text = (self.other_text + text)[:200]


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _as_int_tensor(values: TokensLike, what: str) -> torch.Tensor:
    """Tokens or codes as a (B, N) int64 tensor; a 1-D input is batch 1."""
    if isinstance(values, torch.Tensor):
        t = values
    else:
        if isinstance(values, (str, bytes)):
            raise TypeError(f"{what} must be ints (a list or a tensor), got {type(values).__name__}")
        try:
            t = torch.as_tensor(values)
        except TypeError as exc:
            raise TypeError(f"{what} must be ints: {exc}") from None
        except (ValueError, RuntimeError, OverflowError) as exc:
            if isinstance(values, Sequence) and any(isinstance(v, str) for v in values):
                raise TypeError(
                    f"{what} must be ints, got text; parse <custom_token_N> text with parse_custom_tokens first"
                ) from None
            # Ragged lists, ids beyond int64, objects torch cannot type.
            raise ValueError(f"{what} could not be read as a 1-D or 2-D array of int64 ids: {exc}") from None
        if t.numel() == 0:
            # An empty Python list carries no dtype (torch makes it float32); it is a valid empty chunk.
            t = t.to(torch.int64)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{what} must have an integer dtype, got {t.dtype}")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    elif t.dim() != 2:
        raise ValueError(f"{what} must be 1-D (N,) or 2-D (B, N), got shape {tuple(t.shape)}")
    if t.shape[0] < 1:
        raise ValueError(f"{what} has batch size 0")
    return t.to(torch.int64)


class TokenLayout:
    """Table-driven conversion between per-level codes and a flat token stream.

    Args:
        config: the model config; its ``vq_strides`` give the codes per coarse frame of each level.
        order: one ``(level, index)`` per position of a coarse frame; ``index`` counts that level's codes
            within the frame (0 .. r_level - 1). It must cover every code of the frame exactly once.
        offsets: the id offset of each position, added to the code (>= 0).
        token_offset: a global id offset added to every token, e.g. where audio ids start in an LLM
            vocabulary.

    Each position ``p`` carries ids in ``[id_offset(p), id_offset(p) + codebook_size)``.
    """

    name: str = "custom"

    def __init__(
        self,
        config: SNACConfig,
        order: Sequence[Tuple[int, int]],
        offsets: Sequence[int],
        *,
        token_offset: int = 0,
    ) -> None:
        self.config = config
        self.codebook_size: int = config.codebook_size
        self.n_levels: int = config.n_codebooks
        strides = config.vq_strides
        #: codes of each level per coarse frame (r_i), coarse level first
        self.codes_per_frame: Tuple[int, ...] = tuple(strides[0] // s for s in strides)
        self.token_offset: int = _check_int("token_offset", token_offset, 0)
        order = tuple((int(level), int(index)) for level, index in order)
        expected = {(level, index) for level, r in enumerate(self.codes_per_frame) for index in range(r)}
        if len(order) != len(expected) or set(order) != expected:
            raise ValueError(
                f"order must list each (level, index) of a coarse frame exactly once "
                f"({len(expected)} entries for codes per frame {list(self.codes_per_frame)}), got {list(order)}"
            )
        if len(offsets) != len(order):
            raise ValueError(f"offsets needs one entry per position ({len(order)}), got {len(offsets)}")
        self.order: Tuple[Tuple[int, int], ...] = order
        self.offsets: Tuple[int, ...] = tuple(_check_int("offsets[i]", o, 0) for o in offsets)
        self.frame_tokens: int = len(order)
        self._tables: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}  # see _flat_tables
        self._numpy: Optional[Tuple[np.ndarray, np.ndarray]] = None  # see _numpy_tables
        # Positions of each level sorted by index: gathering frame columns in this order yields the level's
        # codes in time order.
        self._level_positions: Tuple[List[int], ...] = tuple(
            [p for _, p in sorted((index, p) for p, (lvl, index) in enumerate(order) if lvl == level)]
            for level in range(self.n_levels)
        )

    # ---- position tables ----------------------------------------------------------------------------
    def level_and_index(self, position: int) -> Tuple[int, int]:
        """``(level, index within the coarse frame)`` of the code at ``position`` (0 .. frame_tokens - 1)."""
        self._check_position(position)
        return self.order[position]

    def id_offset(self, position: int) -> int:
        """What is added to the code at ``position`` to form its token id (``token_offset`` included)."""
        self._check_position(position)
        return self.token_offset + self.offsets[position]

    def id_range(self, position: int) -> Tuple[int, int]:
        """Valid ids at ``position``: the half-open range ``[lo, hi)``."""
        lo = self.id_offset(position)
        return lo, lo + self.codebook_size

    def _check_position(self, position: int) -> None:
        if not 0 <= position < self.frame_tokens:
            raise IndexError(f"frame position {position} out of range 0..{self.frame_tokens - 1}")

    # ---- offline conversion -----------------------------------------------------------------------------
    def to_flat(self, codes: Sequence[TokensLike]) -> torch.Tensor:
        """Per-level codes ``codes[i]`` (B, T_0 * r_i) -> tokens (B, T_0 * frame_tokens), int64.

        ``T_0`` is the number of coarse frames. Stateless and frame-local, so converting consecutive chunks
        of whole coarse frames and concatenating equals converting the whole: this is the streaming writer.
        """
        if isinstance(codes, torch.Tensor) or not isinstance(codes, Sequence) or len(codes) != self.n_levels:
            got = f"{len(codes)} levels" if isinstance(codes, Sequence) else type(codes).__name__
            raise ValueError(f"codes must be a list of {self.n_levels} per-level tensors, got {got}")
        levels = [_as_int_tensor(c, f"codes[{i}]") for i, c in enumerate(codes)]
        batch = levels[0].shape[0]
        frames = levels[0].shape[1]  # level 0 has one code per coarse frame
        for i, (c, r) in enumerate(zip(levels, self.codes_per_frame)):
            if c.shape[0] != batch:
                raise ValueError(f"codes[{i}] has batch size {c.shape[0]}, codes[0] has {batch}")
            if c.shape[1] != frames * r:
                raise ValueError(
                    f"codes[{i}] has {c.shape[1]} codes; level {i} has {r} per coarse frame, so "
                    f"{frames} coarse frames need {frames * r}"
                )
        device = levels[0].device
        # The levels side by side per frame (level-major columns), checked at once, then put in stream order
        # by one gather: a server converts every stream's codes every step, so few tensor ops per call.
        frame_codes = torch.cat([c.to(device).reshape(batch, frames, r) for c, r in zip(levels, self.codes_per_frame)],
                                dim=2)
        if bool(((frame_codes < 0) | (frame_codes >= self.codebook_size)).any()):
            for i, c in enumerate(levels):
                bad = (c < 0) | (c >= self.codebook_size)
                if bool(bad.any()):
                    row, col = (int(v) for v in bad.nonzero()[0])
                    raise ValueError(f"codes[{i}][{row}, {col}] = {int(c[row, col])} is outside the codebook "
                                     f"[0, {self.codebook_size})")
        order, offsets = self._flat_tables(device)
        return (frame_codes[:, :, order] + offsets).reshape(batch, frames * self.frame_tokens)

    def from_flat(self, tokens: TokensLike) -> List[torch.Tensor]:
        """Tokens (B, N) or (N,) of whole coarse frames -> per-level codes ``codes[i]`` (B, N / frame_tokens * r_i).

        Raises ``ValueError`` if N is not a whole number of coarse frames or a token id is out of range for
        its position; ``TypeError`` for a non-integer dtype.
        """
        t = _as_int_tensor(tokens, "tokens")
        leftover = t.shape[1] % self.frame_tokens
        if leftover:
            raise ValueError(
                f"{t.shape[1]} tokens are not a whole number of coarse frames ({self.frame_tokens} tokens each): "
                f"{leftover} tokens left over"
            )
        self._check_ids(t, start_position=0, stream_index=0)
        return self._split(t)

    def parser(self) -> "TokenParser":
        """A streaming parser that buffers partial coarse frames."""
        return TokenParser(self)

    # ---- internals ----------------------------------------------------------------------------------------
    def _offset_tensor(self, device: torch.device) -> torch.Tensor:
        return self._flat_tables(device)[1]

    def _flat_tables(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(order, offsets) on ``device``, made once per device: stream position ``p`` of a frame holds
        level-major column ``order[p]`` (the levels' codes of the frame side by side) plus ``offsets[p]``."""
        tables = self._tables.get(device)
        if tables is None:
            columns = [p for positions in self._level_positions for p in positions]  # level-major -> position
            order = [0] * self.frame_tokens
            for column, position in enumerate(columns):
                order[position] = column
            tables = (torch.tensor(order, dtype=torch.int64, device=device),
                      torch.tensor([self.token_offset + o for o in self.offsets], dtype=torch.int64, device=device))
            self._tables[device] = tables
        return tables

    def _numpy_tables(self) -> Tuple[np.ndarray, np.ndarray]:
        """(each position's lowest id, the positions in level-major order) as numpy arrays, made once: a
        frame's ids less the first, taken at the second, are its codes of every level side by side."""
        if self._numpy is None:
            low = np.array([self.token_offset + o for o in self.offsets], dtype=np.int64)
            columns = np.array([p for positions in self._level_positions for p in positions], dtype=np.int64)
            self._numpy = (low, columns)
        return self._numpy

    def _split(self, tokens: torch.Tensor) -> List[torch.Tensor]:
        """Validated (B, F * frame_tokens) tokens -> per-level codes."""
        batch = tokens.shape[0]
        frames = tokens.shape[1] // self.frame_tokens
        raw = tokens.reshape(batch, frames, self.frame_tokens) - self._offset_tensor(tokens.device)
        return [
            raw[:, :, positions].reshape(batch, frames * r)
            for positions, r in zip(self._level_positions, self.codes_per_frame)
        ]

    def _check_ids(self, tokens: torch.Tensor, start_position: int, stream_index: int) -> None:
        """Raise ``ValueError`` for the first (in stream order) token outside its position's id range.

        ``start_position`` is the frame position of ``tokens[:, 0]``; ``stream_index`` its index in the stream,
        used only in the message.
        """
        n = tokens.shape[1]
        if n == 0:
            return
        positions = (torch.arange(n, device=tokens.device) + start_position) % self.frame_tokens
        lo = self._offset_tensor(tokens.device)[positions]
        bad = (tokens < lo) | (tokens >= lo + self.codebook_size)
        if not bool(bad.any()):
            return
        col = int(bad.any(dim=0).nonzero()[0])
        row = int(bad[:, col].nonzero()[0])
        value = int(tokens[row, col])
        position = int(positions[col])
        level, index = self.order[position]
        lo_p, hi_p = self.id_range(position)
        problem = "negative" if value < 0 else "out of range"
        message = (
            f"token id {value} at stream index {stream_index + col} (batch row {row}) is {problem}: frame position "
            f"{position} of the {self.name!r} layout (level {level}, code {index} of the coarse frame) "
            f"expects ids in [{lo_p}, {hi_p})"
        )
        fits = [p for p in range(self.frame_tokens) if self.id_range(p)[0] <= value < self.id_range(p)[1]]
        if fits:
            # An id valid elsewhere in the frame usually means a token was dropped or inserted upstream.
            message += (
                f"; the id belongs to frame position(s) {', '.join(map(str, fits))}, "
                "so the stream is probably misaligned (a token was dropped or inserted)"
            )
        raise ValueError(message)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, frame_tokens={self.frame_tokens}, "
            f"codes_per_frame={list(self.codes_per_frame)}, token_offset={self.token_offset})"
        )


class InterleavedLayout(TokenLayout):
    """Depth-first interleave of each coarse frame, for any config with nesting strides.

    Per coarse frame ``j``: ``c0[j]``, then for each of its children at level 1 (``c1[r_1 j]``, ...) that
    child followed, recursively, by its own children. 24 kHz: ``c0, c1, c2, c2, c1, c2, c2`` (7 tokens);
    32/44 kHz: 15 tokens.

    Args:
        level_offsets: if True level ``i`` adds ``i * codebook_size`` so that ids of different levels never
            collide (ids in ``[0, n_levels * codebook_size)``) and a misaligned stream is detected where a
            level changes; if False (the default) ids are the raw codes in ``[0, codebook_size)``.
        token_offset: a global id offset added to every token.
    """

    def __init__(self, config: SNACConfig, *, level_offsets: bool = False, token_offset: int = 0) -> None:
        order = depth_first_order(config.vq_strides)
        self.level_offsets = bool(level_offsets)
        offsets = [level * config.codebook_size if self.level_offsets else 0 for level, _ in order]
        super().__init__(config, order, offsets, token_offset=token_offset)
        self.name = "interleaved-offsets" if self.level_offsets else "interleaved"


class OrpheusLayout(TokenLayout):
    """The Orpheus TTS layout (24 kHz model only): depth-first order with a per-position offset ``p * 4096``.

    Coarse frame ``j`` is the 7 tokens ``[c0[j], c1[2j], c2[4j], c2[4j+1], c1[2j+1], c2[4j+2], c2[4j+3]]``;
    the token at position ``p`` (0..6) is ``code + p * 4096 + token_offset``. Every position has its own id
    range, so a token that belongs to another position is reported.

    ``token_offset`` conventions: 0 (the default) for ``parse_custom_tokens`` output (``N - 10`` of
    ``<custom_token_N>``); ``ORPHEUS_LLM_TOKEN_OFFSET`` (128266) for raw Orpheus LLM vocabulary ids.
    """

    name = "orpheus"

    def __init__(self, config: Optional[SNACConfig] = None, *, token_offset: int = 0) -> None:
        if config is None:
            config = PRESETS["24khz"]
        if list(config.vq_strides) != [4, 2, 1] or config.codebook_size != 4096:
            raise ValueError(
                "the Orpheus layout is defined for the 24 kHz SNAC model only (vq_strides [4, 2, 1], "
                f"codebook_size 4096); got vq_strides {list(config.vq_strides)}, codebook_size "
                f"{config.codebook_size}. Use InterleavedLayout for other models"
            )
        order = depth_first_order(config.vq_strides)
        offsets = [position * config.codebook_size for position in range(len(order))]
        super().__init__(config, order, offsets, token_offset=token_offset)


class TokenParser:
    """Streaming flat tokens -> per-level codes, buffering partial coarse frames.

    The batch size is fixed by the first push and kept until :meth:`reset`. Every method is atomic: if it
    raises, the parser state is unchanged, so a server can report the error and carry on or close cleanly.
    """

    def __init__(self, layout: TokenLayout) -> None:
        self.layout = layout
        self.reset()

    def reset(self) -> None:
        """Drop buffered tokens and forget the batch size: ready for a new stream."""
        self._buffer: Optional[torch.Tensor] = None  # (B, pending) ids of the current partial frame
        self._batch: Optional[int] = None
        self._consumed = 0  # tokens per batch row since reset, for error messages
        self._device = torch.device("cpu")

    @property
    def pending(self) -> int:
        """Tokens (per batch row) buffered in the current partial coarse frame, 0 .. frame_tokens - 1."""
        return 0 if self._buffer is None else self._buffer.shape[1]

    @property
    def batch_size(self) -> Optional[int]:
        """The batch size fixed by the first push, or None before it."""
        return self._batch

    def push(self, tokens: TokensLike) -> List[torch.Tensor]:
        """Add tokens (N,) or (B, N); return the codes ``codes[i]`` (B, F * r_i) of the F coarse frames completed.

        F may be 0 (shapes (B, 0)). Raises ``ValueError`` for an out-of-range id (naming its frame position
        and the expected range), a negative id, a wrong rank or a batch size change; ``TypeError`` for a
        non-integer dtype. On error nothing is consumed.
        """
        t = _as_int_tensor(tokens, "tokens")
        if self._batch is not None and t.shape[0] != self._batch:
            raise ValueError(f"tokens have batch size {t.shape[0]}, but this stream has batch size {self._batch}")
        if self._buffer is not None:
            t = t.to(self._buffer.device)
        self.layout._check_ids(t, start_position=self.pending, stream_index=self._consumed)
        # Validated: from here on nothing can fail, so the state changes all at once.
        joined = t if self._buffer is None else torch.cat([self._buffer, t], dim=1)
        whole = joined.shape[1] - joined.shape[1] % self.layout.frame_tokens
        codes = self.layout._split(joined[:, :whole])
        self._buffer = joined[:, whole:].clone()  # clone: do not pin the whole chunk's storage
        self._batch = t.shape[0]
        self._consumed += t.shape[1]
        self._device = t.device
        return codes

    def push_frames(self, ids: np.ndarray) -> np.ndarray:
        """:meth:`push` for one stream's token ids as a 1-D numpy integer array (a server's message), returning
        the completed coarse frames as ``model.vq.codes_to_frames`` lays them out: (F, sum(r)) int64, each
        frame's codes of every level side by side. The same checks and errors as :meth:`push` (which a bad id
        goes through for its message), in a few numpy operations: a server parses every message of thousands
        of streams, where torch's fixed cost per operation made this ten times slower."""
        if not isinstance(ids, np.ndarray) or ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"push_frames takes a 1-D numpy integer array, got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)} of shape {getattr(ids, 'shape', '?')}")
        if self._batch not in (None, 1):
            raise ValueError(f"tokens have batch size 1, but this stream has batch size {self._batch}")
        layout, pending = self.layout, self.pending
        ids = ids.astype(np.int64, copy=False)
        low, columns = layout._numpy_tables()
        if ids.size:
            start = low[(np.arange(ids.size) + pending) % layout.frame_tokens]
            if ((ids < start) | (ids >= start + layout.codebook_size)).any():
                layout._check_ids(torch.from_numpy(ids).view(1, -1), start_position=pending,
                                  stream_index=self._consumed)  # raises, naming the first bad id
        # Validated: from here on nothing can fail, so the state changes all at once.
        buffered = self._buffer
        if buffered is not None and pending:
            ids = np.concatenate([buffered.reshape(-1).cpu().numpy() if isinstance(buffered, torch.Tensor)
                                  else buffered.reshape(-1), ids])
        whole = ids.size - ids.size % layout.frame_tokens
        frames = (ids[:whole].reshape(-1, layout.frame_tokens) - low)[:, columns]
        self._buffer = torch.from_numpy(ids[whole:].reshape(1, -1).copy())
        self._batch = 1
        self._consumed += ids.size - pending
        self._device = torch.device("cpu")
        return frames

    def flush(self) -> List[torch.Tensor]:
        """End of stream: return empty codes (B, 0) per level and reset.

        Raises ``ValueError`` (state unchanged) if a partial coarse frame is buffered, since its codes cannot
        be decoded.
        """
        if self.pending:
            raise ValueError(
                f"stream ended inside a coarse frame: {self.pending} tokens left over "
                f"({self.layout.frame_tokens} tokens make a frame)"
            )
        batch = self._batch if self._batch is not None else 1
        empty = [torch.zeros(batch, 0, dtype=torch.int64, device=self._device) for _ in range(self.layout.n_levels)]
        self.reset()
        return empty


LAYOUTS: Tuple[str, ...] = ("orpheus", "interleaved", "interleaved-offsets")


def get_layout(name: str, config: SNACConfig, *, token_offset: int = 0) -> TokenLayout:
    """The layout registered as ``name`` (one of :data:`LAYOUTS`) for ``config``.

    ``"orpheus"``: :class:`OrpheusLayout` (24 kHz only); ``"interleaved"``: raw codes, depth first;
    ``"interleaved-offsets"``: depth first with level ``i`` adding ``i * codebook_size``.
    """
    if name == "orpheus":
        return OrpheusLayout(config, token_offset=token_offset)
    if name == "interleaved":
        return InterleavedLayout(config, level_offsets=False, token_offset=token_offset)
    if name == "interleaved-offsets":
        return InterleavedLayout(config, level_offsets=True, token_offset=token_offset)
    raise ValueError(f"unknown token layout {name!r}; choose one of {', '.join(LAYOUTS)}")
