"""DecodeEngine: many streams in one batched step, each equal to its own offline decode."""

from __future__ import annotations

import copy
from typing import Dict, List

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snac_stream import PRESETS, SNAC
from snac_stream.engine import DecodeEngine, EncodeEngine, EngineFull
from snac_stream.engine.base import bucket_sizes, cat_to, index_on
from snac_stream.model.vq import codes_to_frames, frames_to_codes
from snac_stream.streaming.rows import select_rows
from snac_stream.streaming.rows import state_batch as state_rows

AUDIO_TOL = 1e-5
STRUCTURES = {
    "24khz": {**PRESETS["24khz"].to_dict(), "encoder_dim": 8, "decoder_dim": 64},
    "44khz": {**PRESETS["44khz"].to_dict(), "encoder_dim": 4, "decoder_dim": 64},  # attention, 4 frames a step
    "dense": dict(sampling_rate=16000, encoder_dim=8, encoder_rates=[3, 5], decoder_dim=32, decoder_rates=[5, 3],
                  attn_window_size=None, vq_strides=[2, 1], depthwise=False, codebook_size=64),
}
_MODELS: Dict[str, SNAC] = {}


def model_for(name: str, backend: str = "torch") -> SNAC:
    if name not in _MODELS:
        torch.manual_seed(7)
        model = SNAC(**STRUCTURES[name]).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("bias"):
                    p.normal_(0, 0.05)
        _MODELS[name] = model
    _MODELS[name].backend = backend
    return _MODELS[name]


