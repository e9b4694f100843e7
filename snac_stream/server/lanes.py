"""The engine lanes: one per engine, the sessions' streams on it. Engine thread only.

:class:`Lane` is the mechanism every engine shares: a session's stream opens, takes input, runs in the
batched step (outputs converted once per batch and sent as frames, each tagged with the marker of the input
that completed its step), ends in one batched ``close_many`` with every other stream ending in the same
tick, or is aborted. :class:`EncodeLane` (audio in, tokens out) and :class:`DecodeLane` (codes in, audio
out) say what their input and output are. A roundtrip session holds a stream on both: the encode lane feeds
its codes to the decode lane (:meth:`Lane.feeds`), and its decoder stream ends after its encoder stream.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..engine import DecodeEngine, EncodeEngine, StepGroups, StreamEngine
from ..model.vq import codes_to_frames
from ..protocol import FLAG_FINAL, PAYLOAD_AUDIO, PAYLOAD_TOKENS, ProtocolError, audio_payload, dumps, pack_output_frame
from .session import Events, Marker, Session

log = logging.getLogger("snac_stream.server")

BEHIND_REPEAT_S = 5.0  # at most one "behind" warning per session this often
# The engine threads of several devices count into the server's one stats dict; `+=` on it is not atomic.
_STATS_LOCK = threading.Lock()

# Ends a session after a failure in its share of a tick (every stream of it, on every lane).
Fail = Callable[[Session, Events, Exception], None]


@dataclass
class _Stream:
    """A session's stream on one lane."""

    sid: int
    markers: Deque[Marker] = field(default_factory=collections.deque)  # one per step queued or under way, oldest first
    held: Optional[np.ndarray] = None  # decode: coarse frames (flattened) short of a whole step
    closing: bool = False  # its slot is freed, the rest of its output under way (``Lane.end_streams``)


def _take_rows(outputs: Any, rows: List[int]) -> Any:
    """Rows ``rows`` of a step's batched outputs (a tensor, or codes per level)."""
    index = torch.tensor(rows)
    if isinstance(outputs, (list, tuple)):
        return [o.index_select(0, index.to(o.device)) for o in outputs]
    return outputs.index_select(0, index.to(outputs.device))


@dataclass
class Launched:
    """A lane's engine step under way, or (``final``) the end of some of its streams: its outputs
    (``StepGroups``), the sessions of each group's rows as they were at the launch, the host's time launching
    it and the step time of the lane upstream it carries (roundtrip sessions' compute)."""

    lane: "Lane"
    groups: StepGroups
    members: List[List[Session]]
    launch_s: float
    carried_s: float
    final: bool = False


