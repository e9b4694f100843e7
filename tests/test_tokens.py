"""Token layouts: flat LLM token streams <-> per-level SNAC codes, offline and streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from snac_stream import PRESETS, SNACConfig
from snac_stream.model.vq import codes_to_frames
from snac_stream.tokens import (
    LAYOUTS,
    ORPHEUS_LLM_TOKEN_OFFSET,
    InterleavedLayout,
    OrpheusLayout,
    TokenLayout,
    depth_first_order,
    get_layout,
    parse_custom_tokens,
)

CB = 4096

# (preset, layout name) pairs that exist: Orpheus is 24 kHz only.
CASES = [(p, n) for p in ("24khz", "32khz", "44khz") for n in LAYOUTS if not (n == "orpheus" and p != "24khz")]


def random_codes(layout: TokenLayout, batch: int, frames: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CB, (batch, frames * r), generator=g) for r in layout.codes_per_frame]


def assert_codes_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for level, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.int64, level
        assert g.shape == w.shape, (level, g.shape, w.shape)
        assert torch.equal(g, w), level


def orpheus_reference(codes: list[torch.Tensor], row: int, base: int = 0) -> list[int]:
    """The Orpheus frame formula, written out literally."""
    c0, c1, c2 = (c[row].tolist() for c in codes)
    out = []
    for j in range(len(c0)):
        out.append(c0[j] + base)
        out.append(c1[2 * j] + base + 4096)
        out.append(c2[4 * j] + base + 2 * 4096)
        out.append(c2[4 * j + 1] + base + 3 * 4096)
        out.append(c1[2 * j + 1] + base + 4 * 4096)
        out.append(c2[4 * j + 2] + base + 5 * 4096)
        out.append(c2[4 * j + 3] + base + 6 * 4096)
    return out


# ---- tables -------------------------------------------------------------------------------------------------
def test_frame_sizes():
    assert InterleavedLayout(PRESETS["24khz"]).frame_tokens == 7
    assert InterleavedLayout(PRESETS["24khz"]).codes_per_frame == (1, 2, 4)
    for preset in ("32khz", "44khz"):
        layout = InterleavedLayout(PRESETS[preset])
        assert layout.frame_tokens == 15
        assert layout.codes_per_frame == (1, 2, 4, 8)


def test_depth_first_order_written_out():
    assert depth_first_order([4, 2, 1]) == [(0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (2, 2), (2, 3)]
    assert depth_first_order([8, 4, 2, 1]) == [
        (0, 0),
        (1, 0), (2, 0), (3, 0), (3, 1), (2, 1), (3, 2), (3, 3),
        (1, 1), (2, 2), (3, 4), (3, 5), (2, 3), (3, 6), (3, 7),
    ]  # fmt: skip
    # Equal strides: one code per level per frame, coarse to fine.
    assert depth_first_order([2, 2, 1]) == [(0, 0), (1, 0), (2, 0), (2, 1)]


def test_non_nesting_strides_rejected():
    config = SNACConfig(vq_strides=[6, 3, 2, 1])  # each divides 6, but 3 codes of level 2 do not split 2 parents
    with pytest.raises(ValueError, match="do not nest"):
        InterleavedLayout(config)


def test_id_offsets_and_positions():
    orpheus = OrpheusLayout()
    assert orpheus.order == InterleavedLayout(PRESETS["24khz"]).order  # one depth-first mechanism
    assert [orpheus.id_offset(p) for p in range(7)] == [p * 4096 for p in range(7)]
    assert orpheus.id_range(3) == (3 * 4096, 4 * 4096)
    assert [orpheus.level_and_index(p) for p in range(7)] == [(0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (2, 2), (2, 3)]
    shifted = OrpheusLayout(token_offset=ORPHEUS_LLM_TOKEN_OFFSET)
    assert shifted.id_offset(6) == 128266 + 6 * 4096

    levels = InterleavedLayout(PRESETS["32khz"], level_offsets=True)
    assert [levels.id_offset(p) for p in range(15)] == [levels.level_and_index(p)[0] * 4096 for p in range(15)]
    raw = InterleavedLayout(PRESETS["32khz"])
    assert {raw.id_range(p) for p in range(15)} == {(0, 4096)}
    with pytest.raises(IndexError):
        orpheus.level_and_index(7)
    with pytest.raises(IndexError):
        orpheus.id_offset(-1)


def test_custom_order_validated():
    config = PRESETS["24khz"]
    level_major = [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (2, 3)]
    layout = TokenLayout(config, level_major, [0] * 7)
    codes = random_codes(layout, 2, 3)
    flat = layout.to_flat(codes)
    assert flat[0, :7].tolist() == [
        codes[0][0, 0], codes[1][0, 0], codes[1][0, 1], codes[2][0, 0], codes[2][0, 1], codes[2][0, 2], codes[2][0, 3]
    ]  # fmt: skip
    assert_codes_equal(layout.from_flat(flat), codes)
    with pytest.raises(ValueError, match="exactly once"):
        TokenLayout(config, level_major[:-1] + [(2, 2)], [0] * 7)
    with pytest.raises(ValueError, match="one entry per position"):
        TokenLayout(config, level_major, [0] * 6)
    with pytest.raises(ValueError, match="token_offset"):
        TokenLayout(config, level_major, [0] * 7, token_offset=-1)


# ---- offline round trips ------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,name", CASES)
@pytest.mark.parametrize("batch,frames", [(1, 0), (1, 5), (3, 4)])
def test_offline_round_trip(preset, name, batch, frames):
    layout = get_layout(name, PRESETS[preset])
    codes = random_codes(layout, batch, frames, seed=frames * 10 + batch)
    flat = layout.to_flat(codes)
    assert flat.shape == (batch, frames * layout.frame_tokens) and flat.dtype == torch.int64
    for p in range(layout.frame_tokens):
        lo, hi = layout.id_range(p)
        column = flat[:, p:: layout.frame_tokens]
        assert bool(((column >= lo) & (column < hi)).all())
    assert_codes_equal(layout.from_flat(flat), codes)
    if batch == 1:
        assert_codes_equal(layout.from_flat(flat[0]), codes)  # 1-D tensor
        assert_codes_equal(layout.from_flat(flat[0].tolist()), codes)  # Python list


@pytest.mark.parametrize("preset,name", CASES)
def test_to_flat_is_frame_local(preset, name):
    # Codes arrive in whole coarse frames, so converting chunk by chunk must equal converting the whole.
    layout = get_layout(name, PRESETS[preset])
    codes = random_codes(layout, 2, 5, seed=3)
    cut = [2 * r for r in layout.codes_per_frame]
    first = layout.to_flat([c[:, :k] for c, k in zip(codes, cut)])
    second = layout.to_flat([c[:, k:] for c, k in zip(codes, cut)])
    assert torch.equal(torch.cat([first, second], dim=1), layout.to_flat(codes))


def test_interleaved_written_out_32khz():
    layout = InterleavedLayout(PRESETS["32khz"], level_offsets=True, token_offset=100)
    codes = random_codes(layout, 1, 2, seed=5)
    c0, c1, c2, c3 = (c[0].tolist() for c in codes)
    want = []
    for j in range(2):
        want += [c0[j] + 100]
        for a in (2 * j, 2 * j + 1):
            want += [c1[a] + 100 + CB]
            for b in (2 * a, 2 * a + 1):
                want += [c2[b] + 100 + 2 * CB, c3[2 * b] + 100 + 3 * CB, c3[2 * b + 1] + 100 + 3 * CB]
    assert layout.to_flat(codes)[0].tolist() == want


# ---- Orpheus ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", [0, ORPHEUS_LLM_TOKEN_OFFSET])
def test_orpheus_order_matches_formula(base):
    layout = OrpheusLayout(PRESETS["24khz"], token_offset=base)
    codes = random_codes(layout, 2, 6, seed=11)
    flat = layout.to_flat(codes)
    for row in range(2):
        assert flat[row].tolist() == orpheus_reference(codes, row, base)
    want = torch.tensor([orpheus_reference(codes, row, base) for row in range(2)])
    assert_codes_equal(layout.from_flat(want), codes)


def test_orpheus_custom_token_text():
    layout = OrpheusLayout()
    codes = random_codes(layout, 1, 4, seed=12)
    llm_ids = orpheus_reference(codes, 0, base=128266)  # Orpheus' training-data ids
    # <custom_token_N> sits at vocabulary id 128256 + N.
    text = " ".join(f"<custom_token_{i - 128256}>" for i in llm_ids) + "\n"
    ids = parse_custom_tokens(text)
    # Orpheus' decoder: code = int(N) - 10 - ((index % 7) * 4096)
    orpheus_decoded = [int(N) - 10 - ((index % 7) * 4096) for index, N in enumerate(
        m[len("<custom_token_"): -1] for m in text.split())]
    assert [v - (k % 7) * 4096 for k, v in enumerate(ids)] == orpheus_decoded
    assert ids == orpheus_reference(codes, 0)
    assert_codes_equal(layout.from_flat(ids), codes)
    # Raw LLM ids decode the same with the vocabulary offset.
    assert_codes_equal(OrpheusLayout(token_offset=ORPHEUS_LLM_TOKEN_OFFSET).from_flat(llm_ids), codes)


def test_parse_custom_tokens_literal_and_errors():
    assert parse_custom_tokens("<custom_token_10><custom_token_4107>") == [0, 4097]
    assert parse_custom_tokens("") == []
    with pytest.raises(ValueError, match="other than <custom_token_N>.*'hello'"):
        parse_custom_tokens("<custom_token_10> hello")
    with pytest.raises(ValueError, match=r"<custom_token_2>.*control token"):
        parse_custom_tokens("<custom_token_10><custom_token_2>")
    with pytest.raises(TypeError):
        parse_custom_tokens([10])


@pytest.mark.parametrize("preset", ["32khz", "44khz"])
def test_orpheus_rejects_other_models(preset):
    with pytest.raises(ValueError, match=r"24 kHz.*vq_strides \[8, 4, 2, 1\]"):
        OrpheusLayout(PRESETS[preset])
    with pytest.raises(ValueError, match="24 kHz"):
        get_layout("orpheus", PRESETS[preset])


def test_orpheus_rejects_other_codebook_size():
    with pytest.raises(ValueError, match="codebook_size 1024"):
        OrpheusLayout(SNACConfig(**{**PRESETS["24khz"].to_dict(), "codebook_size": 1024}))


def test_orpheus_swapped_tokens_detected():
    layout = OrpheusLayout()
    flat = layout.to_flat(random_codes(layout, 1, 2, seed=1))
    swapped = flat.clone()
    swapped[0, [8, 9]] = flat[0, [9, 8]]  # positions 1 and 2 of frame 1
    with pytest.raises(ValueError, match=r"stream index 8 .*frame position 1 .*\[4096, 8192\).*position\(s\) 2"):
        layout.from_flat(swapped)


# ---- registry -----------------------------------------------------------------------------------------------
def test_registry():
    assert LAYOUTS == ("orpheus", "interleaved", "interleaved-offsets")
    assert isinstance(get_layout("orpheus", PRESETS["24khz"]), OrpheusLayout)
    raw = get_layout("interleaved", PRESETS["44khz"], token_offset=7)
    assert isinstance(raw, InterleavedLayout) and not raw.level_offsets and raw.token_offset == 7
    assert get_layout("interleaved-offsets", PRESETS["44khz"]).level_offsets
    for name in LAYOUTS:
        assert get_layout(name, PRESETS["24khz"]).name == name
    with pytest.raises(ValueError, match="unknown token layout 'bogus'.*orpheus, interleaved, interleaved-offsets"):
        get_layout("bogus", PRESETS["24khz"])


# ---- streaming ----------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    case=st.sampled_from(CASES),
    batch=st.integers(1, 3),
    frames=st.integers(0, 6),
    chunks=st.lists(st.integers(1, 20), min_size=1, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_streaming_equals_offline(case, batch, frames, chunks, seed):
    preset, name = case
    layout = get_layout(name, PRESETS[preset])
    codes = random_codes(layout, batch, frames, seed)
    flat = layout.to_flat(codes)
    if batch == 1 and seed % 2:
        flat = flat[0]  # also stream 1-D input
    n = flat.shape[-1]
    parser = layout.parser()
    got = [[] for _ in range(layout.n_levels)]
    assert_codes_equal(parser.push(flat[..., :0]), [c[:, :0] for c in codes])  # fixes the batch size
    start, k = 0, 0
    while start < n:
        stop = min(n, start + chunks[k % len(chunks)])
        k += 1
        out = parser.push(flat[..., start:stop])
        done_before, done_after = start // layout.frame_tokens, stop // layout.frame_tokens
        for level, (c, r) in enumerate(zip(out, layout.codes_per_frame)):
            assert c.shape == (batch, (done_after - done_before) * r)
            got[level].append(c)
        start = stop
        assert parser.pending == stop % layout.frame_tokens
    assert_codes_equal([torch.cat(g or [torch.zeros(batch, 0, dtype=torch.int64)], 1) for g in got], codes)
    assert_codes_equal(parser.flush(), [c[:, :0] for c in codes])
    assert parser.pending == 0


def test_push_list_and_empty_push():
    layout = OrpheusLayout()
    codes = random_codes(layout, 1, 2, seed=2)
    ids = layout.to_flat(codes)[0].tolist()
    parser = layout.parser()
    empty = parser.push([])
    assert [tuple(c.shape) for c in empty] == [(1, 0)] * 3
    first = parser.push(ids[:10])
    assert [c.shape[1] for c in first] == [1, 2, 4] and parser.pending == 3
    second = parser.push(ids[10:])
    assert_codes_equal([torch.cat(x, 1) for x in zip(first, second)], codes)


def test_reset():
    layout = InterleavedLayout(PRESETS["32khz"], level_offsets=True)
    parser = layout.parser()
    stale = layout.to_flat(random_codes(layout, 2, 1, seed=4))
    parser.push(stale[:, :9])
    assert parser.pending == 9 and parser.batch_size == 2
    parser.reset()
    assert parser.pending == 0 and parser.batch_size is None
    codes = random_codes(layout, 1, 3, seed=5)  # a new stream, even of another batch size
    assert_codes_equal(parser.push(layout.to_flat(codes)), codes)


def test_flush_partial_frame_raises_and_keeps_state():
    layout = OrpheusLayout()
    codes = random_codes(layout, 2, 2, seed=6)
    flat = layout.to_flat(codes)
    parser = layout.parser()
    first = parser.push(flat[:, :11])
    with pytest.raises(ValueError, match="4 tokens left over"):
        parser.flush()
    assert parser.pending == 4
    second = parser.push(flat[:, 11:])  # the buffered partial frame survived the failed flush
    assert_codes_equal([torch.cat(x, 1) for x in zip(first, second)], codes)
    flushed = parser.flush()
    assert [tuple(c.shape) for c in flushed] == [(2, 0)] * 3


def test_flush_fresh_parser_returns_empty_codes():
    flushed = InterleavedLayout(PRESETS["44khz"]).parser().flush()
    assert len(flushed) == 4 and all(c.shape == (1, 0) and c.dtype == torch.int64 for c in flushed)


# ---- bad input: the right error, and the parser state untouched ---------------------------------------------
def _assert_parser_still_works(parser, layout, flat, done, first_out):
    """After a failed push, pushing the rest of the good stream must give exactly the right codes."""
    rest = parser.push(flat[:, done:])
    codes = layout.from_flat(flat)
    assert_codes_equal([torch.cat(x, 1) for x in zip(first_out, rest)], codes)


BAD_CHUNKS = [
    # (description, function of a good (1, 10) chunk -> bad chunk, exception, message pattern)
    (
        "token of another position",  # position 3 of frame 1 receives a position-5 id
        lambda good: torch.cat([good[:, :2], good[:, 2:3] + 2 * CB, good[:, 3:]], 1),
        ValueError,
        r"stream index 10 \(batch row 0\).*frame position 3 .*level 2, code 1.*\[12288, 16384\).*position\(s\) 5",
    ),
    (
        "id beyond every position",
        lambda good: torch.cat([good[:, :5], torch.full_like(good[:, :1], 7 * CB), good[:, 6:]], 1),
        ValueError,
        r"28672 at stream index 13 .*out of range: frame position 6 .*\[24576, 28672\)$",
    ),
    (
        "negative id",
        lambda good: torch.cat([torch.full_like(good[:, :1], -5), good[:, 1:]], 1),
        ValueError,
        r"token id -5 at stream index 8 .*negative: frame position 1 .*\[4096, 8192\)",
    ),
    ("float dtype", lambda good: good.float(), TypeError, "integer dtype, got torch.float32"),
    ("bool dtype", lambda good: good > 0, TypeError, "integer dtype, got torch.bool"),
    ("float list", lambda good: [1.5] * good.shape[1], TypeError, "integer dtype"),
    ("strings", lambda good: ["<custom_token_10>"], TypeError, "must be ints, got text.*parse_custom_tokens"),
    ("3-D tensor", lambda good: good.unsqueeze(0), ValueError, r"1-D \(N,\) or 2-D \(B, N\).*\(1, 1, 10\)"),
    ("0-D tensor", lambda good: good[0, 0], ValueError, r"1-D \(N,\) or 2-D \(B, N\), got shape \(\)"),
    ("batch size change", lambda good: good.repeat(2, 1), ValueError, "size 2, but this stream has batch size 1"),
    ("ragged list", lambda good: [[1, 2], [3]], ValueError, "could not be read"),
    ("id beyond int64", lambda good: [2**70], ValueError, "could not be read"),
]


@pytest.mark.parametrize("desc,make_bad,exc,pattern", BAD_CHUNKS, ids=[c[0] for c in BAD_CHUNKS])
def test_bad_push_raises_and_leaves_state(desc, make_bad, exc, pattern):
    layout = OrpheusLayout()
    flat = layout.to_flat(random_codes(layout, 1, 4, seed=7))
    parser = layout.parser()
    first = parser.push(flat[:, :8])  # one whole frame and one token of the next
    assert parser.pending == 1
    good = flat[:, 8:18]  # a valid chunk that would complete frame 1 and start frame 2
    with pytest.raises(exc, match=pattern) as first_error:
        parser.push(make_bad(good))
    assert parser.pending == 1 and parser.batch_size == 1
    with pytest.raises(exc) as second_error:  # same state, so the very same report (stream index included)
        parser.push(make_bad(good))
    assert str(second_error.value) == str(first_error.value)
    _assert_parser_still_works(parser, layout, flat, 8, first)


def test_bad_token_in_second_batch_row_rejects_whole_chunk():
    layout = InterleavedLayout(PRESETS["32khz"], level_offsets=True)
    flat = layout.to_flat(random_codes(layout, 2, 3, seed=8))
    parser = layout.parser()
    first = parser.push(flat[:, :4])
    bad = flat[:, 4:40].clone()
    bad[1, 30] = 3 * CB  # stream index 34 = frame 2, position 4 (level 3): a level-3 id is fine there...
    bad[1, 31] = 3 * CB  # ...but position 5 is level 2
    with pytest.raises(ValueError, match=r"stream index 35 \(batch row 1\).*position 5 .*\[8192, 12288\)"):
        parser.push(bad)
    # Frames 0 and 1 were complete in the rejected chunk, yet nothing was emitted or consumed.
    assert parser.pending == 4
    _assert_parser_still_works(parser, layout, flat, 4, first)


def test_raw_interleaved_range():
    layout = InterleavedLayout(PRESETS["24khz"])
    parser = layout.parser()
    with pytest.raises(ValueError, match=r"4096 at stream index 2 .*\[0, 4096\)$"):
        parser.push([0, 4095, 4096])
    assert parser.pending == 0 and parser.batch_size is None
    assert [c.tolist() for c in parser.push([1, 2, 3, 4, 5, 6, 7])] == [[[1]], [[2, 5]], [[3, 4, 6, 7]]]


def test_from_flat_errors():
    layout = InterleavedLayout(PRESETS["44khz"], level_offsets=True)
    flat = layout.to_flat(random_codes(layout, 2, 2, seed=9))
    with pytest.raises(ValueError, match="29 tokens are not a whole number of coarse frames.*14 tokens left over"):
        layout.from_flat(flat[:, :29])
    with pytest.raises(TypeError, match="integer dtype"):
        layout.from_flat(flat.double())
    with pytest.raises(ValueError, match="1-D"):
        layout.from_flat(flat[None])
    wrong_level = flat.clone()
    wrong_level[0, 15] = 5  # position 0 is level 0: fine; now put a level-0 id at position 1
    wrong_level[0, 16] = 5
    with pytest.raises(ValueError, match=r"stream index 16 \(batch row 0\).*position 1 .*level 1.*\[4096, 8192\)"):
        layout.from_flat(wrong_level)


def test_to_flat_errors():
    layout = OrpheusLayout()
    codes = random_codes(layout, 2, 3, seed=10)
    with pytest.raises(ValueError, match="list of 3 per-level tensors, got 2 levels"):
        layout.to_flat(codes[:2])
    with pytest.raises(ValueError, match=r"codes\[2\] has 11 codes; level 2 has 4 per coarse frame.*need 12"):
        layout.to_flat([codes[0], codes[1], codes[2][:, :11]])
    with pytest.raises(ValueError, match=r"codes\[1\] has batch size 1"):
        layout.to_flat([codes[0], codes[1][:1], codes[2]])
    with pytest.raises(TypeError, match=r"codes\[0\] must have an integer dtype"):
        layout.to_flat([codes[0].float(), codes[1], codes[2]])
    too_big = codes[2].clone()
    too_big[1, 7] = 4096
    with pytest.raises(ValueError, match=r"codes\[2\]\[1, 7\] = 4096 is outside the codebook \[0, 4096\)"):
        layout.to_flat([codes[0], codes[1], too_big])
    negative = codes[0].clone()
    negative[0, 0] = -1
    with pytest.raises(ValueError, match=r"codes\[0\]\[0, 0\] = -1"):
        layout.to_flat([negative, codes[1], codes[2]])


@settings(max_examples=60, deadline=None)
@given(
    case=st.sampled_from(CASES),
    frames=st.integers(0, 6),
    chunks=st.lists(st.integers(1, 20), min_size=1, max_size=12),
    seed=st.integers(0, 2**16),
    torch_first=st.integers(0, 7),
)
def test_push_frames_equals_push_laid_out_as_frames(case, frames, chunks, seed, torch_first):
    """``push_frames`` (a server's numpy path) over any chunking gives the codes ``push`` gives, laid out as
    coarse frames (``codes_to_frames``), and shares its state: pushes of either kind may alternate."""
    preset, name = case
    layout = get_layout(name, PRESETS[preset])
    codes = random_codes(layout, 1, frames, seed)
    flat = layout.to_flat(codes)[0].numpy()
    parser = layout.parser()
    first = min(torch_first, flat.size)
    done = codes_to_frames([c[:, : first // layout.frame_tokens * r].numpy()
                            for c, r in zip(parser.push(torch.from_numpy(flat[:first])), layout.codes_per_frame)],
                           layout.codes_per_frame)[0]
    got, start, k = [done, parser.push_frames(flat[:0])], first, 0  # an empty push too
    while start < flat.size:
        stop = min(flat.size, start + chunks[k % len(chunks)])
        k += 1
        out = parser.push_frames(flat[start:stop])
        assert out.shape == (stop // layout.frame_tokens - start // layout.frame_tokens, sum(layout.codes_per_frame))
        assert out.dtype == np.int64 and parser.pending == stop % layout.frame_tokens
        got.append(out)
        start = stop
    np.testing.assert_array_equal(np.concatenate(got), codes_to_frames([c.numpy() for c in codes],
                                                                       layout.codes_per_frame)[0])


@pytest.mark.parametrize("desc,make_bad,exc,pattern", BAD_CHUNKS[:3], ids=[c[0] for c in BAD_CHUNKS[:3]])
def test_push_frames_refuses_as_push_does_and_leaves_state(desc, make_bad, exc, pattern):
    layout = OrpheusLayout()
    flat = layout.to_flat(random_codes(layout, 1, 4, seed=7))
    parser = layout.parser()
    parser.push_frames(flat[0, :8].numpy())
    bad = make_bad(flat[:, 8:18])[0].numpy()
    with pytest.raises(exc, match=pattern):
        parser.push_frames(bad)
    assert parser.pending == 1
    rest = parser.push_frames(flat[0, 8:].numpy())
    np.testing.assert_array_equal(rest, codes_to_frames([c.numpy() for c in layout.from_flat(flat)],
                                                        layout.codes_per_frame)[0, 1:])
    for wrong in (flat[:, 8:18].numpy(), flat[0, 8:18].numpy().astype(np.float32), [1, 2]):
        with pytest.raises(TypeError, match="1-D numpy integer"):
            parser.push_frames(wrong)
