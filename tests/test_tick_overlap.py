"""The engine thread's tick (server.worker.EngineSet) with its steps overlapping the host work: a lane's step
is launched, the previous step's outputs are sent while it runs, and the last one launched is sent by the
next tick. On the CPU a launch runs the step, so these tests check the order and bookkeeping the GPU relies
on: every frame once, in order, exact; a step under way when its session fails elsewhere leaves the others'
outputs whole. The GPU side (outputs copied to the host behind the step) is tested in test_engine.py.
"""

from __future__ import annotations

import gc
from typing import Dict, List

import numpy as np
import torch

from snac_stream import PRESETS, SNAC
from snac_stream.model.vq import codes_to_frames
from snac_stream.protocol import HEADER_BYTES, PAYLOAD_AUDIO, PAYLOAD_TOKENS, Hello, OutputFrame, audio_payload
from snac_stream.server.lanes import with_pcm16
from snac_stream.server.heap import GC_CLOCK, SERVING_GC_THRESHOLDS, freeze_heap, thaw_heap
from snac_stream.server.session import Session
from snac_stream.server.stats import new_stats
from snac_stream.server.worker import EngineSet
from snac_stream.tokens import get_layout


def tiny_model() -> SNAC:
    torch.manual_seed(5)
    return SNAC(**{**PRESETS["24khz"].to_dict(), "encoder_dim": 4, "decoder_dim": 16}).eval()


def open_sessions(engines: EngineSet, model: SNAC, kinds: List[str]) -> List[Session]:
    sessions = []
    for number, kind in enumerate(kinds, 1):
        session = Session(None, number)  # type: ignore[arg-type]
        session.hello = Hello(kind=kind)
        session.layout = get_layout(session.hello.token_layout, model.config)
        session.audio_format = "float32"
        engines.open(session)
        sessions.append(session)
    return sessions


def inbox_frames(codes: List[torch.Tensor], cfg) -> np.ndarray:
    """Codes per level (1, t_i) as the connection side hands them to the engines: coarse frames, flattened."""
    return codes_to_frames([c.numpy() for c in codes], cfg.codes_per_frame).reshape(-1)