class Lane:
    """One engine and the streams of the sessions on it.

    ``kinds``: the session kinds holding a stream here; ``input_kinds``: those whose client input comes here
    (the others' comes from the lane upstream). ``step_items``: the input one engine step takes, in this
    lane's unit (samples, or coarse frames).
    """

    name = "?"  # the lane's label in metrics
    kinds: Tuple[str, ...] = ()
    input_kinds: Tuple[str, ...] = ()

    def __init__(self, engine: StreamEngine, fail: Fail, step_items: int):
        self.engine = engine
        self.fail = fail
        self.step_items = step_items
        self.upstream: Optional[Lane] = None
        self.downstream: Optional[Lane] = None
        self._streams: Dict[Session, _Stream] = {}
        self.last_batch = 0  # streams the latest step that ran stepped
        self._by_sid: Dict[int, Session] = {}
        # While a list: what a step's outputs send to the clients, once the lane downstream has its input,
        # waits here (see EngineSet.tick) instead of running in ``finish``.
        self.deferred: Optional[List[Callable[[], None]]] = None

    def feeds(self, lane: "Lane") -> None:
        """Send the output of sessions holding a stream on both lanes on to ``lane`` as its input."""
        self.downstream, lane.upstream = lane, self

    # ---- streams --------------------------------------------------------------------------------------
    def open(self, session: Session) -> None:
        """Open the session's stream here if its kind uses this lane; raises ``EngineFull``."""
        if session.kind in self.kinds:
            sid = self.engine.open()
            self._streams[session] = _Stream(sid)
            self._by_sid[sid] = session

    def holds(self, session: Session) -> bool:
        """Whether the session has a stream here: opened, and not aborted, nor ended with its last output
        sent."""
        return session in self._streams

    def pending(self, session: Session) -> int:
        """Whole steps queued for the session's stream."""
        return self.engine.pending(self._streams[session].sid)

    def busy(self) -> bool:
        """Whether any stream has a step queued."""
        return self.engine.queued_any(self._by_sid)

    def abort(self, session: Session) -> None:
        """Drop the session's stream (if any) without running the rest (or sending the rest of a closing one)."""
        stream = self._streams.pop(session, None)
        if stream is not None and not stream.closing:  # a closing stream's slot is freed, maybe taken again
            self._by_sid.pop(stream.sid, None)
            self.engine.abort(stream.sid)

    # ---- input ----------------------------------------------------------------------------------------
    def submit(self, sessions: Sequence[Session], events: Events) -> None:
        """Submit the queued client input (``Session.take_inbox``) of ``sessions`` (of ``input_kinds``)."""
        raise NotImplementedError

    def feed(self, sessions: Sequence[Session], outputs: Any, marks: Sequence[Sequence[Tuple[int, Marker]]]) -> None:
        """Take the lane upstream's output for ``sessions`` as their input."""
        raise NotImplementedError(f"{type(self).__name__} takes no other lane's output")

    def end_input(self, session: Session) -> None:
        """The session's input has ended (flush): queue what the engine holds short of a step, if it does."""

    def _mark_steps(self, session: Session, before: int, marks: Sequence[Tuple[int, Marker]]) -> None:
        """Tag each step the new input completes with the marker of the piece that completed it. ``before``:
        the stream's input (in ``step_items`` units) before it; ``marks``: (input up to the end of a piece,
        counted from ``before``; that piece's marker), ascending."""
        markers = self._streams[session].markers
        done = before // self.step_items
        for upto, marker in marks:
            steps = (before + upto) // self.step_items
            markers.extend([marker] * (steps - done))
            done = steps

    # ---- steps ----------------------------------------------------------------------------------------
    def launch(self, events: Events, carried_s: float = 0.0) -> Optional["Launched"]:
        """Start one engine step of every stream with a step queued (on a GPU it runs while the caller does
        other work; :meth:`finish` sends its outputs). ``carried_s``: the lane upstream's step time, part of
        the compute time of the sessions it fed. None if no stream has a step queued. A failure of the step as
        a whole (not of one stream's input, which the engines refuse at submit) ends every session on this
        lane with ``internal_error``; the server goes on serving."""
        if not self.busy():
            return None
        t0 = time.perf_counter()
        try:
            groups = self.engine.step_groups()
        except Exception as exc:  # noqa: BLE001
            self._fail_all(exc, events)
            return None
        if not groups:
            return None
        by_sid = self._by_sid
        members = [[by_sid[sid] for sid in sids] for sids, _ in groups]
        return Launched(self, groups, members, time.perf_counter() - t0, carried_s)

    def finish(self, launched: "Launched", events: Events) -> float:
        """Wait for a launched step's outputs, or a stream end's, and send them per batch; returns the step's
        time (seconds). Sessions that ended since the launch (they failed in between) are left out; a stream
        end's sessions are detached once their output is sent."""
        try:
            step_s = max(launched.launch_s, launched.groups.wait())
        except Exception as exc:  # noqa: BLE001 - a device fault surfaces where its work is awaited
            if launched.final:
                for sessions in launched.members:
                    for session in sessions:
                        if self._streams.pop(session, None) is not None:
                            self.fail(session, events, exc)
            self._fail_all(exc, events)
            return 0.0
        if launched.final:
            self._send_ends(launched, step_s, events)
            return step_s
        self.last_batch = 0
        streams = self._streams
        for (_, outputs), members in zip(launched.groups, launched.members):
            sessions, outputs = self._held_rows(members, outputs)
            if not sessions:
                continue
            self.last_batch += len(sessions)
            markers, compute = [], []
            for session in sessions:
                markers.append(streams[session].markers.popleft())
                if session.kind in self.input_kinds:
                    session.consumed += self._input_per_step(session)
                    compute.append(step_s)
                else:
                    compute.append(step_s + launched.carried_s)
            self.emit(sessions, outputs, markers, compute, events)
        return step_s

    def _send_ends(self, launched: "Launched", step_s: float, events: Events) -> None:
        """Send the rest of the output of the streams a ``final`` launch ended, and detach them."""
        for (_, outputs), members in zip(launched.groups, launched.members):
            sessions, outputs = self._held_rows(members, outputs)
            if not sessions:
                continue
            self.emit(sessions, outputs, [s.flush_at for s in sessions],  # type: ignore[misc]
                      [step_s] * len(sessions), events, final=True)
            for session in sessions:
                self._streams.pop(session, None)

    def _held_rows(self, sessions: List[Session], outputs: Any) -> Tuple[List[Session], Any]:
        """The sessions of a group's rows that still hold their stream here, and those rows of ``outputs``."""
        live = [j for j, session in enumerate(sessions) if session in self._streams]
        if len(live) == len(sessions):
            return sessions, outputs
        return [sessions[j] for j in live], (_take_rows(outputs, live) if live else outputs)

    def _fail_all(self, exc: Exception, events: Events) -> None:
        log.error("engine step failed; ending the %d sessions on it", len(self._by_sid), exc_info=exc)
        error = ProtocolError("internal_error", f"internal error: {type(exc).__name__}")
        for session in list(self._by_sid.values()):
            self.fail(session, events, error)

    def _input_per_step(self, session: Session) -> int:
        """Client input items (samples, or tokens) one step consumes."""
        raise NotImplementedError

    # ---- output ---------------------------------------------------------------------------------------
    def emit(self, sessions: Sequence[Session], outputs: Any, markers: Sequence[Marker], compute_s: Sequence[float],
             events: Events, final: bool = False) -> None:
        """Send row ``j`` of the batched ``outputs`` to ``sessions[j]`` as frames; ``final``: the stream's end."""
        raise NotImplementedError

    @staticmethod
    def _frame(kind: int, start: int, marker: Marker, compute_s: float, data: np.ndarray, final: bool) -> bytes:
        server_us = (time.perf_counter() - marker[1]) * 1e6
        return pack_output_frame(kind, start, marker[0], int(server_us), int(compute_s * 1e6), data,
                                 FLAG_FINAL if final else 0)

    # ---- stream ends ----------------------------------------------------------------------------------
    def end_streams(self, ending: Sequence[Session], events: Events) -> Optional["Launched"]:
        """End the streams of the flushed ``ending`` sessions whose steps have all run and been sent (and whose
        stream upstream has ended, its output sent), all in one batched ``close_many``. Returns that end as a
        launch (``final``): its output, queued behind the steps in flight rather than waited for here, is sent
        by :meth:`finish` like a step's, and the streams are held until then. A failure ends those sessions
        only."""
        closing = [s for s in ending if self._may_end(s, events)]
        if not closing:
            return None
        t0 = time.perf_counter()
        sids = [self._streams[s].sid for s in closing]
        try:
            groups = self.engine.close_many(sids)
        except Exception as exc:  # noqa: BLE001 - close_many freed every slot of the call
            for sid, session in zip(sids, closing):
                self._by_sid.pop(sid, None)
                del self._streams[session]
                self.fail(session, events, exc)
            return None
        for sid, session in zip(sids, closing):  # every slot of the call is free now
            self._by_sid.pop(sid, None)
            self._streams[session].closing = True
        by_sid = dict(zip(sids, closing))
        members = [[by_sid[sid] for sid in group] for group, _ in groups]
        return Launched(self, groups, members, time.perf_counter() - t0, 0.0, final=True)

    def _may_end(self, session: Session, events: Events) -> bool:
        stream = self._streams.get(session)
        return (stream is not None and not stream.closing and not stream.markers and not self.pending(session)
                and not (self.upstream is not None and self.upstream.holds(session))
                and self._ends_whole(session, events))

    def _ends_whole(self, session: Session, events: Events) -> bool:
        """Whether the stream may end here; if not, the session has been failed."""
        return True


