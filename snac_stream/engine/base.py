"""The slot pool and batched stepping shared by the decode and encode engines (see the package's doc)."""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..model.snac import SNACModel
from ..streaming.graphs import CUDAGraphed
from ..streaming.ops import StreamOp, cat_time, deferred_joins
from ..streaming.rows import (assign_rows, batch_positions, row_state, rows_in_place, select_rows, state_batch,
                              state_bytes, steady_state, zero_rows)

STEP_MODES = ("auto", "rows", "buckets", "graphs")
FLUSH = "flush"  # the key of a batched flush's bucket pass, beside a step's (phase, bucket)


def bucket_sizes(max_streams: int, per_octave: int = 4, fine_from: int = 32) -> List[int]:
    """The batch sizes of an engine's bucket passes, ascending: powers of two below ``fine_from``, then
    ``per_octave`` evenly spaced sizes per octave (a pass is at most ``1 / per_octave`` larger than the
    streams it steps, not up to twice as large), then ``max_streams``. Each size is a CUDA graph to capture;
    below ``fine_from`` a pass costs its launches, not its rows."""
    sizes = {max_streams}
    k = 1
    while k < max_streams:
        spacing = k // per_octave if k >= fine_from else k
        sizes.update(range(k, min(2 * k, max_streams), max(spacing, 1)))
        k *= 2
    return sorted(sizes)


def _as_list(x: Any) -> List[torch.Tensor]:
    """A step's inputs or outputs (a tensor or a list of per-level tensors) as a list."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _first(x: Any, rows: int) -> Any:
    """The first ``rows`` rows (views) of a step's inputs or outputs."""
    return [t[:rows] for t in x] if isinstance(x, (list, tuple)) else x[:rows]


def cat_to(pieces: Sequence[Union[torch.Tensor, np.ndarray]], device: torch.device, dim: int = 0) -> torch.Tensor:
    """Concatenate (along the batch by default) and move to ``device``: one copy when the pieces share a
    device. Pieces may be numpy arrays (input queued on the host, see ``EncodeEngine.submit_many``).

    Host pieces bound for a GPU are joined straight into pinned memory, whose copy is queued on the stream:
    from pageable memory a copy of a step's audio (megabytes) waited for the GPU's work in flight, the step
    that the engine thread's host work is meant to overlap."""
    device = torch.device(device)
    if isinstance(pieces[0], np.ndarray):  # a server's input: thousands of same-shaped numpy pieces
        joined = _join_numpy(pieces, dim, pin=device.type == "cuda")
        if joined is not None:
            return joined.to(device, non_blocking=True)
    if all(isinstance(p, np.ndarray) or p.device.type == "cpu" for p in pieces):
        return _join_on_host(pieces, dim, pin=device.type == "cuda").to(device, non_blocking=True)
    pieces = [torch.from_numpy(p) if isinstance(p, np.ndarray) else p for p in pieces]
    try:
        joined = torch.cat(pieces, dim=dim)
    except RuntimeError:  # pieces on several devices (streams fed from the host and from the GPU)
        joined = torch.cat([p.to(device) for p in pieces], dim=dim)
    return joined.to(device, non_blocking=True)


def _join_numpy(pieces: Sequence[Union[torch.Tensor, np.ndarray]], dim: int, pin: bool) -> Optional[torch.Tensor]:
    """:func:`_join_on_host` of numpy pieces of the first one's shape and dtype, without a Python pass over
    them (numpy checks them as it joins); None for any other pieces."""
    first = pieces[0]
    shape = list(first.shape)
    shape[dim] *= len(pieces)
    joined = torch.empty(shape, dtype=torch.from_numpy(first[:0]).dtype, pin_memory=pin)
    try:
        np.concatenate(pieces, axis=dim, out=joined.numpy(), casting="no")
    except (TypeError, ValueError, RuntimeError):  # other shapes or dtypes, tensors among them
        return None
    return joined