def random_codes(cfg, rng: np.random.Generator, streams: int, coarse_frames: int) -> List[torch.Tensor]:
    """Random codes per level (streams, coarse_frames * r_i) for a model of config ``cfg``."""
    return [torch.from_numpy(rng.integers(0, cfg.codebook_size, (streams, coarse_frames * cfg.coarse_stride // s)))
            for s in cfg.vq_strides]


def frames_by_session(events) -> Dict[Session, List[OutputFrame]]:
    out: Dict[Session, List[OutputFrame]] = {}
    for session, message in events:
        assert isinstance(message, bytes), message
        out.setdefault(session, []).append(OutputFrame.unpack(message, "float32"))
    return out


def test_each_tick_leaves_its_last_step_running_and_the_next_sends_it_in_order() -> None:
    """Roundtrip and decode sessions fed a random number of steps per tick: every tick but an idle one keeps
    one step under way ("more to do"); the frames come once each, in stream order, and the audio equals
    offline decoding of the same codes (roundtrip: of offline encoding)."""
    model = tiny_model()
    engines = EngineSet(model, 4, new_stats())
    assert not engines.keep_running  # CPU steps are synchronous: each tick sends its own steps' outputs
    engines.keep_running = True  # as on a GPU, where a launch returns while the step runs
    step, frames = engines.step_samples, engines.step_frames
    cfg = model.config
    rng = np.random.default_rng(0)
    talk, play = open_sessions(engines, model, ["roundtrip", "decode"])
    steps = 9
    audio = (0.2 * rng.standard_normal(steps * step)).astype(np.float32)
    codes = random_codes(cfg, rng, 1, steps * frames)
    got: Dict[Session, List[OutputFrame]] = {talk: [], play: []}
    fed = 0
    kept_running = 0
    while fed < steps:
        n = int(rng.integers(1, 3))
        for k in range(fed, min(steps, fed + n)):
            talk.loop.received += step
            talk.inbox.append((audio[k * step:(k + 1) * step], talk.loop.received, 0.0))
            piece = [c[:, k * c.shape[-1] // steps:(k + 1) * c.shape[-1] // steps] for c in codes]
            play.loop.received += sum(p.shape[-1] for p in piece)
            play.inbox.append((inbox_frames(piece, cfg), play.loop.received, 0.0))
        fed = min(steps, fed + n)
        for _ in range(n):  # one step per lane a tick: ticks until this batch of input has run
            events, _, _, busy = engines.tick([], [talk, play], [])
            assert busy  # a step is left running (or input is queued)
            kept_running += len(engines._launched)
            for session, frames_ in frames_by_session(events).items():
                got[session].extend(frames_)
    events, _, _, busy = engines.tick([], [], [])  # no input: the step under way is sent, nothing left
    assert not busy and not engines._launched and events  # the last step's frames came with the idle tick
    for session, frames_ in frames_by_session(events).items():
        got[session].extend(frames_)
    assert kept_running > 0
    with torch.inference_mode():
        expected_play = model.decode(codes)[0, 0].numpy()
        talk_codes = model.encode(torch.from_numpy(audio).view(1, 1, -1))
        expected_talk = model.decode(talk_codes)[0, 0].numpy()
    for session, expected in ((play, expected_play), (talk, expected_talk)):
        audio_frames = [f for f in got[session] if f.payload_kind == PAYLOAD_AUDIO]
        starts = [f.start for f in audio_frames]
        assert starts == sorted(starts) and len(set(starts)) == len(starts)  # once each, in order
        pcm = np.concatenate([f.data for f in audio_frames])
        assert pcm.size == starts[-1] + audio_frames[-1].data.size
        assert np.abs(pcm - expected[: pcm.size]).max() <= 1e-5
    tokens = np.concatenate([f.data for f in got[talk] if f.payload_kind == PAYLOAD_TOKENS])
    np.testing.assert_array_equal(tokens, talk.layout.to_flat(talk_codes)[0].numpy()[: tokens.size])
    assert tokens.size and all(f.payload_kind == PAYLOAD_AUDIO for f in got[play])  # decode: audio only


def test_each_steps_frames_leave_as_soon_as_its_outputs_are_sent() -> None:
    """With ``on_events`` (the server's hand-off to its event loop), a step's frames are handed over when its
    outputs are sent, not at the tick's end: a roundtrip's audio from the decoder step kept running since the
    tick before leaves before this tick's encoder step is waited for. Handed and returned events together are
    the frames of a tick that hands nothing over, in the same order."""
    model = tiny_model()
    step = EngineSet(model, 1, new_stats()).step_samples
    steps = 10  # the tiny model's first audio comes from its 6th step (its delay)
    audio = (0.2 * np.random.default_rng(1).standard_normal(steps * step)).astype(np.float32)

    def run(hand_over: bool):
        engines = EngineSet(model, 2, new_stats())
        engines.keep_running = True  # as on a GPU
        handed: List[list] = []
        if hand_over:
            engines.on_events = handed.append
        audio_handed: Dict[str, List[int]] = {"submit": [], "finish": []}  # by the encoder's submit, finish
        submit, finish = engines.encode.submit, engines.encode.finish

        def count(when: str) -> None:
            audio_handed[when].append(sum(
                OutputFrame.unpack(m, "float32").payload_kind == PAYLOAD_AUDIO for batch in handed for _, m in batch))

        engines.encode.submit = lambda sessions, events: (  # type: ignore[method-assign]
            sessions and count("submit"), submit(sessions, events))[1]
        engines.encode.finish = lambda *args: (count("finish"), finish(*args))[1]  # type: ignore[method-assign]
        (talk,) = open_sessions(engines, model, ["roundtrip"])
        frames = []
        for k in range(steps):
            talk.loop.received += step
            talk.inbox.append((audio[k * step:(k + 1) * step], talk.loop.received, 0.0))
            returned, *_ = engines.tick([], [talk], [])
            frames += [m for batch in handed for _, m in batch] + [m for _, m in returned]
            handed.clear()
        returned, *_ = engines.tick([], [], [])
        frames += [m for batch in handed for _, m in batch] + [m for _, m in returned]
        return [OutputFrame.unpack(m, "float32") for m in frames], audio_handed

    frames, handed = run(True)
    plain, plain_handed = run(False)
    assert plain_handed == {"submit": [0] * steps, "finish": [0] * steps}
    # Once audio comes, each tick hands over the frame of the decoder step before it by its encoder's finish
    # (after its own submit and launch, which keep the GPU busy meanwhile).
    assert handed == {"submit": [0] * steps, "finish": [0] * 6 + [1] * (steps - 6)}
    key = lambda f: (f.payload_kind, f.start, f.flags, f.data.tobytes())  # noqa: E731
    assert [key(f) for f in frames] == [key(f) for f in plain] and frames


def test_the_encoders_codes_reach_the_decoder_as_a_batch_or_per_stream_alike() -> None:
    """``DecodeLane.feed`` queues a batch of whole steps for streams holding no frames as it is (one engine
    call), and otherwise per stream (here: one session's stream dropped meanwhile): the same steps and step
    markers either way."""
    model = tiny_model()
    cfg = model.config
    rng = np.random.default_rng(2)
    codes = random_codes(cfg, rng, 3, 2)
    queued = []
    for drop in (False, True):
        engines = EngineSet(model, 3, new_stats())
        sessions = open_sessions(engines, model, ["roundtrip"] * 3)
        lane = engines.decode
        if drop:
            lane.abort(sessions[1])
        per_stream_calls: List[int] = []
        queue = lane._queue
        lane._queue = lambda *args: (per_stream_calls.append(1), queue(*args))[1]  # type: ignore[method-assign]
        marks = [[(2, (10 * j, 0.5))] for j in range(3)]
        lane.feed(sessions, codes, marks)
        assert per_stream_calls == ([1] if drop else [])
        kept = [0, 2] if drop else [0, 1, 2]
        slots = [engines.decoder._slot(lane._streams[sessions[j]].sid) for j in kept]
        queued.append([(j, [np.asarray(item).copy() for item in slot.queue], list(lane._streams[sessions[j]].markers))
                       for j, slot in zip(kept, slots)])
    whole, per_stream = queued
    assert [j for j, _, _ in per_stream] == [0, 2]
    for j, items, markers in per_stream:
        _, want_items, want_markers = whole[j]
        assert markers == want_markers == [(10 * j, 0.5)] * (2 // engines.step_frames)
        assert len(items) == len(want_items) == 2 // engines.step_frames
        assert all(np.array_equal(a, b) for a, b in zip(items, want_items))


def test_a_session_ended_while_its_step_runs_leaves_the_others_outputs_whole() -> None:
    """A decode step is under way for three sessions when one of them is dropped (as a failure in the same
    tick drops it): the next tick sends the other two their frames, exact, and nothing to the dropped one."""
    model = tiny_model()
    engines = EngineSet(model, 4, new_stats())
    engines.keep_running = True  # as on a GPU
    cfg = model.config
    frames = 3 * engines.step_frames  # three steps: the first two's audio waits for the decoder's look-ahead
    rng = np.random.default_rng(1)
    sessions = open_sessions(engines, model, ["decode", "decode", "decode"])
    given = {}
    for session in sessions:
        codes = random_codes(cfg, rng, 1, frames)
        given[session] = codes
        session.loop.received += sum(c.shape[-1] for c in codes)
        session.inbox.append((inbox_frames(codes, cfg), session.loop.received, 0.0))
    engines.tick([], sessions, [])  # one step a tick
    engines.tick([], [], [])
    engines.tick([], [], [])
    assert len(engines._launched) == 1  # the third step launched, not yet sent
    dropped = sessions[1]
    engines.abort(dropped)
    events, _, _, busy = engines.tick([], [], [])
    got = frames_by_session(events)
    assert dropped not in got and set(got) == {sessions[0], sessions[2]} and not busy
    with torch.inference_mode():
        for session in (sessions[0], sessions[2]):
            expected = model.decode(given[session])[0, 0].numpy()
            frame = got[session][0]
            assert frame.data.size
            assert np.abs(frame.data - expected[frame.start: frame.start + frame.data.size]).max() <= 1e-5


def test_each_tick_records_where_the_engine_thread_spent_it() -> None:
    """A tick that sent outputs records (duration, the engine thread's CPU time, time blocked on the GPU);
    the load test splits them into CPU, blocked and the rest (lock or core waits)."""
    from snac_stream.server.loadtest import _tick_parts

    model = tiny_model()
    stats = new_stats()
    engines = EngineSet(model, 2, stats)
    (play,) = open_sessions(engines, model, ["decode"])
    cfg = model.config
    rng = np.random.default_rng(2)
    codes = random_codes(cfg, rng, 1, 3 * engines.step_frames)
    play.loop.received += sum(c.shape[-1] for c in codes)
    play.inbox.append((inbox_frames(codes, cfg), play.loop.received, 0.0))
    GC_CLOCK.install()
    for _ in range(2):
        engines.tick([], [play], [])
    engines.tick([lambda events: gc.collect()], [play], [])  # a full collection inside the third tick
    assert len(stats["tick_parts_s"]) == len(stats["tick_s"]) == 3
    for (wall, cpu, blocked, collecting), tick_s in zip(stats["tick_parts_s"], stats["tick_s"]):
        assert wall == tick_s and blocked == 0.0  # the CPU computes its steps: nothing to wait for
        assert 0 < cpu <= wall + 0.01  # thread CPU time has a coarser clock than the wall
        assert 0 <= collecting <= wall
    assert stats["tick_parts_s"][2][3] > 0
    # What each tick did: one stream-step each, a warm-up pass while the stream warms up.
    work = list(stats["tick_work"])
    assert [w[1:3] for w in work] == [p[:2] for p in stats["tick_parts_s"]]
    assert [w[0] for w in work] == sorted(w[0] for w in work)
    assert [w[3:] for w in work] == [(1, int(k < engines.decoder.warmup_steps), 0) for k in range(3)]
    parts = _tick_parts([(0.010, 0.004, 0.003, 0.0), (0.020, 0.012, 0.009, 0.002)])
    assert parts["cpu"]["max"] == 12 and parts["blocked"]["p50"] == 6 and parts["gc"]["max"] == 2
    assert np.allclose([parts["rest"]["p50"], parts["rest"]["max"]], [1.5, 3.0])  # 3 and 0 (never negative)
    assert _tick_parts([]) is None


def test_ticks_are_reported_by_duration_with_the_work_they_carried() -> None:
    """The load test's account of what the long ticks did: bands of tick duration, each band's means, and
    when streams last warmed up."""
    from snac_stream.server.loadtest import _tick_work

    # 100 ticks: 98 short ones stepping 10 streams, a long one with 3 warm-up passes, a longer one ending 5 sessions.
    work = [(float(k), 0.010, 0.008, 10, 0, 0) for k in range(98)]
    work += [(98.0, 0.050, 0.045, 12, 3, 0), (99.0, 0.080, 0.070, 10, 0, 5)]
    report = _tick_work(work)
    bands = report["by_duration"]
    assert [band["ticks"] for band in bands.values()] == [98, 0, 1, 1]
    assert bands["p0-p50"] == {"ticks": 98, "tick_ms": 10.0, "cpu_ms": 8.0, "stream_steps": 10.0,
                               "warmup_passes": 0.0, "sessions_ended": 0.0}
    assert bands["p95-p99"]["warmup_passes"] == 3 and bands["p95-p99"]["tick_ms"] == 50.0
    assert bands["p99-p100"]["sessions_ended"] == 5 and bands["p99-p100"]["cpu_ms"] == 70.0
    assert report["warmup_passes"] == 3 and report["sessions_ended"] == 5 and report["last_warmup_s"] == 98.0
    assert _tick_work(work[:98])["last_warmup_s"] is None
    assert _tick_work([]) is None


def test_serving_heap_is_frozen_with_raised_thresholds_and_collections_are_timed() -> None:
    """freeze_heap freezes what is alive, raises the collector's thresholds and times collections; thaw_heap
    restores the thresholds (and unfreezes)."""
    before = gc.get_threshold()
    freeze_heap()
    try:
        assert gc.get_threshold() == SERVING_GC_THRESHOLDS and gc.get_freeze_count() > 0
        seconds, full = GC_CLOCK.seconds, GC_CLOCK.collections[2]
        gc.collect()
        assert GC_CLOCK.seconds > seconds and GC_CLOCK.collections[2] == full + 1
        assert GC_CLOCK.report()["collections"][2] == full + 1
    finally:
        thaw_heap()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_pcm16_converted_where_the_audio_is_equals_the_host_conversion() -> None:
    """``with_pcm16`` (a GPU server's decode engines convert their audio to PCM16 on the device) gives the
    integers ``audio_payload`` gives on the host: ties rounded to even, NaN to 0, out of range and infinities
    saturated; and a tick's PCM16 frames from an engine with it are byte for byte those of one without."""
    edge = np.array([0.0, -0.0, 1.0, -1.0, 1.5, -1.5, np.nan, np.inf, -np.inf, 0.5 / 32768, 1.5 / 32768,
                     -2.5 / 32768, 32767.5 / 32768, -32768.5 / 32768, 3e-8], dtype=np.float32)
    noise = (np.random.default_rng(3).standard_normal(4096) * 0.7).astype(np.float32)
    for samples in (edge, noise):
        audio = torch.from_numpy(samples).view(1, 1, -1)
        got = with_pcm16(audio)
        assert got[0] is audio and got[1].dtype == torch.int16
        np.testing.assert_array_equal(got[1].view(-1).numpy(), audio_payload(samples, "pcm16"))

    model = tiny_model()
    cfg = model.config
    rng = np.random.default_rng(4)
    codes = random_codes(cfg, rng, 1, 5)
    sent = []
    for mapped in (False, True):
        engines = EngineSet(model, 2, new_stats())
        engines.decoder.output_map = with_pcm16 if mapped else None
        (play,) = open_sessions(engines, model, ["decode"])
        play.audio_format = "pcm16"
        play.inbox.append((inbox_frames(codes, cfg), 35, 0.0))
        events: list = []
        for _ in range(6):
            events += engines.tick([], [play] if not events else [], [])[0]
        sent.append([message[HEADER_BYTES:] for _, message in events])  # the samples, after each frame's header
    assert sent[0] and sent[0] == sent[1]


def test_sessions_end_without_waiting_for_the_steps_in_flight() -> None:
    """Roundtrip and decode sessions flushed at random ticks while steps run (a step kept running into each
    next tick, as on a GPU): a tick taking new ends sends nothing early; each stream ends once its own steps
    have been sent, its end launched like a step and sent in turn. Every session gets its frames once, in
    order, exact through the end (offline encode and decode of the same input), then ``done`` last, in the
    tick that reports it ended."""
    model = tiny_model()
    cfg = model.config
    rng = np.random.default_rng(7)
    engines = EngineSet(model, 6, new_stats())
    engines.keep_running = True  # as on a GPU
    step, frames = engines.step_samples, engines.step_frames
    kinds = ["roundtrip", "decode", "roundtrip", "decode", "roundtrip"]
    sessions = open_sessions(engines, model, kinds)
    audio = {s: (0.2 * rng.standard_normal(int(rng.integers(3, 8)) * step + int(rng.integers(0, step)))
                 ).astype(np.float32) for s in sessions if s.kind == "roundtrip"}
    codes = {s: random_codes(cfg, rng, 1, int(rng.integers(3, 8)) * frames) for s in sessions if s.kind == "decode"}
    sent_at_end: List[int] = []  # steps and ends under way when a lane's streams were asked to end
    for lane in engines.lanes:
        end_streams = lane.end_streams
        lane.end_streams = lambda ending, events, end_streams=end_streams: (  # type: ignore[method-assign]
            sent_at_end.append(sum(not launched.final for launched in engines._launched)),
            end_streams(ending, events))[1]
    fed = {s: 0 for s in sessions}
    got: Dict[Session, list] = {s: [] for s in sessions}
    ended_in: Dict[Session, int] = {}
    tick = 0
    while len(ended_in) < len(sessions):
        ready, ending = [], []
        for session in sessions:
            if session.flush_at is not None:
                continue
            if session.kind == "roundtrip":
                total, piece = audio[session].size, int(rng.integers(1, 2 * step))
                chunk = audio[session][fed[session]: fed[session] + piece]
                if chunk.size:
                    fed[session] += chunk.size
                    session.loop.received += chunk.size
                    session.inbox.append((chunk, session.loop.received, 0.0))
                    ready.append(session)
            else:
                total = codes[session][0].shape[-1]
                k = min(total, fed[session] + int(rng.integers(1, 3)) * frames)
                piece = [c[:, fed[session] * c.shape[-1] // total: k * c.shape[-1] // total] for c in codes[session]]
                if k > fed[session]:
                    session.loop.received += sum(p.shape[-1] for p in piece)
                    session.inbox.append((inbox_frames(piece, cfg), session.loop.received, 0.0))
                    fed[session] = k
                    ready.append(session)
            if fed[session] == total and rng.random() < 0.5:
                session.flush_at = (session.loop.received, 0.0)
                ending.append(session)
        events, _, ended, busy = engines.tick([], ready, ending)
        tick += 1
        for session, message in events:
            got[session].append(message)
        for session in ended:  # done is its last message, sent in this tick
            assert session not in ended_in and '"done"' in [m for s, m in events if s is session][-1]
            ended_in[session] = tick
        assert tick < 200
    assert max(sent_at_end) >= 1  # some ends came while a step was under way, and did not wait for it
    assert not engines._launched and not engines._ending
    assert engines.encoder.active_streams == engines.decoder.active_streams == 0
    with torch.inference_mode():
        for session in sessions:
            *frames_, done = got[session]
            assert isinstance(done, str) and '"done"' in done
            out = [OutputFrame.unpack(m, "float32") for m in frames_]
            finals = [f.final for f in out]
            assert finals[-1] and finals == sorted(finals)  # the end's frames come last
            audio_frames = [f for f in out if f.payload_kind == PAYLOAD_AUDIO]
            starts = [f.start for f in audio_frames]
            assert starts == sorted(starts) and len(set(starts)) == len(starts)
            pcm = np.concatenate([f.data for f in audio_frames])
            if session.kind == "decode":
                expected = model.decode(codes[session])[0, 0].numpy()
            else:
                signal_ = torch.from_numpy(audio[session]).view(1, 1, -1)
                expected = model.decode(model.encode(signal_))[0, 0].numpy()[: audio[session].size]
                tokens = np.concatenate([f.data for f in out if f.payload_kind == PAYLOAD_TOKENS])
                np.testing.assert_array_equal(tokens, session.layout.to_flat(model.encode(signal_))[0].numpy())
            assert pcm.size == expected.size
            assert np.abs(pcm - expected).max() <= 1e-5


def test_a_slot_freed_while_its_step_runs_goes_to_a_new_session_without_that_steps_output() -> None:
    """An abort and an open in one tick need no wait for the step in flight: the new session may take the
    aborted session's slot, and the step launched for the old one, sent afterwards, goes to nobody."""
    model = tiny_model()
    cfg = model.config
    engines = EngineSet(model, 1, new_stats())
    engines.keep_running = True  # as on a GPU
    (old,) = open_sessions(engines, model, ["decode"])
    codes = random_codes(cfg, np.random.default_rng(3), 1, 8 * engines.step_frames)
    old.loop.received += sum(c.shape[-1] for c in codes)
    old.inbox.append((inbox_frames(codes, cfg), old.loop.received, 0.0))
    for _ in range(7):
        engines.tick([], [old] if _ == 0 else [], [])
    assert len(engines._launched) == 1  # a step of the old session under way
    new = Session(None, 9)  # type: ignore[arg-type]
    new.hello = Hello(kind="decode")
    new.layout = get_layout(new.hello.token_layout, cfg)
    new.audio_format = "float32"
    events, results, _, _ = engines.tick([lambda events: engines.abort(old), lambda events: engines.open(new)], [], [])
    assert results == [None, None] and engines.decode._streams[new].sid == 0  # the old session's slot
    events += engines.tick([], [], [])[0]
    assert not events and not engines._launched


def test_a_roundtrips_tokens_leave_once_the_decoder_step_they_feed_is_launched() -> None:
    """On a GPU the decoder's step waits for the encoder's codes, not for the token frames made of them: those
    are sent after the decoder's launch, while it runs, and within the same tick. On the CPU (a launch runs
    the step) they are sent before it."""
    model = tiny_model()
    step = EngineSet(model, 1, new_stats()).step_samples
    steps = 8
    audio = (0.2 * np.random.default_rng(8).standard_normal(steps * step)).astype(np.float32)

    def tokens(batches) -> int:
        return sum(OutputFrame.unpack(m, "float32").payload_kind == PAYLOAD_TOKENS for batch in batches for _, m in batch)

    def run(keep_running: bool):
        engines = EngineSet(model, 2, new_stats())
        engines.keep_running = keep_running
        handed: List[list] = []
        engines.on_events = handed.append
        at_launch: List[int] = []
        launch = engines.decode.launch
        engines.decode.launch = lambda events, carried_s=0.0: (  # type: ignore[method-assign]
            at_launch.append(tokens(handed + [events])), launch(events, carried_s))[1]
        (talk,) = open_sessions(engines, model, ["roundtrip"])
        after_tick = []
        for k in range(steps):
            talk.loop.received += step
            talk.inbox.append((audio[k * step:(k + 1) * step], talk.loop.received, 0.0))
            returned, *_ = engines.tick([], [talk], [])
            after_tick.append(tokens(handed + [returned]))
        return at_launch, after_tick

    at_launch, after_tick = run(True)
    assert after_tick == sorted(after_tick) and after_tick[-1] > 0
    assert at_launch == [0] + after_tick[:-1]  # this tick's tokens not yet sent when its decoder step launched
    assert sum(a < b for a, b in zip(at_launch, after_tick)) >= steps // 2  # ... and sent by the tick's end
    at_launch, after_tick = run(False)
    assert at_launch == after_tick  # the CPU: sent before the launch