def random_codes(model: SNAC, steps: int, engine: DecodeEngine, seed: int) -> List[torch.Tensor]:
    cfg, gen = model.config, torch.Generator().manual_seed(seed)
    frames = steps * engine.step_frames
    return [torch.randint(0, cfg.codebook_size, (1, frames * cfg.coarse_stride // s), generator=gen)
            for s in cfg.vq_strides]


def steps_of(codes: List[torch.Tensor], start: int, count: int, engine: DecodeEngine) -> List[torch.Tensor]:
    frames = codes[0].shape[-1] // engine.step_frames  # steps in all
    return [c[:, start * c.shape[1] // frames : (start + count) * c.shape[1] // frames] for c in codes]


def run_step(engine, batched: bool) -> Dict[int, object]:
    """One engine step as {sid: output}: through ``step()``, or through ``step_groups()`` split here by its
    contract (row ``i`` of a group's outputs belongs to its ``i``-th stream)."""
    if not batched:
        return engine.step()
    out: Dict[int, object] = {}
    for sids, outputs in engine.step_groups():
        for i, sid in enumerate(sids):
            out[sid] = [o[i : i + 1] for o in outputs] if isinstance(outputs, list) else outputs[i : i + 1]
    return out


def close_streams(engine, sids: List[int], batched: bool) -> Dict[int, object]:
    """End streams ``sids`` as {sid: rest of its output}: ``close`` one by one, or one ``close_many``."""
    if not batched:
        return {sid: engine.close(sid) for sid in sids}
    out: Dict[int, object] = {}
    for group, outputs in engine.close_many(sids):
        for i, sid in enumerate(group):
            out[sid] = [o[i : i + 1] for o in outputs] if isinstance(outputs, list) else outputs[i : i + 1]
    assert sorted(out) == sorted(sids)
    return out


events = st.lists(st.tuples(st.sampled_from(["open", "open", "submit", "submit", "step", "step", "step", "close"]),
                            st.integers(0, 5), st.integers(1, 6)), min_size=15, max_size=50)


# "buckets" is the pass that "graphs" captures on CUDA: testing it here tests the graph's body.
CPU_STEP_MODES = ["rows", "buckets"]


@pytest.mark.parametrize("step_mode", CPU_STEP_MODES)
@pytest.mark.parametrize("name", list(STRUCTURES))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=events, max_streams=st.integers(1, 5))
def test_streams_opening_and_closing_at_random_equal_offline(name: str, step_mode: str, script,
                                                             max_streams: int) -> None:
    model = model_for(name)
    engine = DecodeEngine(model, max_streams, step_mode=step_mode)
    open_: Dict[int, dict] = {}  # sid -> {codes, sent, out}
    done: List[dict] = []
    serial = 0
    with torch.no_grad():
        for action, pick, count in script + [("drain", 0, 0)]:
            sids = sorted(open_)
            if action == "open":
                if len(open_) == max_streams:
                    with pytest.raises(EngineFull):
                        engine.open()
                    continue
                sid = engine.open()
                serial += 1
                open_[sid] = {"codes": random_codes(model, 10, engine, serial), "sent": 0, "out": []}
            elif action == "submit" and sids and pick % 3 == 2:  # the same steps to every stream in one call
                n = min([count] + [10 - open_[sid]["sent"] for sid in sids])
                parts = [steps_of(open_[sid]["codes"], open_[sid]["sent"], n, engine) for sid in sids]
                engine.submit_many(sids, [torch.cat(level, dim=0) for level in zip(*parts)])
                for sid in sids:
                    open_[sid]["sent"] += n
            elif action == "submit" and sids:
                s = open_[sids[pick % len(sids)]]
                n = min(count, 10 - s["sent"])
                engine.submit(sids[pick % len(sids)], steps_of(s["codes"], s["sent"], n, engine))
                s["sent"] += n
            elif action == "step":
                for sid, audio in run_step(engine, batched=pick % 2 == 1).items():
                    open_[sid]["out"].append(audio)
            elif action == "drain" or (action == "close" and sids):
                while action == "drain" and any(engine.pending(sid) for sid in sids):  # run the batch dry
                    for sid, out in run_step(engine, batched=count % 2 == 1).items():
                        open_[sid]["out"].append(out)
                closing = sids if action == "drain" else sids[pick % len(sids):][: 1 + count % 3]
                for sid, rest in close_streams(engine, closing, batched=count % 2 == 0).items():
                    s = open_.pop(sid)
                    s["out"].append(rest)
                    s["codes"] = steps_of(s["codes"], 0, s["sent"], engine)
                    done.append(s)
        for s in done:
            got = torch.cat(s["out"], dim=-1)
            if s["sent"] == 0:
                assert got.shape[-1] == 0
                continue
            want = model.decode(s["codes"])
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= AUDIO_TOL


@pytest.mark.parametrize("step_mode", CPU_STEP_MODES)
def test_a_broken_stream_does_not_touch_the_others(step_mode: str) -> None:
    model = model_for("24khz")
    engine = DecodeEngine(model, 3, step_mode=step_mode)
    sids = [engine.open() for _ in range(3)]
    codes = [random_codes(model, 8, engine, seed) for seed in range(3)]
    outs: Dict[int, list] = {sid: [] for sid in sids}
    with torch.no_grad():
        for sid, c in zip(sids, codes):
            engine.submit(sid, steps_of(c, 0, 6, engine))
        for _ in range(engine.warmup_steps + 1):
            for sid, audio in engine.step().items():
                outs[sid].append(audio)
        # Garbage codes are refused for that stream alone.
        bad = steps_of(codes[1], 6, 1, engine)
        with pytest.raises(ValueError, match="codebook range"):
            engine.submit(sids[1], [bad[0] + model.codebook_size] + bad[1:])
        # A stream whose state went NaN (a failing stream) poisons only its own row.
        row = torch.tensor([sids[1]])
        poisoned = select_rows(engine._batch, row)
        from snac_stream.streaming.rows import assign_rows
        nan_state = _fill(poisoned, float("nan"))
        assign_rows(engine._batch, row, nan_state)  # in place: the steady batch's own tensors
        while engine.pending(sids[0]):
            for sid, audio in engine.step().items():
                outs[sid].append(audio)
        assert torch.isnan(outs[sids[1]][-1]).any()
        engine.abort(sids[1])
        for i in (0, 2):
            got = torch.cat(outs[sids[i]] + [engine.close(sids[i])], dim=-1)
            want = model.decode(steps_of(codes[i], 0, 6, engine))
            assert (got - want).abs().max().item() <= AUDIO_TOL
        # The aborted slot was zeroed: a new stream in it decodes exactly.
        sid = engine.open()
        assert sid == sids[0] or sid == sids[1]
        engine.submit(sid, codes[2])
        parts = []
        while engine.pending(sid):
            parts.extend(engine.step().values())
        got = torch.cat(parts + [engine.close(sid)], dim=-1)
        assert (got - model.decode(codes[2])).abs().max().item() <= AUDIO_TOL


def _fill(state, value: float):
    if isinstance(state, list):
        return [_fill(s, value) for s in state]
    if isinstance(state, torch.Tensor):
        return torch.full_like(state, value) if state.is_floating_point() else state
    if hasattr(state, "__dataclass_fields__"):
        return type(state)(**{k: _fill(getattr(state, k), value) for k in state.__dataclass_fields__})
    return state


def test_limits_and_errors() -> None:
    model = model_for("44khz")
    engine = DecodeEngine(model, 2)
    a, b = engine.open(), engine.open()
    with pytest.raises(EngineFull, match="all 2 stream slots"):
        engine.open()
    with pytest.raises(ValueError, match="whole steps of 4 coarse frames"):
        one_frame = [torch.zeros(1, model.config.coarse_stride // s, dtype=torch.int64) for s in model.vq_strides]
        engine.submit(a, one_frame)
    with pytest.raises(KeyError, match="no open stream"):
        engine.submit(9, random_codes(model, 1, engine, 0))
    assert engine.close(b).shape == (1, 1, 0)
    assert engine.open() == b
    with pytest.raises(ValueError, match="max_streams"):
        DecodeEngine(model, 0)
    assert engine.state_bytes_per_stream > 0 and engine.warmup_steps >= 1


def test_triton_backend_engine_matches_offline() -> None:
    """Per-stream noise positions go through the fused kernel (CPU: Triton's interpreter; CUDA: in graphs)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = copy.deepcopy(model_for("24khz")).to(device)
    engine = DecodeEngine(model, 3, backend="triton", step_mode="graphs" if device.type == "cuda" else "buckets")
    steps = engine.warmup_steps + 4
    codes = [[c.to(device) for c in random_codes(model, steps, engine, s)] for s in (11, 12, 13)]
    sids = [engine.open() for _ in codes]
    outs: Dict[int, list] = {sid: [] for sid in sids}
    with torch.no_grad():
        engine.submit(sids[0], codes[0])
        outs[sids[0]].extend(engine.step().values())  # the streams are one step apart
        engine.submit(sids[1], codes[1])
        # The third stream goes idle inside the bucket for a few steps, then resumes.
        engine.submit(sids[2], steps_of(codes[2], 0, engine.warmup_steps + 1, engine))
        for _ in range(engine.warmup_steps + 3):
            for sid, audio in engine.step().items():
                outs[sid].append(audio)
        engine.submit(sids[2], steps_of(codes[2], engine.warmup_steps + 1, steps - engine.warmup_steps - 1, engine))
        while any(engine.pending(sid) for sid in sids):
            for sid, audio in engine.step().items():
                outs[sid].append(audio)
        model.backend = "torch"
        for sid, c in zip(sids, codes):
            got = torch.cat(outs[sid] + [engine.close(sid)], dim=-1)
            assert (got - model.decode(c)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("engine_type", [DecodeEngine, EncodeEngine])
def test_outputs_on_another_device(engine_type) -> None:
    """``output_device`` moves every output, of batched steps, warm-up steps and close, there (the GPU test
    runs a CUDA engine with host outputs; here a CPU engine with outputs on the shape-only meta device)."""
    model = model_for("24khz")
    engine = engine_type(model, 3, output_device="meta")
    sids = [engine.open() for _ in range(2)]
    steps = engine.warmup_steps + 2
    for sid in sids:
        if engine_type is DecodeEngine:
            engine.submit(sid, random_codes(model, steps, engine, seed=sid))
        else:
            engine.submit(sid, torch.randn(1, 1, steps * engine.step_samples) * 0.1)
    seen = []
    for _ in range(steps):
        for out in engine.step().values():
            seen += out if isinstance(out, list) else [out]
    final = engine.close(sids[0])
    seen += final if isinstance(final, list) else [final]
    assert len(seen) >= 2 * steps and {t.device.type for t in seen} == {"meta"}
    assert model.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; the captured pass is tested on "
                    "the CPU as step_mode='buckets'")
@pytest.mark.parametrize("engine_type", [DecodeEngine, EncodeEngine])
def test_graph_replay_equals_eager(engine_type) -> None:
    """Full-size 24 kHz model: every output of the replayed graphs equals the same bucket pass run eagerly,
    and an engine fed from the host with outputs to the host (``output_device="cpu"``) gives the same results,
    also with ``async_output`` as the server runs it: a step's outputs read only after the next step is
    launched (two in flight), so they must survive the next replay. The streams end in one ``close_many``,
    whose flush is a replayed graph too (read after its ``wait()`` where the engine is asynchronous)."""
    torch.manual_seed(0)
    model = SNAC.from_config("24khz").cuda().eval()
    engines = {mode: engine_type(model, 5, step_mode=mode) for mode in ("graphs", "buckets")}
    engines["host"] = engine_type(model, 5, step_mode="graphs", output_device="cpu")
    engines["async"] = engine_type(model, 5, step_mode="graphs", output_device="cpu", async_output=True)
    assert engines["async"].async_output and not engines["host"].async_output
    engines["graphs"].capture_graphs()
    cfg = model.config
    gen = torch.Generator().manual_seed(5)
    steps = engines["graphs"].warmup_steps + 6
    inputs = []
    for i in range(5):
        if engine_type is DecodeEngine:
            inputs.append([torch.randint(0, cfg.codebook_size, (1, steps * cfg.coarse_stride // s), generator=gen).cuda()
                           for s in cfg.vq_strides])
        else:
            inputs.append((torch.randn(1, 1, steps * engines["graphs"].step_samples + 333, generator=gen) * 0.3).cuda())
    outs = {mode: {} for mode in engines}

    def collect(mode, engine, groups) -> None:
        groups.wait()
        for group_sids, outputs in groups:
            for sid, row in zip(group_sids, engine._rows(outputs)):
                outs[mode].setdefault(sid, []).append(row)

    with torch.inference_mode():
        for mode, engine in engines.items():
            sids = [engine.open() for _ in range(5)]
            feed = ((lambda x: [c.cpu() for c in x] if isinstance(x, list) else x.cpu()) if mode in ("host", "async")
                    else (lambda x: x))
            for i, sid in enumerate(sids):
                if i == 3:
                    continue  # opens later: a warm-up beside the batch, then a join mid-stream
                engine.submit(sid, feed(inputs[i]))
            pending = None
            for t in range(steps + 3):
                if t == 2:
                    engine.submit(sids[3], feed(inputs[3]))
                if t == 4:
                    if pending is not None:  # what was sent before the close is read before it
                        collect(mode, engine, pending)
                        pending = None
                    outs[mode][sids[4]] = [engine.close(sids[4])]  # a slot inside the bucket goes free
                if mode == "async":  # launch this step, then read the one before
                    groups = engine.step_groups()
                    if pending is not None:
                        collect(mode, engine, pending)
                    pending = groups
                    continue
                for sid, out in engine.step().items():
                    outs[mode].setdefault(sid, []).append(out)
            if pending is not None:
                collect(mode, engine, pending)
            if engine_type is EncodeEngine:  # the padded last steps, then only the flush is left
                for sid in sids[:4]:
                    engine.end_input(sid)
                while any(engine.pending(sid) for sid in sids[:4]):
                    collect(mode, engine, engine.step_groups())
            ends = engine.close_many(sids[:4])  # one batched flush: the flush graph of bucket 4
            assert [group for group, _ in ends] == [sids[:4]]
            collect(mode, engine, ends)
    for other, what in (("buckets", "the eager pass"), ("host", "the host-fed engine"),
                        ("async", "the engine returning before its outputs are on the host")):
        assert outs[other].keys() == outs["graphs"].keys()
        for sid in outs[other]:
            for a, b in zip(outs["graphs"][sid], outs[other][sid], strict=True):
                for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b], strict=True):
                    assert y.device.type == ("cuda" if other == "buckets" else "cpu")
                    assert torch.equal(x.cpu(), y.cpu()), f"stream {sid}: graph replay differs from {what}"
    # And each stream still equals its own offline result.
    for i in range(4):
        got = outs["graphs"][i]
        if engine_type is DecodeEngine:
            want = model.decode(inputs[i])
            assert (torch.cat(got, dim=-1) - want).abs().max().item() <= 1e-4
        else:
            want = model.encode(inputs[i])
            assert all(torch.equal(torch.cat([o[k] for o in got], dim=-1), want[k]) for k in range(len(want)))


@pytest.mark.parametrize("step_mode", CPU_STEP_MODES)
def test_streams_warming_up_step_together_by_phase(step_mode: str) -> None:
    """A step runs one pass per phase with a stream due: the streams that have run as many steps share it,
    whenever each started; the steady streams share the batch's. Streams that wait, start late, leave
    (aborted) or end before their first step change nothing for the others, and every stream equals its
    offline decode."""
    model = model_for("24khz")
    engine = DecodeEngine(model, 5, step_mode=step_mode)
    assert engine.warmup_steps >= 2  # phases 0, 1 and 2 below are warm-up phases
    sids = [engine.open() for _ in range(5)]
    steps = engine.warmup_steps + 3
    codes = [random_codes(model, steps, engine, seed=10 + i) for i in range(5)]
    outs: Dict[int, list] = {sid: [] for sid in sids}
    sent = {sid: 0 for sid in sids}

    def feed(which: List[int], n: int = 1) -> None:
        for sid in which:
            engine.submit(sid, steps_of(codes[sid], sent[sid], n, engine))
            sent[sid] += n

    def run() -> List[List[int]]:
        """One step; the stream ids of each of its passes, in order."""
        groups = engine.step_groups()
        groups.wait()
        for ids, outputs in groups:
            for sid, out in zip(ids, engine._rows(outputs)):
                outs[sid].append(out)
        assert groups.warming == sum(1 for ids, _ in groups if engine._slots[ids[0]].steps <= engine.warmup_steps)
        return [list(ids) for ids, _ in groups]

    with torch.no_grad():
        feed(sids[:2])
        assert run() == [sids[:2]]  # both in phase 0
        feed([sids[0], sids[2]])  # sids[1] waits, sids[2] starts
        assert run() == [[sids[0]], [sids[2]]]  # phase 1, then phase 0
        feed(sids[:4])
        assert run() == [[sids[0]], sids[1:3], [sids[3]]]  # phases 2, 1 and 0: one pass each
        feed(sids[4:5])
        engine.abort(sids[3])  # leaves phase 1
        assert engine.close(sids[4]).shape[-1]  # ends with its one step queued, none run
        feed(sids[:3], steps - 3)
        feed(sids[1:3], 1)
        assert all(sent[sid] == steps for sid in sids[:3])
        while any(engine.pending(sid) for sid in sids[:3]):
            run()
        assert all(engine.phase_of(engine._slots[sid]) == engine.warmup_steps for sid in sids[:3])
        for sid in sids[:3]:
            got = torch.cat(outs[sid] + [engine.close(sid)], dim=-1)
            want = model.decode(steps_of(codes[sid], 0, sent[sid], engine))
            assert got.shape == want.shape and (got - want).abs().max().item() <= AUDIO_TOL
    assert engine.active_streams == 0


@pytest.mark.parametrize("engine_type", ["decode", "encode"])
def test_streams_ending_together_share_one_flush(engine_type, monkeypatch: pytest.MonkeyPatch) -> None:
    """Streams in the batch whose steps have all run (an encoder's input ended with ``end_input``, its padded
    remainder stepped) end in one batched flush, padded to a bucket size; a stream still warming up ends on
    its own. Every stream's output equals offline, and its slot is free afterwards."""
    model = model_for("24khz")
    engine = (DecodeEngine if engine_type == "decode" else EncodeEngine)(model, 8, step_mode="buckets")
    empty = copy.deepcopy(engine._batch)
    sids = [engine.open() for _ in range(4)]
    steps = engine.warmup_steps + 3
    inputs = []
    for i, sid in enumerate(sids[:3]):
        if engine_type == "decode":
            inputs.append(random_codes(model, steps, engine, seed=i))
        else:
            inputs.append(torch.randn(1, 1, steps * engine.step_samples - 100 * (i + 1),
                                      generator=torch.Generator().manual_seed(i)) * 0.3)
        engine.submit(sid, inputs[-1])
        if engine_type == "encode":
            engine.end_input(sid)
    outs: Dict[int, list] = {sid: [] for sid in sids}
    with torch.no_grad():
        while any(engine.pending(sid) for sid in sids):
            for sid, out in engine.step().items():
                outs[sid].append(out)
        late = inputs[0] if engine_type == "encode" else steps_of(inputs[0], 0, 1, engine)
        engine.submit(sids[3], late)  # still warming up: ends alone
        flushes: List[int] = []
        flush_rows = engine._flush_rows
        monkeypatch.setattr(engine, "_flush_rows", lambda state: (flushes.append(state_rows(state)),
                                                                   flush_rows(state))[1])
        rests = close_streams(engine, sids, batched=True)
    assert flushes[0] == 4  # three streams, padded to the bucket of 4; then the warming stream's own flush
    assert engine.active_streams == 0
    # Every stream's row zeroed (row 8, the spare row of the bucket passes, holds what they left there).
    assert all(torch.equal(a[:8], b[:8]) for a, b in zip(_tensors(engine._batch), _tensors(empty)))
    for sid, given in zip(sids, inputs + [late]):
        if engine_type == "decode":
            got = torch.cat(outs[sid] + [rests[sid]], dim=-1)
            want = model.decode(given)
            assert got.shape == want.shape and (got - want).abs().max().item() <= AUDIO_TOL
        else:
            got = [torch.cat([o[level] for o in outs[sid] + [rests[sid]]], dim=-1) for level in range(3)]
            assert all(torch.equal(g, w) for g, w in zip(got, model.encode(given)))


def test_submit_many_checks_the_whole_call_before_queueing_anything() -> None:
    """A bad row or piece, a repeated stream or a row count that does not match refuses the call for every
    stream in it: nothing is queued or buffered, and the streams go on as if it never came."""
    model = model_for("24khz")
    dec = DecodeEngine(model, 3)
    sids = [dec.open() for _ in range(3)]
    codes = [torch.cat(level, dim=0) for level in zip(*(random_codes(model, 2, dec, seed) for seed in range(3)))]
    bad = [c.clone() for c in codes]
    bad[2][1, 3] = model.codebook_size  # stream 1's code out of range
    with pytest.raises(ValueError, match="codebook range"):
        dec.submit_many(sids, bad)
    with pytest.raises(ValueError, match="more than once"):
        dec.submit_many([sids[0], sids[0], sids[1]], codes)
    with pytest.raises(ValueError, match="3 rows"):
        dec.submit_many(sids, [c[:2] for c in codes])
    assert [dec.pending(sid) for sid in sids] == [0, 0, 0]
    dec.submit_many(sids, codes)
    assert [dec.pending(sid) for sid in sids] == [2, 2, 2]

    enc = EncodeEngine(model, 3)
    sids = [enc.open() for _ in range(3)]
    pieces = [torch.randn(1, 1, n, generator=torch.Generator().manual_seed(n)) * 0.1 for n in (5000, 1, 2048)]
    with pytest.raises(ValueError, match="NaN"):
        enc.submit_many(sids, [pieces[0], torch.full((1, 1, 7), float("nan")), pieces[2]])
    with pytest.raises(ValueError, match="batch 1"):
        enc.submit_many(sids, [pieces[0], pieces[1], pieces[2].expand(2, 1, -1)])
    with pytest.raises(ValueError, match="3 audio pieces"):
        enc.submit_many(sids, pieces[:2])
    assert [enc.pending(sid) for sid in sids] == [0, 0, 0] and all(enc._slots[sid].received == 0 for sid in sids)
    enc.submit_many(sids, pieces)
    assert [enc.pending(sid) for sid in sids] == [5000 // enc.step_samples, 0, 2048 // enc.step_samples]


def test_the_encoder_buffers_audio_for_a_model_in_a_dtype_numpy_lacks() -> None:
    """The encoder keeps host audio in numpy views; a bfloat16 model's audio (no numpy dtype) is buffered as
    tensors instead, with the same steps queued."""
    model = copy.deepcopy(model_for("24khz")).to(torch.bfloat16)
    engine = EncodeEngine(model, 2)
    sid = engine.open()
    with torch.inference_mode():
        engine.submit(sid, torch.zeros(1, 1, engine.step_samples + 100))
        engine.submit(sid, torch.zeros(1, 1, engine.step_samples))
    assert engine.pending(sid) == 2 and engine._slots[sid].partial.dtype == torch.bfloat16
    assert engine._slots[sid].partial.shape[-1] == 100


# ---- encode ---------------------------------------------------------------------------------------

enc_events = st.lists(st.tuples(st.sampled_from(["open", "open", "submit", "submit", "step", "step", "step", "close",
                                                 "end"]),
                                st.integers(0, 5), st.integers(1, 12000)), min_size=15, max_size=50)


@pytest.mark.parametrize("step_mode", CPU_STEP_MODES)
@pytest.mark.parametrize("name", list(STRUCTURES))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=enc_events, max_streams=st.integers(1, 3))
def test_encode_streams_at_random_equal_offline(name: str, step_mode: str, script, max_streams: int) -> None:
    model = model_for(name)
    engine = EncodeEngine(model, max_streams, step_mode=step_mode)
    open_: Dict[int, dict] = {}
    done: List[dict] = []
    serial = 0
    with torch.no_grad():
        for action, pick, count in script + [("drain", 0, 0)]:
            sids = sorted(open_)
            if action == "open" and len(open_) < max_streams:
                serial += 1
                audio = torch.randn(1, 1, 5 * engine.step_samples + serial * 101,
                                    generator=torch.Generator().manual_seed(serial)) * 0.3
                open_[engine.open()] = {"audio": audio, "sent": 0, "out": []}
            elif action == "end" and sids:  # the input ends; the padded remainder is queued as a step
                open_[sids[pick % len(sids)]]["ended"] = True
                engine.end_input(sids[pick % len(sids)])
            elif action == "submit" and [sid for sid in sids if not open_[sid].get("ended")] and pick % 3 == 2:
                sids = [sid for sid in sids if not open_[sid].get("ended")]  # every stream a different length
                chunks = []
                for i, sid in enumerate(sids):
                    s = open_[sid]
                    chunks.append(s["audio"][..., s["sent"] : s["sent"] + (count * (i + 1)) % 9000])
                    s["sent"] += chunks[-1].shape[-1]
                engine.submit_many(sids, chunks)
            elif action == "submit" and sids and not open_[sids[pick % len(sids)]].get("ended"):
                sid = sids[pick % len(sids)]
                s = open_[sid]
                chunk = s["audio"][..., s["sent"] : s["sent"] + count]
                engine.submit(sid, chunk)
                s["sent"] += chunk.shape[-1]
            elif action == "step":
                for sid, codes in run_step(engine, batched=pick % 2 == 1).items():
                    open_[sid]["out"].append(codes)
            elif action == "drain" or (action == "close" and sids):
                while action == "drain" and any(engine.pending(sid) for sid in sids):  # run the batch dry
                    for sid, out in run_step(engine, batched=count % 2 == 1).items():
                        open_[sid]["out"].append(out)
                closing = sids if action == "drain" else sids[pick % len(sids):][: 1 + count % 3]
                for sid, rest in close_streams(engine, closing, batched=count % 2 == 0).items():
                    s = open_.pop(sid)
                    s["out"].append(rest)
                    done.append(s)
        for s in done:
            got = [torch.cat([o[level] for o in s["out"]], dim=-1) for level in range(model.n_codebooks)]
            if s["sent"] == 0:
                assert all(g.shape[-1] == 0 for g in got)
                continue
            want = model.encode(s["audio"][..., : s["sent"]])
            assert [g.shape for g in got] == [w.shape for w in want]
            assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("step_mode", CPU_STEP_MODES)
def test_encode_engine_isolates_a_garbage_stream(step_mode: str) -> None:
    model = model_for("24khz")
    engine = EncodeEngine(model, 2, step_mode=step_mode)
    a, b = engine.open(), engine.open()
    audio = torch.randn(1, 1, 6 * engine.step_samples, generator=torch.Generator().manual_seed(3)) * 0.3
    outs = []
    with torch.no_grad():
        engine.submit(a, audio)
        with pytest.raises(ValueError, match="NaN"):
            engine.submit(b, torch.full_like(audio, float("nan")))  # refused for b alone
        engine.submit(b, torch.randn(1, 1, 3 * engine.step_samples) * 1e4)  # garbage that passes the checks
        while engine.pending(a):
            outs.append(engine.step()[a])
        outs.append(engine.close(a))
        got = [torch.cat([o[level] for o in outs], dim=-1) for level in range(model.n_codebooks)]
        assert all(torch.equal(g, w) for g, w in zip(got, model.encode(audio)))
        engine.abort(b)


@pytest.mark.parametrize("engine_type", [DecodeEngine, EncodeEngine])
def test_streams_opening_together_share_one_pass_per_step(engine_type) -> None:
    """Warm-up included: N streams that start together cost one batched pass per step, not N."""
    model = model_for("44khz")
    engine = engine_type(model, 3)
    passes = []
    advance = engine._advance
    engine._advance = lambda state, inputs: passes.append(1) or advance(state, inputs)
    cfg, steps = model.config, engine.warmup_steps + 2
    sids = [engine.open() for _ in range(3)]
    with torch.no_grad():
        for sid in sids:
            if engine_type is DecodeEngine:
                engine.submit(sid, [torch.randint(0, cfg.codebook_size, (1, steps * engine.step_frames
                                                                            * cfg.coarse_stride // s))
                                    for s in cfg.vq_strides])
            else:
                engine.submit(sid, torch.randn(1, 1, steps * engine.step_samples) * 0.3)
        for _ in range(steps):
            assert set(engine.step()) == set(sids)
    assert len(passes) == steps


@pytest.mark.parametrize("engine_type", [DecodeEngine, EncodeEngine])
@pytest.mark.parametrize("name", ["24khz", "44khz"])
def test_warm_up_leaves_the_engine_as_it_was(engine_type, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Warm-up runs groups of 1, 2 and all streams (every tile variant a server will meet) and the batched
    flush of ``close_many`` at every bucket size, then leaves the engine empty and zeroed."""
    model = model_for(name)
    engine = engine_type(model, 3, step_mode="buckets")
    before = copy.deepcopy(engine._batch)
    groups: List[int] = []
    flushes: List[int] = []
    advance, flush_rows = engine._advance, engine._flush_rows
    monkeypatch.setattr(engine, "_advance", lambda state, inputs: (groups.append(engine.active_streams),
                                                                    advance(state, inputs))[1])
    monkeypatch.setattr(engine, "_flush_rows", lambda state: (flushes.append(state_rows(state)),
                                                               flush_rows(state))[1])
    with torch.no_grad():
        engine.warm_up()
        assert sorted(set(groups)) == [1, 2, 3]
        assert set(engine.flush_buckets) <= set(flushes)
        assert engine.active_streams == 0
        # Every slot's row as it was (the spare row after them holds what the bucket passes left there).
        slots = engine.max_streams
        assert all(torch.equal(a[:slots], b[:slots]) for a, b in zip(_tensors(engine._batch), _tensors(before)))
        sid = engine.open()
        with pytest.raises(RuntimeError, match="no open streams"):
            engine.warm_up()
        engine.abort(sid)


def _tensors(state) -> List[torch.Tensor]:
    from snac_stream.streaming.rows import _map_state
    found: List[torch.Tensor] = []
    _map_state(lambda v: found.append(getattr(v, "position", v)) if not isinstance(v, int) else None, state)
    return [t for t in found if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("engine_type", [DecodeEngine, EncodeEngine])
def test_a_stream_closing_after_warm_up_meets_no_new_layer_shape(engine_type, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU server warms its engines up before serving; a layer shape first met later compiles Triton kernels
    while every session waits (seconds). Streams of any length that end with steps queued and (encoder) a
    partial step buffered must run only conv shapes that ``warm_up`` ran."""
    from snac_stream.model import functional

    model = model_for("24khz")
    engine = engine_type(model, 3, step_mode="buckets")
    seen: set = set()

    def describe(name: str, value):
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        return type(value).__name__ if name == "noise_start" else value  # a position, not a shape

    def recorder(name: str, fn):
        def call(*args, **kwargs):
            seen.add((name, tuple(describe("", a) for a in args),
                      tuple(sorted((k, describe(k, v)) for k, v in kwargs.items()))))
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(functional, "conv", recorder("conv", functional.conv))
    monkeypatch.setattr(functional, "conv_transpose", recorder("conv_transpose", functional.conv_transpose))
    cfg, gen = model.config, torch.Generator().manual_seed(5)
    with torch.no_grad():
        engine.warm_up()
        warm, closing = set(seen), set()
        for queued, extra in [(0, 1), (1, 777), (2, engine.step_samples - 1), (1, 0)]:
            steps = engine.warmup_steps + 2 + queued
            sid = engine.open()
            if engine_type is DecodeEngine:
                engine.submit(sid, [torch.randint(0, cfg.codebook_size, (1, steps * engine.step_frames
                                                                            * cfg.coarse_stride // s), generator=gen)
                                    for s in cfg.vq_strides])
            else:
                engine.submit(sid, torch.randn(1, 1, steps * engine.step_samples + extra, generator=gen) * 0.3)
            while engine.pending(sid) > queued:
                engine.step()
            seen.clear()
            engine.close(sid)
            closing |= seen
    assert closing, "the recorder saw no conv"
    assert closing <= warm, f"shapes first met at a close: {sorted(closing - warm)}"


@pytest.mark.parametrize("name", ["24khz", "44khz"])
def test_codes_submitted_as_frames_decode_as_offline(name: str) -> None:
    """``submit_frames`` (each coarse frame's codes of every level side by side, as a server hands them over;
    numpy arrays and tensors, in pieces of whole steps) decodes each stream as offline ``decode`` does, 4
    coarse frames a step included (44 kHz); its checks refuse the whole call before queueing anything."""
    model = model_for(name)
    cpf = model.config.codes_per_frame
    engine = DecodeEngine(model, 2)
    sids = [engine.open() for _ in range(2)]
    steps = engine.warmup_steps + 2
    given = [random_codes(model, steps, engine, seed) for seed in (1, 2)]
    codes = [torch.cat(level, dim=0) for level in zip(*given)]
    frames = codes_to_frames([c.numpy() for c in codes], cpf)
    assert all(torch.equal(torch.from_numpy(f), c) for f, c in zip(frames_to_codes(frames, cpf), codes))
    bad = frames.copy()
    bad[1, -1, -1] = model.codebook_size
    with pytest.raises(ValueError, match="codebook range"):
        engine.submit_frames(sids, bad)
    with pytest.raises(TypeError, match="integers"):
        engine.submit_frames(sids, frames.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        engine.submit_frames(sids, frames[:, :, :-1])
    if engine.step_frames > 1:
        with pytest.raises(ValueError, match="whole steps"):
            engine.submit_frames(sids, frames[:, :-1])
    assert [engine.pending(sid) for sid in sids] == [0, 0]
    half = steps // 2 * engine.step_frames  # in two calls, the second a tensor
    engine.submit_frames(sids, frames[:, :half])
    engine.submit_frames(sids, torch.from_numpy(frames[:, half:]))
    assert [engine.pending(sid) for sid in sids] == [steps, steps]
    outs: Dict[int, list] = {sid: [] for sid in sids}
    with torch.no_grad():
        for _ in range(steps):
            for sid, out in engine.step().items():
                outs[sid].append(out)
        for sid, codes_of_stream in zip(sids, given):
            got = torch.cat(outs[sid] + [engine.close(sid)], dim=-1)
            want = model.decode(codes_of_stream)
            assert got.shape == want.shape and (got - want).abs().max().item() <= AUDIO_TOL


def test_an_output_map_applies_to_what_step_groups_and_close_return() -> None:
    """``output_map`` runs on the model's device before outputs move: ``step_groups``, ``close`` and
    ``close_many`` return its results (here audio and its negation); ``step()``, which splits the engine's own
    outputs per stream, refuses such an engine rather than mis-split them."""
    model = model_for("24khz")
    plain, mapped = DecodeEngine(model, 2), DecodeEngine(model, 2, output_map=lambda audio: [audio, -audio])
    codes = random_codes(model, plain.warmup_steps + 2, plain, seed=4)
    sids = {}
    for engine in (plain, mapped):
        sids[engine] = [engine.open(), engine.open()]
        engine.submit_many(sids[engine], [torch.cat([c, c]) for c in codes])
    with pytest.raises(RuntimeError, match="step_groups"):
        mapped.step()
    with torch.no_grad():
        for _ in range(plain.warmup_steps + 1):
            (_, want), = plain.step_groups()
            (_, got), = mapped.step_groups()
            assert torch.equal(got[0], want) and torch.equal(got[1], -want)
        want, got = plain.close(sids[plain][0]), mapped.close(sids[mapped][0])
        assert torch.equal(got[0], want) and torch.equal(got[1], -want)
        (_, want), = plain.close_many([sids[plain][1]])
        (_, got), = mapped.close_many([sids[mapped][1]])
        assert torch.equal(got[0], want) and torch.equal(got[1], -want)


def test_samples_submitted_as_arrays_encode_as_offline_and_are_checked_as_tensors_are() -> None:
    """``EncodeEngine.submit_arrays`` (1-D numpy samples, as a server's input arrives) buffers what
    ``submit_many`` buffers from the same samples as tensors, in pieces of any size, and each stream's codes equal
    offline ``encode``; a NaN, an ended or repeated stream, a wrong type or a missing piece refuses the whole call
    and buffers nothing."""
    model = model_for("24khz")
    engine = EncodeEngine(model, 3)
    sids = [engine.open() for _ in range(3)]
    rng = np.random.default_rng(5)
    given = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (5 * 2048 + 300, 3 * 2048, 4 * 2048 + 1)]
    bad = given[1].copy()
    bad[7] = np.nan
    for call, error in (((sids, [given[0], bad, given[2]]), "NaN"), (([sids[0], sids[0]], given[:2]), "more than once"),
                        ((sids, given[:2]), "3 audio pieces")):
        with pytest.raises(ValueError, match=error):
            engine.submit_arrays(*call)
    for wrong in (given[0].reshape(1, 1, -1), (given[0] * 32768).astype(np.int16), torch.from_numpy(given[0])):
        with pytest.raises(TypeError, match="1-D numpy float"):
            engine.submit_arrays(sids, [wrong, given[1], given[2]])
    assert [engine.pending(sid) for sid in sids] == [0, 0, 0] and all(engine._slots[s].received == 0 for s in sids)
    # A whole step with nothing buffered (queued as it is), pieces short of a step, a whole step after some.
    cuts = [0, 2048, 3048, 3048 + 2048, 3048 + 2048 + 17, 4 * 2048, None]
    for lo, hi in zip(cuts, cuts[1:]):
        engine.submit_arrays(sids, [x[lo:hi] for x in given])
    outs: Dict[int, list] = {sid: [] for sid in sids}
    with torch.no_grad():
        while any(engine.pending(sid) for sid in sids):
            for sid, out in engine.step().items():
                outs[sid].append(out)
        for sid in sids:
            engine.end_input(sid)
        rests = {sid: engine.close(sid) for sid in sids}
        for sid, samples in zip(sids, given):
            got = [torch.cat([o[level] for o in outs[sid] + [rests[sid]]], dim=-1) for level in range(3)]
            want = model.encode(torch.from_numpy(samples).view(1, 1, -1))
            assert all(torch.equal(g, w) for g, w in zip(got, want))
    ended = engine.open()
    engine.end_input(ended)
    with pytest.raises(ValueError, match="has ended"):
        engine.submit_arrays([ended], [given[0]])


@pytest.mark.parametrize("max_streams", [1, 2, 3, 31, 32, 33, 100, 2048, 3000])
def test_bucket_sizes_fit_any_count_closely(max_streams: int) -> None:
    """Every count of streams due has a bucket; from 32 streams on, the smallest that holds them is at most a
    quarter larger (powers of two alone would be up to twice as large); below, a power of two."""
    sizes = bucket_sizes(max_streams)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_streams and sizes[0] == 1
    for count in range(1, max_streams + 1):
        bucket = next(k for k in sizes if k >= count)
        if count > 32:
            assert bucket <= count * 5 / 4 or bucket == max_streams, (count, bucket)
        else:
            assert bucket < 2 * count or bucket == max_streams, (count, bucket)
    octaves = max(0, (max_streams - 1).bit_length() - 5)  # those that start at 32 or above, below max_streams
    assert len(sizes) <= 5 + 4 * octaves + 1  # 1, 2, 4, 8, 16; four per octave; max_streams


@pytest.mark.parametrize("engine_type", [DecodeEngine, EncodeEngine])
def test_streams_due_at_different_times_step_in_passes_their_size(engine_type) -> None:
    """A server's clients fall due at different times: each step runs only the streams with a step queued, in
    a pass as large as the smallest bucket that holds them, whatever their slots (here the highest ones), and
    every stream's output equals its own offline decode or encode. The pass is the one "graphs" captures."""
    model = model_for("24khz")
    engine = engine_type(model, 8, step_mode="buckets")
    cfg, steps = model.config, engine.warmup_steps + 6
    sids = [engine.open() for _ in range(8)]
    inputs, outs = {}, {sid: [] for sid in sids}
    gen = torch.Generator().manual_seed(3)
    for sid in sids:
        if engine_type is DecodeEngine:
            inputs[sid] = random_codes(model, steps, engine, seed=sid)
        else:
            inputs[sid] = torch.randn(1, 1, steps * engine.step_samples, generator=gen) * 0.3
    sizes = []
    advance = engine._advance
    engine._advance = lambda state, x: sizes.append(state_rows(state)) or advance(state, x)

    def feed(sid: int, k: int) -> None:
        if engine_type is DecodeEngine:
            engine.submit(sid, steps_of(inputs[sid], k, 1, engine))
        else:
            engine.submit(sid, inputs[sid][..., k * engine.step_samples:(k + 1) * engine.step_samples])

    with torch.no_grad():
        for k in range(engine.warmup_steps + 1):  # every stream warms up and joins the batch
            for sid in sids:
                feed(sid, k)
            for sid, out in engine.step().items():
                outs[sid].append(out)
        done = {sid: engine.warmup_steps + 1 for sid in sids}
        for due in ([6, 7], [5], [0, 1, 2, 3, 4, 5, 6], [7], [0, 1, 2, 3, 4, 5, 6, 7]):
            sizes.clear()
            for sid in due:
                feed(sid, done[sid])
                done[sid] += 1
            stepped = engine.step()
            assert sorted(stepped) == due
            assert sizes == [next(k for k in engine.buckets if k >= len(due))]
            for sid, out in stepped.items():
                outs[sid].append(out)
        for sid in sids:
            while done[sid] < steps:
                feed(sid, done[sid])
                done[sid] += 1
                outs[sid].append(engine.step()[sid])
            outs[sid].append(engine.close(sid))
    for sid in sids:
        if engine_type is DecodeEngine:
            got = torch.cat(outs[sid], dim=-1)
            torch.testing.assert_close(got, model.decode(inputs[sid]), rtol=0, atol=AUDIO_TOL)
        else:
            got = [torch.cat([o[level] for o in outs[sid]], dim=-1) for level in range(model.n_codebooks)]
            assert all(torch.equal(g, w) for g, w in zip(got, model.encode(inputs[sid])))


@pytest.mark.parametrize("ids", [[], [0], [5, 2, 9, 2], list(range(300))])
def test_index_on_gives_the_ids_as_an_int64_index(ids: List[int]) -> None:
    """The rows an engine step gathers and writes back, as the index tensor it uses (here on the CPU; the GPU
    test below checks that on CUDA it is made without waiting for the stream)."""
    rows = index_on(ids, torch.device("cpu"))
    assert rows.dtype == torch.int64 and rows.tolist() == ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU test above checks the values)")
def test_gpu_index_on_does_not_wait_for_the_work_queued_on_the_stream() -> None:
    """With a long kernel in flight, ``index_on`` returns before it ends (``torch.tensor(ids, device="cuda")``
    would synchronize the stream), and the index arrives intact behind it."""
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of the GPU spinning
    busy_until = torch.cuda.Event()
    busy_until.record()
    rows = index_on(list(range(1000)), torch.device("cuda"))
    assert not busy_until.query(), "index_on waited for the kernel in flight"
    assert torch.equal(rows.cpu(), torch.arange(1000))


@pytest.mark.parametrize("dim", [0, -1])
def test_cat_to_joins_host_pieces_in_order(dim: int) -> None:
    """Numpy arrays and CPU tensors, some not contiguous, joined into one new tensor (here on the CPU, the
    path that on CUDA joins into pinned memory; the GPU test below checks that it does not wait there)."""
    gen = np.random.default_rng(abs(dim))
    pieces: List = [gen.standard_normal((2, 1, 9), dtype=np.float32)[..., ::3] for _ in range(4)]
    pieces[1] = torch.from_numpy(np.ascontiguousarray(pieces[1]))
    want = torch.cat([torch.as_tensor(np.ascontiguousarray(p)) for p in pieces], dim=dim)
    joined = cat_to(pieces, torch.device("cpu"), dim=dim)
    assert joined.dtype == torch.float32 and torch.equal(joined, want)
    pieces[2][...] = 0  # a new tensor, not a view of a piece
    assert torch.equal(joined, want)
    as_numpy = [np.ascontiguousarray(p) for p in pieces]
    assert torch.equal(cat_to(as_numpy, torch.device("cpu"), dim=dim),  # numpy alone: joined by numpy
                       torch.cat([torch.from_numpy(p) for p in as_numpy], dim=dim))
    mixed = as_numpy[:2] + [as_numpy[2].astype(np.float64) + 1e-12] + as_numpy[3:]  # promoted, as torch.cat does
    joined = cat_to(mixed, torch.device("cpu"), dim=dim)
    assert joined.dtype == torch.float64 and torch.equal(joined, torch.cat([torch.from_numpy(p) for p in mixed], dim=dim))
    uneven = [as_numpy[0], np.concatenate(as_numpy[1:], axis=dim)]  # pieces of other lengths
    assert torch.equal(cat_to(uneven, torch.device("cpu"), dim=dim),
                       torch.cat([torch.from_numpy(p) for p in as_numpy], dim=dim))
    halves = [torch.from_numpy(p).bfloat16() for p in as_numpy]  # a dtype numpy lacks
    assert torch.equal(cat_to(halves, torch.device("cpu"), dim=dim), torch.cat(halves, dim=dim))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU test above checks the joining)")
def test_gpu_cat_to_stages_host_pieces_without_waiting_for_the_stream() -> None:
    """A step's audio (numpy pieces and CPU tensors, megabytes) joined and sent to the GPU while a long kernel
    runs: ``cat_to`` returns before the kernel ends, and the data arrives joined in order."""
    pieces = [np.random.default_rng(k).standard_normal((1, 1, 2048), dtype=np.float32) for k in range(1024)]
    pieces[3] = torch.from_numpy(pieces[3].copy())
    want = torch.cat([torch.as_tensor(p) for p in pieces])
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of the GPU spinning
    busy_until = torch.cuda.Event()
    busy_until.record()
    joined = cat_to(pieces, torch.device("cuda"))
    assert not busy_until.query(), "cat_to waited for the kernel in flight"
    assert torch.equal(joined.cpu(), want)
    assert torch.equal(cat_to([p[..., :5] for p in pieces[:3]], torch.device("cuda"), dim=-1).cpu(),
                       torch.cat([torch.as_tensor(p[..., :5]) for p in pieces[:3]], dim=-1))


def _state_leaves(state) -> List[object]:
    from snac_stream.streaming.rows import _map_state

    found: List[object] = []
    _map_state(found.append, state)
    return found


@pytest.mark.parametrize("name,kind", [("24khz", "encode"), ("24khz", "decode"), ("44khz", "encode"),
                                       ("44khz", "decode")])
def test_deferred_joins_write_the_same_state_into_the_batch(name: str, kind: str) -> None:
    """A push under ``deferred_joins`` keeps its new state tensors as the pieces they join (views), and
    ``assign_rows`` writes those pieces into a batch's rows: the batch ends up bit for bit as when the push
    copies them into tensors first. Pushes of one or two engine steps reach a cache that keeps part of the old
    cache and the new input (two pieces) and caches copied from the input's last frames. Outside the context,
    and in another thread while it is active, nothing is deferred."""
    import threading

    from snac_stream.streaming.build import decoder_op, encoder_op
    from snac_stream.streaming.ops import Joined, deferred_joins
    from snac_stream.streaming.rows import assign_rows, batch_positions, zero_rows

    model = model_for(name)
    cfg = model.config
    body = encoder_op(model) if kind == "encode" else decoder_op(model)
    cpu = torch.device("cpu")

    def step_input(batch: int, steps: int) -> torch.Tensor:
        if kind == "encode":
            return torch.randn(batch, 1, steps * cfg.pad_multiple) * 0.1
        return torch.randn(batch, cfg.resolved_latent_dim, steps * cfg.pad_multiple // cfg.hop_length)

    rng = np.random.default_rng(3)
    rows = torch.tensor([4, 1, 2])
    plain_state = body.init_state(len(rows), cpu, torch.float32)
    deferred_state = copy.deepcopy(plain_state)
    pieces_seen = set()

    def joins_of_a_push(found: List[bool]) -> None:
        state = body.init_state(1, cpu, torch.float32)
        with torch.inference_mode(), model.on_backend("torch"):
            body.push(state, step_input(1, 1))
        found.append(any(isinstance(v, Joined) for v in _state_leaves(state)))

    with torch.inference_mode(), model.on_backend("torch"):
        for _ in range(6):
            x = step_input(len(rows), int(rng.integers(1, 3)))
            plain_out = body.push(plain_state, x)
            assert not any(isinstance(v, Joined) for v in _state_leaves(plain_state))
            in_thread: List[bool] = []
            with deferred_joins():
                deferred_out = body.push(deferred_state, x.clone())
                probe = threading.Thread(target=joins_of_a_push, args=(in_thread,))
                probe.start()
                probe.join()
            assert in_thread == [False]
            pieces_seen.update(len(v.parts) for v in _state_leaves(deferred_state) if isinstance(v, Joined))
            for a, b in zip(*(out if kind == "encode" else [out] for out in (plain_out, deferred_out)), strict=True):
                assert torch.equal(a, b)
            # Batches of the state's new shapes (they grow over a stream's first steps).
            plain_batch, deferred_batch = (batch_positions(zero_rows(plain_state, 6), 6, cpu) for _ in range(2))
            assign_rows(plain_batch, rows, plain_state)
            assign_rows(deferred_batch, rows, deferred_state)
            for a, b in zip(_state_leaves(plain_batch), _state_leaves(deferred_batch), strict=True):
                if isinstance(a, torch.Tensor):
                    assert torch.equal(a, b)
            # The next push starts from the rows written.
            plain_state, deferred_state = select_rows(plain_batch, rows), select_rows(deferred_batch, rows)
    # A 44 kHz step is a whole attention window, more frames than any cache holds: each is copied from the input.
    assert 2 in pieces_seen or name == "44khz"


@pytest.mark.parametrize("name,kind,backend", [("24khz", "decode", "torch"), ("24khz", "encode", "torch"),
                                               ("44khz", "decode", "torch"), ("24khz", "decode", "triton"),
                                               ("24khz", "encode", "triton")])  # 44 kHz in the interpreter: minutes
def test_a_steady_step_in_place_leaves_the_batch_as_a_gathered_one(name: str, kind: str, backend: str) -> None:
    """A steady step of rows of a batch, in place (``rows_in_place``: the convs read their contexts through the
    row list and renew them in those rows) or gathered (``select_rows``, pushed under ``deferred_joins``, written
    back by ``assign_rows``): the same outputs and the same batch afterwards, bit for bit, step after step. Rows
    out of order and a subset of the batch; the rows not stepped are untouched. On the Triton backend (the
    interpreter on the CPU) the depthwise and residual kernels read the rows themselves. A push that would change
    a context's length in place is refused."""
    from snac_stream.kernels.rows import RowsOf
    from snac_stream.streaming.build import decoder_op, encoder_op
    from snac_stream.streaming.ops import SlidingWindow, deferred_joins
    from snac_stream.streaming.rows import assign_rows, batch_positions, rows_in_place, zero_rows

    # On a GPU the Triton cases run there (the kernels' CUDA code); the interpreter runs them on the CPU.
    device = torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
    model = copy.deepcopy(model_for(name)).to(device)
    cfg = model.config
    body = encoder_op(model) if kind == "encode" else decoder_op(model)
    cpu = torch.device("cpu")
    engine = (EncodeEngine if kind == "encode" else DecodeEngine)(model, 1)
    step_frames = engine.step_samples if kind == "encode" else engine.step_frames * cfg.pad_multiple // cfg.hop_length

    def step_input(batch: int) -> torch.Tensor:
        if kind == "encode":
            return torch.randn(batch, 1, step_frames, device=device) * 0.1
        return torch.randn(batch, cfg.resolved_latent_dim, step_frames, device=device)

    torch.manual_seed(5)
    with torch.inference_mode(), model.on_backend(backend):
        warm = body.init_state(6, device, torch.float32)
        for _ in range(engine.warmup_steps):  # into the steady phase: the states keep their shapes from here
            body.push(warm, step_input(6))
        batch = batch_positions(zero_rows(warm, 6), 6, device)
        assign_rows(batch, torch.arange(6, device=device), warm)
        other = copy.deepcopy(batch)
        rows, others = torch.tensor([4, 1, 2], device=device), torch.tensor([0, 3, 5], device=device)
        untouched = select_rows(batch, others)
        for _ in range(2):  # the second step reads what the first wrote in place
            x = step_input(len(rows))
            in_place = rows_in_place(batch, rows)
            assert any(isinstance(v, RowsOf) for v in _state_leaves(in_place))
            assert state_rows(in_place) == len(rows)  # counted through the contexts' row lists too
            out_in_place = body.push(in_place, x)
            assign_rows(batch, rows, in_place, counters=False)
            gathered = select_rows(other, rows)
            with deferred_joins():
                out_gathered = body.push(gathered, x.clone())
            assign_rows(other, rows, gathered, counters=False)
            for a, b in zip(*(out if kind == "encode" else [out] for out in (out_in_place, out_gathered)), strict=True):
                assert torch.equal(a, b)
            for a, b in zip(_state_leaves(batch), _state_leaves(other), strict=True):
                if isinstance(a, torch.Tensor):
                    assert torch.equal(a, b)
        for a, b in zip(_state_leaves(select_rows(batch, others)), _state_leaves(untouched)):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)
    # A push that leaves frames unconsumed (a strided conv given an odd count) would change the context's length.
    conv = SlidingWindow.conv(torch.nn.Conv1d(4, 4, 4, stride=2, padding=1))
    state = conv.init_state(3, cpu, torch.float32)
    conv.push(state, torch.randn(3, 4, 4))
    state.context = RowsOf(torch.cat([state.context] * 2), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="must keep its length: 3 frames in, 4 consumed"):
        conv.push(state, torch.randn(3, 4, 3))


def test_engine_capacity_profile_splits_kernel_time_by_author() -> None:
    """``bench/engine_capacity.py --profile`` reports the share of the step's GPU time in the project's Triton
    kernels, cuBLAS's products and PyTorch's own kernels (the data movement around them), from kernel names as
    the profiler gives them."""
    from types import SimpleNamespace

    from helpers import load_bench

    module = load_bench("engine_capacity")
    events = [SimpleNamespace(name=n, device_time=t) for n, t in (
        ("_snake_conv_kernel", 600.0), ("_snake_dwconv_kernel", 200.0),
        ("sm80_xmma_gemm_f32f32_f32f32_f32_tn_n_tilesize128x128x8", 100.0),
        ("void at::native::index_elementwise_kernel<128, 4, index_copy_kernel_impl>", 60.0),
        ("void at::native::vectorized_gather_kernel<16, long>", 30.0), ("Memcpy DtoD (Device -> Device)", 10.0))]
    assert module.kernel_shares(events) == pytest.approx({"triton": 80.0, "cublas": 10.0, "pytorch": 10.0})
    assert module.kernel_shares([]) == {}


def test_engine_capacity_reference_window_steps_time_each_count_and_stop_at_the_first_out_of_memory() -> None:
    """``bench/engine_capacity.py --reference`` times the reference's Orpheus-style window batched over each
    stream count, ascending: the window decodes 4 coarse frames of every stream and keeps each stream's newest
    frame. From the first count that runs out of memory on, the counts read None; any other error is raised."""
    from helpers import SMALL_CONFIGS, load_bench, make_reference

    module = load_bench("engine_capacity")
    config = SMALL_CONFIGS["24k_like"]
    ref, cfg = make_reference(config, 0), SNAC(**config).config
    cpu = torch.device("cpu")
    seen = []
    decode = ref.decode

    def recording(codes):
        seen.append([c.shape for c in codes])
        audio = decode(codes)
        assert audio.shape == (codes[0].shape[0], 1, 4 * cfg.frame_samples)
        return audio

    ref.decode = recording
    steps = module.reference_window_steps(ref, cfg, [2, 1, 2], cpu)
    assert list(steps) == [1, 2] and all(ms > 0 for ms in steps.values())
    assert {tuple(s[0] for s in shapes) for shapes in seen} == {(1, 1, 1), (2, 2, 2)}
    assert {tuple(s[1] for s in shapes) for shapes in seen} == {tuple(4 * cfg.coarse_stride // v
                                                                      for v in cfg.vq_strides)}

    def short_of_memory(codes):
        if codes[0].shape[0] >= 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB.")
        return decode(codes)

    ref.decode = short_of_memory
    steps = module.reference_window_steps(ref, cfg, [1, 2, 4], cpu)
    assert steps[1] > 0 and steps[2] is None and steps[4] is None

    def broken(codes):
        raise RuntimeError("shapes do not match")

    ref.decode = broken
    with pytest.raises(RuntimeError, match="shapes do not match"):
        module.reference_window_steps(ref, cfg, [1], cpu)


def test_a_deferred_state_pushed_again_reads_its_pieces_joined() -> None:
    """Two pushes inside one ``deferred_joins`` (the second reads the caches the first left as pieces) give
    the outputs and the state two plain pushes give: a piece list read again is joined, not misread."""
    from snac_stream.streaming.build import decoder_op
    from snac_stream.streaming.ops import Joined, deferred_joins

    model = model_for("24khz")
    body = decoder_op(model)
    cpu = torch.device("cpu")
    latent = torch.randn(2, model.config.resolved_latent_dim, 12)
    plain, deferred = body.init_state(2, cpu, torch.float32), body.init_state(2, cpu, torch.float32)
    with torch.inference_mode(), model.on_backend("torch"):
        want = [body.push(plain, latent[..., :4]), body.push(plain, latent[..., 4:])]
        with deferred_joins():
            first = body.push(deferred, latent[..., :4])
            assert any(isinstance(v, Joined) and len(v.parts) == 2 for v in _state_leaves(deferred))
            got = [first, body.push(deferred, latent[..., 4:])]
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(_state_leaves(plain), _state_leaves(deferred), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b.tensor() if isinstance(b, Joined) else b)


def test_step_trace_reads_nvidia_smi_samples_and_summarises_replays() -> None:
    """``bench/step_trace.py`` (GPU only) judges a step near its budget at the GPU's loaded clock: its pure
    parts, on the CPU. nvidia-smi's CSV lines become clock, power, temperature and throttle reasons (lines it
    cannot read, such as "[N/A]" fields, are left out); replay times become p50/p95/min/max."""
    from helpers import load_bench

    module = load_bench("step_trace")
    samples = module.smi_samples(["1755 MHz, 699.30 W, 58, 0x0000000000000004", "garbage",
                                  "1980 MHz, [N/A], 40, 0x0000000000000000", "1980 MHz, 183.13 W, 39, 0x0"])
    assert samples == [{"sm_mhz": 1755.0, "power_w": 699.3, "temp_c": 58.0, "throttle": "0x0000000000000004"},
                       {"sm_mhz": 1980.0, "power_w": 183.13, "temp_c": 39.0, "throttle": "0x0"}]
    times = [float(t) for t in range(100, 0, -1)]
    assert module.summary(times) == {"p50_ms": 51.0, "p95_ms": 96.0, "min_ms": 1.0, "max_ms": 100.0}