def _join_on_host(pieces: Sequence[Union[torch.Tensor, np.ndarray]], dim: int, pin: bool) -> torch.Tensor:
    """Host pieces (numpy arrays or CPU tensors) concatenated along ``dim`` into one new CPU tensor, in
    page-locked memory with ``pin``. Numpy pieces alone are joined by numpy: a server's thousands of per-stream
    views, without a tensor made for each."""
    shape = list(pieces[0].shape)
    shape[dim] = sum(p.shape[dim] for p in pieces)
    if all(isinstance(p, np.ndarray) for p in pieces):
        dtype = torch.from_numpy(np.empty(0, dtype=np.result_type(*pieces))).dtype
        joined = torch.empty(shape, dtype=dtype, pin_memory=pin)
        np.concatenate(pieces, axis=dim, out=joined.numpy())
        return joined
    tensors = [torch.from_numpy(p) if isinstance(p, np.ndarray) else p for p in pieces]
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    return torch.cat(tensors, dim=dim, out=torch.empty(shape, dtype=dtype, pin_memory=pin))


def index_on(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """``ids`` as an int64 index tensor on ``device``, without waiting for the work queued there.

    ``torch.tensor(ids, device="cuda")`` copies from pageable memory and then synchronizes the stream: an
    engine thread that built a step's row index so waited for the step in flight, every time the set of
    stepping streams changed (a tick steps only the sessions due). Here the copy goes through pinned memory,
    queued on the stream like the step that uses it."""
    rows = torch.tensor(ids, dtype=torch.int64)
    if device.type != "cuda":
        return rows.to(device)
    return rows.pin_memory().to(device, non_blocking=True)


def _sid(slot: "Slot") -> int:
    return slot.sid


class StepGroups(list):
    """What :meth:`StreamEngine.step_groups` returns: ``(stream ids, outputs)`` pairs, and :meth:`wait`.

    An engine built with ``async_output`` returns as soon as the step is queued on the GPU, each output's copy
    to (pinned) host memory queued behind it: the caller does other host work meanwhile and reads the outputs
    after :meth:`wait`. Otherwise the outputs are ready on return and :meth:`wait` returns at once.
    """

    def __init__(self, groups: Sequence[Tuple[List[int], Any]] = (), wall_s: float = 0.0,
                 events: Optional[Tuple[Any, Any]] = None, warming: int = 0):
        super().__init__(groups)
        self.wall_s = wall_s  # the host's time in step_groups
        self.warming = warming  # passes of streams warming up (one per warm-up phase with a step queued)
        self.blocked_s = 0.0  # the host's time blocked in wait()
        self._events = events  # (started, done) CUDA events of an async step

    def wait(self) -> float:
        """Block until the outputs are on ``output_device``; returns the step's time in seconds: the device's,
        from the step's start to its outputs' arrival, for an async step; else the wall time of the call.
        The time the caller was blocked goes to ``blocked_s``."""
        if self._events is None:
            return self.wall_s
        started, done = self._events
        t0 = time.perf_counter()
        done.synchronize()
        self.blocked_s += time.perf_counter() - t0
        return started.elapsed_time(done) / 1e3


class EngineFull(RuntimeError):
    """Every stream slot is taken."""


@dataclass
class Slot:
    """One stream's slot: its queued input and its steps run, which say where its state is: row ``sid`` of
    the batch of its phase (``StreamEngine.phase_of``)."""
    sid: int
    queue: List[Any] = field(default_factory=list)  # whole steps of input, oldest first (tensors, numpy on the host)
    steps: int = 0  # steps run
    received: int = 0  # input samples submitted (encoder)
    partial: Optional[Union[torch.Tensor, np.ndarray]] = None  # samples short of a whole step (encoder)
    ended: bool = False  # the input has ended (encoder: ``end_input``)


class StreamEngine:
    """The slot pool and batched stepping shared by ``DecodeEngine`` and ``EncodeEngine``.

    ``body`` is the stream op every stream runs (one batched state for all of them). Subclasses say what one
    step of input is (``_stack`` several streams' steps into a batch), how a batched state advances by one
    step (``_advance``), how to split the batched output per stream (``_rows``), what no output is
    (``_no_output``) and what a stream's input holds beyond its queued steps at its end (``_remainder``).
    """

    def __init__(self, model: SNACModel, body: StreamOp, max_streams: int, backend: Optional[str] = None,
                 step_mode: str = "auto", output_device: Optional[Union[str, torch.device]] = None,
                 async_output: bool = False, output_map: Optional[Callable[[Any], Any]] = None):
        if not isinstance(max_streams, int) or isinstance(max_streams, bool) or max_streams < 1:
            raise ValueError(f"max_streams must be a positive int, got {max_streams!r}")
        if step_mode not in STEP_MODES:
            raise ValueError(f"step_mode must be one of {STEP_MODES}, got {step_mode!r}")
        if step_mode == "auto":
            step_mode = "graphs" if model.device.type == "cuda" else "rows"
        if step_mode == "graphs" and model.device.type != "cuda":
            raise ValueError(f"step_mode='graphs' needs the model on a CUDA device, it is on {model.device}")
        self.step_mode = step_mode
        self.model = model
        self.body = body
        self.output_device = model.device if output_device is None else torch.device(output_device)
        # step_groups returns before the outputs reach the host (StepGroups.wait): a GPU model, host outputs.
        self.async_output = bool(async_output) and model.device.type == "cuda" and self.output_device.type == "cpu"
        # Applied on the model's device to what step_groups, close and close_many return, before it moves (a
        # server converts a step's audio to its clients' sample format there); step() splits unmapped outputs.
        self.output_map = output_map
        self.config = model.config
        self.max_streams = max_streams
        self.backend = backend
        model.resolved_backend(backend)  # fail now on an unusable backend
        self.step_frames = self.config.pad_multiple // self.config.frame_samples
        self.step_samples = self.step_frames * self.config.frame_samples
        # Phase k < warmup_steps: a stream that has run k steps, its state shapes still growing; the last phase
        # is the steady one. Each phase has a batch of its own, one row per slot and a spare one (index
        # max_streams) for the unused places of a bucket pass, so a step of a phase's streams is one batched pass
        # (a graph) however their starts fell, and moves their rows to the next phase's batch. Phase 0, the
        # fresh state, is the same for every stream: one row, read by all.
        templates = self._derive_phases()
        self.warmup_steps = len(templates) - 1
        if not self.warmup_steps:
            raise AssertionError("a stream state with no warm-up: fresh rows would have to be reset in the batch")
        rows = max_streams + 1
        self._phases = [batch_positions(self._init_state(1), 1, model.device)]
        self._phases += [batch_positions(zero_rows(t, rows), rows, model.device) for t in templates[1:]]
        self._fresh_rows = torch.zeros(max_streams, dtype=torch.int64, device=model.device)  # phase 0's row, each
        self._slots: Dict[int, Slot] = {}
        self._free: List[int] = list(range(max_streams))
        # Bucket passes read fixed input buffers and the list of rows they advance (``_bucket_rows``). Warm-up
        # phases step few streams at a time and are a short part of a stream: powers of two do, fewer graphs.
        self.buckets = bucket_sizes(max_streams)
        self.warmup_buckets = [k for k in self.buckets if k & (k - 1) == 0 or k == max_streams]
        # Batched stream ends (close_many's flush) are rarer still: the same powers of two.
        self.flush_buckets = self.warmup_buckets
        self._last_rows: Dict[int, Tuple[tuple, torch.Tensor]] = {}  # per phase, see _row_index
        if step_mode != "rows":
            stacked = self._stack([self._zero_step()] * max_streams)
            self._inputs = [t.contiguous() for t in stacked] if isinstance(stacked, list) else stacked.contiguous()
            # Per phase, the rows with a step queued, in input order, then the spare row: a pass of bucket k
            # advances the first k entries, so a step costs what its streams need, not what their highest slot does.
            self._bucket_rows = [torch.full((max_streams,), max_streams, dtype=torch.int64, device=model.device)
                                 for _ in self._phases]
            self._flush_rows_list = torch.full((max_streams,), max_streams, dtype=torch.int64, device=model.device)
        # A (phase, bucket) step pass or a (FLUSH, bucket) pass of stream ends, captured as a CUDA graph in
        # "graphs" mode, run eagerly in "buckets" mode.
        self._bucket_passes = CUDAGraphed(self._pass, model.device, enabled=step_mode == "graphs",
                                          frozen=self._spare_row_only)

    # ---- hooks ----------------------------------------------------------------------------------
    def _init_state(self, batch: int) -> Any:
        """The state of ``batch`` fresh streams."""
        return self.body.init_state(batch, self.model.device, self.model.dtype)

    def _zero_step(self) -> Any:
        """One step of silence-like input for one stream (used to derive the warm-up)."""
        raise NotImplementedError

    def _stack(self, steps: List[Any]) -> Any:
        """One queued step of several streams (one row each) as the batched input of ``_advance``."""
        raise NotImplementedError

    def _advance(self, state: Any, inputs: Any) -> Any:
        """Advance a batched ``state`` (B rows) by one step of ``inputs`` (B rows); returns its outputs."""
        raise NotImplementedError

    def _rows(self, outputs: Any) -> List[Any]:
        """A batched step's outputs split per row (views, one call per tensor rather than per stream)."""
        raise NotImplementedError

    def _full_step(self, outputs: Any) -> bool:
        """Whether one stream's output of a step is a whole step (steady emission)."""
        raise NotImplementedError

    def _no_output(self, rows: int) -> Any:
        """The output of ``rows`` streams when there is none."""
        raise NotImplementedError

    def _remainder(self, slot: Slot) -> List[Any]:
        """Input of a closing stream beyond its queued steps, as whole steps (none by default)."""
        return []

    def _finish(self, slot: Slot, state: Any) -> Any:
        """A closing stream's rest of output (batch 1): its queued steps, its remainder and its flush."""
        parts = [self._advance(state, self._stack([step])) for step in slot.queue + self._remainder(slot)]
        if slot.steps or parts:
            parts.append(self._flush_rows(state))
        return cat_time(parts) if parts else self._no_output(1)

    def _flush_rows(self, state: Any) -> Any:
        """The end of streams whose steps have all run: the body's flush, for a batched ``state``."""
        tail = self.body.flush(state)
        return self._no_output(state_batch(state)) if tail is None else tail

    def _ends_in_batch(self, slot: Slot) -> bool:
        """Whether the stream's end is its flush alone, run on its row of the steady batch (``close_many``)."""
        return slot.steps >= self.warmup_steps and not slot.queue

    # ---- layout ---------------------------------------------------------------------------------
    def _derive_phases(self) -> List[Any]:
        """A single stream's state in each phase: after 0, 1, ... steps until its shapes stop changing and each
        step yields a whole step of output (``rows.steady_state`` on placeholder steps); the last is steady."""
        before: List[Any] = []

        def advance(state: Any) -> Any:
            before.append(zero_rows(state, 1))  # the shapes and counters of the phase this step leaves
            return self._advance(state, self._stack([self._zero_step()]))

        warmup, steady = steady_state(self._init_state(1), advance, self._full_step)
        return before[:warmup] + [steady]

    @property
    def _batch(self) -> Any:
        """The steady phase's batch: the rows of every stream past its warm-up."""
        return self._phases[-1]

    def phase_of(self, slot: Slot) -> int:
        """The phase of a stream's state: its steps run, up to the steady phase (``warmup_steps``)."""
        return min(slot.steps, self.warmup_steps)

    @property
    def state_bytes_per_stream(self) -> int:
        """Bytes of state one stream slot holds: its rows of the warm-up phases' batches and the steady one's."""
        return sum(state_bytes(phase) for phase in self._phases[1:]) // (self.max_streams + 1)

    @property
    def active_streams(self) -> int:
        return len(self._slots)

    # ---- streams --------------------------------------------------------------------------------
    def open(self) -> int:
        """Take a free slot for a new stream; returns its id."""
        if not self._free:
            raise EngineFull(f"all {self.max_streams} stream slots are in use")
        sid = self._free.pop(0)
        self._slots[sid] = Slot(sid)
        return sid

    def pending(self, sid: int) -> int:
        """Whole steps queued for stream ``sid``."""
        return len(self._slot(sid).queue)

    def queued_any(self, sids: Iterable[int]) -> bool:
        """Whether any of these streams has a whole step queued (one pass, for thousands of streams)."""
        slots = self._slots
        return any(slots[sid].queue for sid in sids)

    def step(self) -> Dict[int, Any]:
        """Run one queued step of every stream that has one: {stream id: that stream's output}."""
        if self.output_map is not None:
            raise RuntimeError("step() splits the engine's own outputs; step an engine with an output_map through "
                               "step_groups()")
        groups = self.step_groups()
        groups.wait()
        return {sid: row for sids, outputs in groups for sid, row in zip(sids, self._rows(outputs))}

    def step_groups(self) -> StepGroups:
        """Run one queued step of every stream that has one; returns the outputs batched as they were computed:
        ``(stream ids, outputs)`` pairs whose output row ``i`` belongs to stream ``ids[i]`` (one pair per phase
        with a stream due: the steady batch's first, then the warm-up phases', latest first). A caller that
        handles outputs per batch rather than per stream (the server converting thousands of streams' outputs
        every step) starts here; :meth:`step` splits them. With ``async_output``, read the outputs after the
        result's ``wait()``."""
        t0 = time.perf_counter()
        events = None
        if self.async_output:
            # Blocking: the waiting thread sleeps rather than spinning on a core that other threads and
            # processes (front ends) need, and its CPU time counts only its own work.
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True, blocking=True))
            events[0].record()
        groups: List[Tuple[List[int], Any]] = []
        # Host work here is per stream (thousands of them): one pass over the slots, one batched call per tensor.
        steady = self.warmup_steps
        due: List[List[Slot]] = [[] for _ in self._phases]  # by phase
        for slot in self._slots.values():
            if slot.queue:  # phase_of(slot), inlined: this runs for every slot of every step
                due[slot.steps if slot.steps < steady else steady].append(slot)
        with torch.inference_mode(), self.model.on_backend(self.backend):
            for phase in range(steady, -1, -1):  # the steady batch first: most streams, launched soonest
                slots = due[phase]
                if not slots:
                    continue
                slots.sort(key=_sid)
                sids = [slot.sid for slot in slots]
                outputs = self._step_batch(sids, self._stack([slot.queue.pop(0) for slot in slots]), phase)
                groups.append((sids, self._to_output(outputs, self.async_output)))
                for slot in slots:
                    slot.steps += 1
        if events is not None:
            events[1].record()
        return StepGroups(groups, time.perf_counter() - t0, events, warming=sum(map(bool, due[:steady])))

    def close(self, sid: int) -> Any:
        """End stream ``sid``: run what is queued, return the rest of its output, free the slot."""
        slot = self._slot(sid)
        try:
            with torch.inference_mode(), self.model.on_backend(self.backend):
                phase = self.phase_of(slot)
                state = row_state(self._phases[phase], sid if phase else 0)
                return self._to_output(self._finish(slot, state))
        finally:
            self._release(sid)

    def close_many(self, sids: Sequence[int]) -> StepGroups:
        """End several streams, each as :meth:`close` would; returns their outputs as :meth:`step_groups` does
        (with ``async_output``, read them after its ``wait()``). The streams in the batch with only their flush
        left (every step run; an encoder stream's input ended by ``end_input``) end in one batched pass (a
        replayed graph in "graphs" mode), the others one at a time: a server ending many streams at once pays
        one pass, not one per stream, and need not wait for the steps in flight."""
        slots = [self._slot(sid) for sid in sids]
        if len(set(sids)) != len(slots):
            raise ValueError(f"a stream appears more than once in {list(sids)}")
        together = sorted(slot.sid for slot in slots if self._ends_in_batch(slot))
        t0 = time.perf_counter()
        events = None
        groups: List[Tuple[List[int], Any]] = []
        try:
            if together:
                if self.async_output:
                    events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True, blocking=True))
                    events[0].record()
                with torch.inference_mode(), self.model.on_backend(self.backend):
                    outputs = self._flush_batch(together)
                    groups.append((together, self._to_output(outputs, self.async_output)))
                if events is not None:
                    events[1].record()
                self._release(*together)
            ending = set(together)
            groups.extend(([slot.sid], self.close(slot.sid)) for slot in slots if slot.sid not in ending)
        finally:  # ended or failed, every stream of the call is gone
            self._release(*(sid for sid in sids if sid in self._slots))
        return StepGroups(groups, time.perf_counter() - t0, events)

    def _flush_batch(self, sids: List[int]) -> Any:
        """The flush of the steady rows ``sids`` (ascending); returns their outputs, in that order."""
        rows = index_on(sids, self.model.device)
        if self.step_mode == "rows":
            return self._flush_rows(select_rows(self._batch, rows))
        count = len(sids)
        bucket = next(k for k in self.flush_buckets if k >= count)
        self._flush_rows_list[:count].copy_(rows)
        self._flush_rows_list[count:].fill_(self.max_streams)
        outputs = self._bucket_passes((FLUSH, bucket))
        # A copy of the rows asked for: the graph's output memory is rewritten by the next replay.
        return [o[:count].clone() for o in outputs] if isinstance(outputs, list) else outputs[:count].clone()

    def abort(self, sid: int) -> None:
        """Drop stream ``sid`` without running the rest (a failed or vanished client)."""
        self._slot(sid)
        self._release(sid)

    def warm_up(self) -> None:
        """Run placeholder streams through every phase (warm-up, batch, close) before serving, so that the GPU
        kernels of each shape are compiled then and not during a client's step. Streams that open together
        warm up as one batch, whose size picks the kernels' tiles: groups of 1, 2 and ``max_streams`` streams
        reach every tile variant (see ``kernels.tuning``). One stream of each group closes with a step still
        queued and (encoder) a partial step buffered, as a client's stream ends: its close runs the eager
        single-stream passes a close runs. Needs an idle engine; leaves it as it was (slots are zeroed when
        freed)."""
        if self._slots:
            raise RuntimeError("warm_up needs an engine with no open streams")
        for size in sorted({1, min(2, self.max_streams), self.max_streams}):
            sids = [self.open() for _ in range(size)]
            for sid in sids:
                self._queue_placeholder(sid, self.warmup_steps + 3)
            while self.pending(sids[0]) > 1:
                self.step_groups().wait()
            self.close(sids[0])  # the end of a stream: one is enough
            for sid in sids[1:]:
                self.abort(sid)
        if self.step_mode != "rows":  # close_many's batched flush, at every bucket size it uses
            with torch.inference_mode(), self.model.on_backend(self.backend):
                for k in self.flush_buckets:
                    self._bucket_passes((FLUSH, k))

    def _queue_placeholder(self, sid: int, steps: int) -> None:
        """Queue ``steps`` steps of placeholder input for stream ``sid`` (``warm_up``)."""
        self._slot(sid).queue.extend(self._zero_step() for _ in range(steps))

    def capture_graphs(self) -> None:
        """Capture every (phase, bucket) step pass's and every flush pass's CUDA graph now
        (``step_mode='graphs'``), so no step or stream end pays for a capture."""
        if self.step_mode != "graphs":
            raise RuntimeError(f"capture_graphs needs step_mode='graphs', this engine uses {self.step_mode!r}")
        with torch.inference_mode(), self.model.on_backend(self.backend):
            for phase in range(len(self._phases)):
                for k in self._phase_buckets(phase):
                    self._bucket_passes.capture((phase, k))
            for k in self.flush_buckets:
                self._bucket_passes.capture((FLUSH, k))

    def _phase_buckets(self, phase: int) -> List[int]:
        """The bucket sizes of a phase's passes."""
        return self.buckets if phase == self.warmup_steps else self.warmup_buckets

    # ---- batched steps --------------------------------------------------------------------------
    def _step_batch(self, sids: List[int], inputs: Any, phase: int) -> Any:
        """Advance the rows ``sids`` (ascending) of a phase's batch by one step of ``inputs`` (one row each,
        same order), into the next phase's batch (the steady one's into itself); returns the outputs of those
        rows, in that order."""
        rows, changed = self._row_index(sids, phase)
        if self.step_mode == "rows":
            sub = self._work_rows(phase, rows, len(sids))
            with deferred_joins():  # the new state's pieces are written straight into the batch
                outputs = self._advance(sub, inputs)
            after = min(phase + 1, self.warmup_steps)
            self._phases[after] = assign_rows(self._phases[after], rows, sub)
            return outputs
        count = len(sids)
        bucket = next(k for k in self._phase_buckets(phase) if k >= count)
        for buffer, part in zip(_as_list(self._inputs), _as_list(inputs)):
            buffer[:count].copy_(part)
        if changed:
            self._bucket_rows[phase][:count].copy_(rows)
            self._bucket_rows[phase][count:].fill_(self.max_streams)
        outputs = self._bucket_passes((phase, bucket))
        # A copy of the rows asked for: the graph's output memory is rewritten by the next replay.
        picked = [o[:count].clone() for o in _as_list(outputs)]
        return picked if isinstance(outputs, list) else picked[0]

    def _row_index(self, sids: List[int], phase: int) -> Tuple[torch.Tensor, bool]:
        """``sids`` as an index tensor on the model's device, and whether they differ from the phase's last
        step's: a steady set of streams reuses the tensor and the bucket's row list (no host-to-device copy per
        step)."""
        key = tuple(sids)
        last = self._last_rows.get(phase)
        if last is not None and key == last[0]:
            return last[1], False
        rows = index_on(sids, self.model.device)
        self._last_rows[phase] = (key, rows)
        return rows, True

    def _pass(self, key: Tuple[Union[int, str], int]) -> Any:
        """A bucket pass: a step of a phase's rows, or (``FLUSH``) the flush of steady rows."""
        if key[0] == FLUSH:
            rows = self._flush_rows_list[: key[1]]
            # The flush works on its own copy of the rows (select_rows): the batch is only read.
            return self._flush_rows(select_rows(self._batch, rows))
        return self._bucket_pass(key)  # type: ignore[arg-type]

    def _bucket_pass(self, key: Tuple[int, int]) -> Any:
        """Advance the rows of the first ``bucket`` entries of a phase's row list: gathered into a batch of their
        own, advanced on the staged inputs, written to the next phase's batch (the steady phase's to itself; the
        spare row's several entries write it in any order; it is never read for a stream). The batches'
        counters stay as they are: every row of a batch is in its phase."""
        phase, bucket = key
        rows = self._bucket_rows[phase][:bucket]
        work = self._work_rows(phase, rows, bucket)
        with deferred_joins():  # the new state's pieces are written straight into the batch
            outputs = self._advance(work, _first(self._inputs, bucket))
        assign_rows(self._phases[min(phase + 1, self.warmup_steps)], rows, work, counters=False)
        return outputs

    def _work_rows(self, phase: int, rows: torch.Tensor, count: int) -> Any:
        """What a pass advances for ``rows`` of a phase's batch: a steady step's rows in place (its convs' contexts
        read and renewed where they lie, ``rows_in_place``), a warm-up step's gathered (they move on to the next
        phase's batch; the first phase's ``count`` rows start from fresh state)."""
        if phase and phase == self.warmup_steps:
            return rows_in_place(self._phases[phase], rows)
        return select_rows(self._phases[phase], rows if phase else self._fresh_rows[:count])

    @contextlib.contextmanager
    def _spare_row_only(self) -> Iterator[None]:
        """Bucket passes run inside leave every stream's row as it was: the row lists point at the spare row
        meanwhile (the passes before a graph's capture run for real)."""
        kept = [rows.clone() for rows in self._bucket_rows]
        for rows in self._bucket_rows:
            rows.fill_(self.max_streams)
        try:
            yield
        finally:
            for rows, before in zip(self._bucket_rows, kept):
                rows.copy_(before)
            self._last_rows = {}  # the passes ran with other row lists

    # ---- internals ------------------------------------------------------------------------------
    def _queue_device(self, x: Any) -> torch.device:
        """Where submitted input waits for its step: on the CPU if it came from there, else the model's device."""
        device = x.device if isinstance(x, torch.Tensor) else self.model.device
        return device if device.type == "cpu" else self.model.device

    def _to_output(self, outputs: Any, queued: bool = False) -> Any:
        """A step's outputs (``output_map`` applied) on ``output_device`` (one copy per tensor for all streams);
        ``queued``: the copies only queued behind the step (pinned host memory, ``async_output``)."""
        if self.output_map is not None:
            outputs = self.output_map(outputs)
        if self.output_device == self.model.device:
            return outputs
        if isinstance(outputs, (list, tuple)):
            return [o.to(self.output_device, non_blocking=queued) for o in outputs]
        return outputs.to(self.output_device, non_blocking=queued)

    def _slot(self, sid: int) -> Slot:
        slot = self._slots.get(sid)
        if slot is None:
            raise KeyError(f"no open stream {sid!r}")
        return slot

    def _release(self, *sids: int) -> None:
        if not sids:
            return
        for sid in sids:
            del self._slots[sid]
        # Zero their steady rows (one copy per state tensor for all), where a stream's state lives longest; a
        # warm-up phase's row is written by the next stream's own step before that stream reads it.
        rows = index_on(sids, self.model.device)
        self._phases[-1] = assign_rows(self._batch, rows, zero_rows(self._batch, len(sids)))
        self._free.extend(sids)
        self._free.sort()