class EncodeLane(Lane):
    """Audio in, tokens out: encode and roundtrip sessions. Their codes go on to the lane it feeds."""

    name = "encode"
    kinds = ("encode", "roundtrip")
    input_kinds = ("encode", "roundtrip")

    def __init__(self, engine: EncodeEngine, fail: Fail, stats: Dict[str, Any], behind_warning_s: float):
        super().__init__(engine, fail, engine.step_samples)
        self.stats = stats
        self.behind_warning_s = behind_warning_s

    def submit(self, sessions: Sequence[Session], events: Events) -> None:
        """Each session's queued audio, all sessions in one engine call."""
        members: List[Tuple[Session, List[Any], np.ndarray]] = []
        for session in sessions:
            pieces = session.take_inbox()
            if self.holds(session) and pieces:
                audio = pieces[0][0] if len(pieces) == 1 else np.concatenate([p[0] for p in pieces])
                members.append((session, pieces, audio))
        if not members:
            return
        submit = self.engine.submit_arrays  # type: ignore[attr-defined]
        try:
            submit([self._streams[m[0]].sid for m in members], [m[2] for m in members])
        except Exception:  # noqa: BLE001 - refused as a whole: one by one, so that only a session at fault ends
            accepted = []
            for member in members:
                try:
                    submit([self._streams[member[0]].sid], [member[2]])
                    accepted.append(member)
                except Exception as exc:  # noqa: BLE001
                    self.fail(member[0], events, exc)
            members = accepted
        for session, pieces, _ in members:
            before = pieces[0][1] - pieces[0][0].size  # samples received before these pieces
            self._mark_steps(session, before, [(end - before, (end, t_recv)) for _, end, t_recv in pieces])

    def end_input(self, session: Session) -> None:
        stream = self._streams.get(session)
        if stream is not None and self.engine.end_input(stream.sid):  # type: ignore[attr-defined]
            stream.markers.append(session.flush_at)  # type: ignore[arg-type]

    def _input_per_step(self, session: Session) -> int:
        return self.step_items

    def emit(self, sessions: Sequence[Session], outputs: Any, markers: Sequence[Marker], compute_s: Sequence[float],
             events: Events, final: bool = False) -> None:
        """Codes (per level (len(sessions), t_i), on the host): a roundtrip session's go on to the decode lane
        first, its step waiting on them; then the tokens, converted once per token layout in use (put off to
        :attr:`deferred` when it is a list, for a step: they are sent while the decoder's step runs)."""
        codes: List[torch.Tensor] = outputs
        if not codes[0].shape[-1]:
            return
        self._feed_downstream(sessions, codes, markers, events)
        if self.deferred is not None and not final:
            self.deferred.append(lambda: self._send_tokens(sessions, codes, markers, compute_s, events, final))
        else:
            self._send_tokens(sessions, codes, markers, compute_s, events, final)

    def _feed_downstream(self, sessions: Sequence[Session], codes: List[torch.Tensor], markers: Sequence[Marker],
                         events: Events) -> None:
        """The codes of the sessions holding a stream on the lane downstream, as its input."""
        if self.downstream is None:
            return
        onward = [j for j, session in enumerate(sessions) if session.kind in self.downstream.kinds]
        if not onward:
            return
        members = [sessions[j] for j in onward]
        part = codes if len(onward) == len(sessions) else [c[onward] for c in codes]
        try:
            self.downstream.feed(members, part, [[(part[0].shape[-1], markers[j])] for j in onward])
        except Exception as exc:  # noqa: BLE001 - codes made by the encoder: a bug, not the clients' doing
            for member in members:
                self.fail(member, events, exc)

    def _send_tokens(self, sessions: Sequence[Session], codes: List[torch.Tensor], markers: Sequence[Marker],
                     compute_s: Sequence[float], events: Events, final: bool) -> None:
        """The codes as token frames, converted once per token layout in use. Sessions that ended meanwhile
        (failed: their error is sent) are left out."""
        by_layout: Dict[Tuple[str, int], List[int]] = {}
        for j, session in enumerate(sessions):
            layout = session.layout
            by_layout.setdefault((layout.name, layout.token_offset), []).append(j)  # type: ignore[union-attr]
        tokens: List[Any] = [None] * len(sessions)
        for rows in by_layout.values():
            part = codes if len(rows) == len(sessions) else [c[rows] for c in codes]
            try:
                flat = sessions[rows[0]].layout.to_flat(part).numpy().astype("<i4")  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - ends the sessions of this layout only
                for j in rows:
                    self.fail(sessions[j], events, exc)
                continue
            for i, j in enumerate(rows):
                tokens[j] = flat[i]
        for j, session in enumerate(sessions):
            if tokens[j] is None or session not in self._streams:  # failed since (an end's streams are held)
                continue
            end = final or markers[j] is session.flush_at  # output of the stream's padded end
            if not end:
                self._check_behind(session, markers[j], events)
            events.append((session, self._frame(PAYLOAD_TOKENS, session.engine.token_pos, markers[j], compute_s[j],
                                                tokens[j], end)))
            session.engine.token_pos += tokens[j].size

    def _check_behind(self, session: Session, marker: Marker, events: Events) -> None:
        """Warn an audio-input session whose output now answers input received over ``behind_warning_s`` ago:
        the engine is slower than that input (an overloaded server, or a client sending faster than real
        time) and the delay grows while it lasts. At most once per ``BEHIND_REPEAT_S``."""
        limit, now = self.behind_warning_s, time.perf_counter()
        lag = now - marker[1]
        state = session.engine
        recently = state.warned_at is not None and now - state.warned_at < BEHIND_REPEAT_S
        if not limit or lag <= limit or recently:
            return
        state.warned_at = now
        with _STATS_LOCK:
            self.stats["behind_warnings"] += 1
        events.append((session, dumps({
            "type": "warning", "code": "behind", "lag_ms": round(1e3 * lag),
            "message": f"output is {lag:.1f} s behind the input it answers: the server is slower than this "
                       f"session's input"})))


def with_pcm16(audio: torch.Tensor) -> List[torch.Tensor]:
    """A decode engine's output map (``DecodeEngine(output_map=...)``): its audio and the same as PCM16, converted
    where the audio is (a GPU's step: a few kernels, where the host took milliseconds for thousands of streams).
    The same integers as :func:`~snac_stream.protocol.audio_payload`: exact scaling, NaN -> 0, round half to
    even, saturated."""
    scaled = audio.float() * 32768.0
    scaled = torch.where(torch.isnan(scaled), torch.zeros((), dtype=scaled.dtype, device=scaled.device), scaled)
    return [audio, scaled.round_().clamp_(-32768, 32767).to(torch.int16)]


class DecodeLane(Lane):
    """Codes in, audio out: decode sessions (their tokens, parsed on the loop) and roundtrip sessions (the
    encode lane's codes). The engine takes whole steps; the lane holds the codes short of one."""

    name = "decode"
    kinds = ("decode", "roundtrip")
    input_kinds = ("decode",)

    def __init__(self, engine: DecodeEngine, fail: Fail):
        super().__init__(engine, fail, engine.step_frames)
        self.frame_width = engine.config.frame_codes

    def submit(self, sessions: Sequence[Session], events: Events) -> None:
        """Each session's queued codes: coarse frames (:func:`~snac_stream.model.vq.codes_to_frames`, flattened:
        (frames * width,) int64 arrays, as the connection side hands them over)."""
        entries: List[Tuple[Session, np.ndarray, List[Tuple[int, Marker]]]] = []
        width = self.frame_width
        for session in sessions:
            pieces = session.take_inbox()
            if not pieces or session not in self._streams:
                continue
            frames = pieces[0][0] if len(pieces) == 1 else np.concatenate([p[0] for p in pieces])
            marks, count = [], 0
            for piece, end, t_recv in pieces:
                count += piece.size // width
                marks.append((count, (end, t_recv)))
            entries.append((session, frames, marks))
        self._queue(entries, events)

    def feed(self, sessions: Sequence[Session], outputs: Any, marks: Sequence[Sequence[Tuple[int, Marker]]]) -> None:
        """Row ``j`` of ``outputs`` (codes per level (len(sessions), t_i), on the host) is the next input of
        ``sessions[j]``; ``marks[j]``: (coarse frames of that row up to the end of one input piece, that piece's
        marker), ascending."""
        frames = codes_to_frames([c.numpy() for c in outputs], self.engine.config.codes_per_frame)
        streams = [self._streams.get(s) for s in sessions]
        if frames.shape[1] % self.step_items == 0 and all(st is not None and st.held is None for st in streams):
            # The steady case (whole steps for streams holding no frames): the batch goes to the engine as it is.
            self.engine.submit_frames([st.sid for st in streams], frames)  # type: ignore[attr-defined,union-attr]
            for session, mark in zip(sessions, marks):
                self._mark_steps(session, 0, mark)
            return
        self._queue([(s, frames[j].reshape(-1), marks[j]) for j, s in enumerate(sessions)], None)

    def _queue(self, entries: Sequence[Tuple[Session, np.ndarray, Sequence[Tuple[int, Marker]]]],
               events: Optional[Events]) -> None:
        """Queue every whole step of each (session, its new frames flattened, marks) after the frames its stream
        holds, and hold the rest. Streams completing as many steps go to the engine in one call (thousands of
        TTS streams a tick: one call, not one each); a call the engine refuses is retried one stream at a
        time, so that a failure ends that session only. ``events`` None (the encode lane's codes): a refusal
        is raised, and that lane ends the sessions."""
        width, step = self.frame_width, self.step_items
        batches: Dict[int, List[Tuple[Session, _Stream, np.ndarray, int, Sequence[Tuple[int, Marker]]]]] = {}
        for session, frames, marks in entries:
            stream = self._streams.get(session)
            if stream is None:
                continue
            held = stream.held
            joined = frames if held is None else np.concatenate([held, frames])
            batches.setdefault(joined.size // width // step, []).append(
                (session, stream, joined, 0 if held is None else held.size // width, marks))
        for steps, members in batches.items():
            whole = steps * step * width
            if steps:
                try:  # one engine call, which queues all or nothing
                    batch = np.stack([m[2][:whole] for m in members]).reshape(len(members), -1, width)
                    self.engine.submit_frames([m[1].sid for m in members], batch)  # type: ignore[attr-defined]
                except Exception as exc:  # noqa: BLE001
                    if events is None:
                        raise
                    members = self._one_by_one(members, whole, exc, events)
            for session, stream, joined, held, marks in members:
                stream.held = joined[whole:] if joined.size > whole else None
                if steps:
                    self._mark_steps(session, held, marks)

    def _one_by_one(self, members: List[Any], whole: int, exc: Exception, events: Events) -> List[Any]:
        """The members of a refused engine call submitted one at a time; those refused again fail (a lone
        member with the call's error). Returns those accepted."""
        if len(members) == 1:
            self.fail(members[0][0], events, exc)
            return []
        accepted = []
        for member in members:
            try:
                self.engine.submit_frames([member[1].sid],  # type: ignore[attr-defined]
                                          member[2][:whole].reshape(1, -1, self.frame_width))
                accepted.append(member)
            except Exception as own:  # noqa: BLE001
                self.fail(member[0], events, own)
        return accepted

    def _ends_whole(self, session: Session, events: Events) -> bool:
        held = self._streams[session].held
        if held is not None and held.size:
            frames = held.size // self.frame_width
            self.fail(session, events, ProtocolError(
                "bad_tokens", f"the stream ended inside a decoder step: {frames} coarse frames left over; this "
                              f"model decodes whole steps of {self.step_items} frames"))
            return False
        return True

    def _input_per_step(self, session: Session) -> int:
        return self.step_items * session.layout.frame_tokens  # type: ignore[union-attr]

    def emit(self, sessions: Sequence[Session], outputs: Any, markers: Sequence[Marker], compute_s: Sequence[float],
             events: Events, final: bool = False) -> None:
        """Audio (len(sessions), 1, n), converted to each sample format once for all sessions using it (or, from an
        engine with :func:`with_pcm16` as its output map, [audio, its PCM16] with that conversion done). A
        roundtrip whose input has ended gets no more samples than it sent (the rest decodes the end padding)."""
        audio, pcm16 = (outputs[0], outputs[1]) if isinstance(outputs, (list, tuple)) else (outputs, None)
        by_format: Dict[str, List[int]] = {}
        for j, session in enumerate(sessions):
            by_format.setdefault(session.audio_format, []).append(j)
        payloads: List[Any] = [None] * len(sessions)
        for fmt, rows in by_format.items():
            every = len(rows) == len(sessions)
            if fmt == "pcm16" and pcm16 is not None:
                data = pcm16.reshape(len(sessions), -1).cpu().numpy()
                data = data if every else data[rows]
            else:
                samples = audio.reshape(len(sessions), -1).float().cpu().numpy()
                data = audio_payload(samples if every else samples[rows], fmt)
            for i, j in enumerate(rows):
                payloads[j] = data[i]
        for j, session in enumerate(sessions):
            data, state = payloads[j], session.engine
            if session.flush_at is not None and session.kind == "roundtrip":
                data = data[: max(0, session.flush_at[0] - state.audio_pos)]
            if not data.size:
                continue
            # Steps tagged with the flush's marker decode the stream's padded end: end-of-stream output too.
            events.append((session, self._frame(PAYLOAD_AUDIO, state.audio_pos, markers[j], compute_s[j], data,
                                                final or markers[j] is session.flush_at)))
            state.audio_pos += data.size
