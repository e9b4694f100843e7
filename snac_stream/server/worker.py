"""The engine side: the engines of one model on one device (:class:`EngineSet`), the thread that runs them
(:class:`Worker`), and the workers of every device a server runs on with the placement of sessions on them
(:class:`Workers`).

The engines are touched only in the worker thread (torch releases the GIL while it computes). The event loop
puts each session's input (whole engine steps at a time) in its inbox (:meth:`Worker.deliver`), marks
flushed sessions as ending (:meth:`Worker.end_stream`) and turns the rest (open, abort) into *commands*. A
tick (:meth:`EngineSet.tick`) submits every session's inbox in one engine call per lane (however many sessions
and messages), runs the commands, ends the streams whose steps have all run and been sent (all of them in one
batched flush per engine, launched like a step), then runs one engine step per lane (encode first, so a
roundtrip's fresh codes are decoded in the same tick), and hands the output frames back to the loop. On a GPU the host work overlaps the steps: a
step's outputs are sent while the next step runs, the last one's in the next tick. Outputs are converted per
batch: tokens once per token layout, PCM once per sample format, so the host work of a tick grows slowly with
the number of sessions. While nothing is queued the tick loop sleeps on an event: no busy waiting.

With several devices (``serve --device cuda:0,cuda:1``, or ``cpu,cpu``) each has its own engine set, worker
thread and copy of the model; a session stays on the device it was placed on when it opened.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, ContextManager, Deque, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch

from ..engine import DecodeEngine, EncodeEngine, EngineFull
from ..model.snac import SNACModel
from ..protocol import ProtocolError, dumps
from .heap import GC_CLOCK
from .lanes import DecodeLane, EncodeLane, Lane, Launched, with_pcm16
from .session import Events, Session

log = logging.getLogger("snac_stream.server")

# A unit of work for the engine thread; it may add events for the loop. Its result goes to whoever awaits it.
Command = Callable[[Events], Any]


def on_device(device: torch.device) -> ContextManager[Any]:
    """Make ``device`` the current CUDA device while in the block (CUDA streams, graph captures and kernel
    launches go to the current device, not the tensors'); nothing for other devices."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _engine_thread_setup(threads: int, device: torch.device) -> None:
    """The worker thread's torch settings: its intra-op threads and current CUDA device are per thread."""
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)


class EnginesDoNotFit(ValueError):
    """A device's memory cannot hold its engines for the sessions asked: raised at start, before any client."""


@contextlib.contextmanager
def _fits_memory(device: torch.device, max_streams: int) -> Iterator[None]:
    """Turn running out of the device's memory while the engines are built and their full-size passes captured
    into :class:`EnginesDoNotFit`, which names the cause and the remedy (a server would otherwise fail its first
    full step, or start with a traceback)."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        detail = (str(exc).strip() or "out of memory").splitlines()[0]
        raise EnginesDoNotFit(
            f"{max_streams} sessions do not fit the memory of {device}: building the engines and capturing their "
            f"full-size steps ran out: {detail}\nLower --max-sessions (bench/RESULTS.md gives each engine's peak "
            f"memory per stream), or serve this model on more devices.") from exc


class EngineSet:
    """An encode and a decode engine for ``max_streams`` streams each, their lanes, and the streams ending.

    Built on the caller's thread; afterwards touched only by the thread that runs :meth:`tick`.
    """

    def __init__(self, model: SNACModel, max_streams: int, stats: Dict[str, Any], *, backend: Optional[str] = None,
                 behind_warning_s: float = 0.0):
        self.stats = stats
        self.max_streams = max_streams
        self.device = model.device
        # Called after each lane's step that ran, in the engine thread: (lane name, seconds, streams stepped).
        self.on_step: Optional[Callable[[str, float, int], None]] = None
        # Called in the engine thread with the events ready so far, each time a step's outputs are sent: they
        # leave while the tick goes on (a roundtrip's audio need not wait for the next encoder step). None:
        # :meth:`tick` returns all of a tick's events.
        self.on_events: Optional[Callable[[Events], None]] = None
        with on_device(self.device), _fits_memory(self.device, max_streams):
            # Outputs come back on the host in one copy per step (they are sent from there anyway); on a GPU a
            # step returns while it runs, so the tick does its host work meanwhile, and its audio comes back as
            # PCM16 too (most clients' format; converting thousands of streams on the host took milliseconds).
            self.decoder = DecodeEngine(model, max_streams, backend=backend, output_device="cpu", async_output=True,
                                        output_map=with_pcm16 if self.device.type == "cuda" else None)
            self.encoder = EncodeEngine(model, max_streams, backend=backend, output_device="cpu", async_output=True)
            graphed = [engine for engine in (self.decoder, self.encoder) if engine.step_mode == "graphs"]
            if graphed:  # CUDA: compile and capture now, not in a session's step
                log.info("engines on %s: compiling kernels and capturing CUDA graphs for %d streams (this can take "
                         "minutes)", self.device, max_streams)
                t0 = time.perf_counter()
                for engine in graphed:
                    engine.warm_up()
                    engine.capture_graphs()  # every pass at full size: its memory is held from now on
                log.info("engines on %s ready in %.1f s", self.device, time.perf_counter() - t0)
        self.step_frames = self.decoder.step_frames
        self.step_samples = self.decoder.step_samples
        self.encode = EncodeLane(self.encoder, self.fail, stats, behind_warning_s)
        self.decode = DecodeLane(self.decoder, self.fail)
        self.encode.feeds(self.decode)
        self.lanes: Tuple[Lane, ...] = (self.encode, self.decode)  # step order: upstream first
        self._input_lane = {kind: lane for lane in self.lanes for kind in lane.input_kinds}  # where input goes
        self._ending: List[Session] = []  # flushed sessions whose end is not sent yet
        self._ended: List[Session] = []  # sessions whose end the tick under way sent
        self._launched: Deque[Launched] = collections.deque()  # steps under way, oldest first
        self._last_step_s: Dict[Lane, float] = {}  # each lane's latest step time (roundtrips carry the encoder's)
        self._finished_s = 0.0  # step time sent in the tick under way
        self._blocked_s = 0.0  # the tick's time blocked waiting for steps (GPU)
        # Leave the newest step running into the next tick only where steps are asynchronous (a GPU's): on the
        # CPU a launch runs the step, and keeping its outputs back would only delay them.
        self.keep_running = self.decoder.async_output and self.encoder.async_output

    def open(self, session: Session) -> None:
        """Open the session's streams; ``server_full`` if an engine has no free slot."""
        try:
            for lane in self.lanes:
                lane.open(session)
        except EngineFull:
            self.abort(session)
            raise ProtocolError("server_full", "no free engine slot; try again later") from None

    def abort(self, session: Session) -> None:
        """Drop every stream of the session."""
        for lane in self.lanes:
            lane.abort(session)

    def fail(self, session: Session, events: Events, exc: Exception) -> None:
        """End ``session`` (streams dropped at once) after ``exc`` in its share of a tick; the error goes to its
        client with the tick's events."""
        if not isinstance(exc, ProtocolError):
            log.error("session %d failed in the engine", session.number, exc_info=exc)
            exc = ProtocolError("internal_error", f"internal error: {type(exc).__name__}")
        self.abort(session)
        events.append((session, exc))

    def tick(self, commands: Sequence[Command], ready: Sequence[Session],
             ending: Sequence[Session]) -> Tuple[Events, List[Any], List[Session], bool]:
        """Submit the input of the ``ready`` sessions, run the commands, take the new ``ending`` sessions (a
        stream's end comes after its last input), end the streams that are ready to, then one step of each
        lane. Returns (events, those not handed to :attr:`on_events` already; command results; sessions whose end is
        sent; more to do).

        Steps overlap the host work around them: each lane's step is launched, and the outputs of the step
        launched before it are sent while it runs (on a GPU; on the CPU a launch runs the step). On a GPU
        (``keep_running``) the last step launched is left running when the tick returns; the next tick, which
        comes at once ("more to do"), submits its input meanwhile and sends that step's outputs after launching
        its own (sent first, they would leave the GPU idle meanwhile: bench/RESULTS.md). A lane's step is
        launched only once the step upstream of it has been sent (its outputs are the lane's input); on a GPU
        the upstream outputs' other frames (a roundtrip's tokens) are sent after that launch. Stream
        ends wait for nothing in flight either: a stream ends once its steps have all been sent, its end is
        launched like a step and its output sent in turn, ``done`` after it. Commands need no wait: a step's
        outputs go to the sessions its rows had at its launch, those still open when it is sent. Each step's
        events go to :attr:`on_events` as soon as its outputs are sent."""
        start, start_cpu, start_gc = time.perf_counter(), time.thread_time(), GC_CLOCK.seconds
        events: Events = []
        results: List[Any] = []
        self._finished_s, self._blocked_s, finished = 0.0, 0.0, False
        inputs: Dict[Lane, List[Session]] = {lane: [] for lane in self.lanes}
        for session in ready:  # one pass over thousands of sessions
            lane = self._input_lane.get(session.kind)
            if lane is not None:
                inputs[lane].append(session)
        for lane in self.lanes:
            lane.submit(inputs[lane], events)
        self._ended = []
        for command in commands:
            try:
                results.append(command(events))
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
                results.append(exc)
        for session in ending:
            for lane in self.lanes:
                lane.end_input(session)
            self._ending.append(session)
        if self._ending:
            self._end_streams(events)
        launched_any, rows, warming = False, 0, 0
        for lane in self.lanes:
            deferred: List[Callable[[], None]] = []
            if lane.upstream is not None and any(step.lane is lane.upstream for step in self._launched):
                # On a GPU the lane's step waits for the upstream outputs it takes as input; the rest of
                # what they send (a roundtrip's tokens) goes out while that step runs, not before it starts.
                lane.upstream.deferred = deferred if self.keep_running else None
                try:
                    finished = self._finish(events, through=lane.upstream) or finished
                finally:
                    lane.upstream.deferred = None
            launched = lane.launch(events, self._last_step_s.get(lane.upstream, 0.0) if lane.upstream else 0.0)
            if launched is not None:
                self._launched.append(launched)
                launched_any = True
                rows += sum(len(sids) for sids, _ in launched.groups)
                warming += launched.groups.warming
            if deferred:
                for send in deferred:
                    send()
                if self.on_events is not None and events:
                    self.on_events(events[:])
                    events.clear()
        # Keep the newest step running into the next tick; send the others' outputs meanwhile.
        finished = self._finish(events, keep=1 if launched_any and self.keep_running else 0) or finished
        ended = self._ended
        busy = bool(self._launched) or bool(self._ending) or any(lane.busy() for lane in self.lanes)
        if finished or ended:
            tick_s = time.perf_counter() - start
            self.stats["tick_s"].append(tick_s)
            self.stats["step_s"].append(self._finished_s)
            cpu_s = time.thread_time() - start_cpu
            self.stats["tick_parts_s"].append((tick_s, cpu_s, self._blocked_s, GC_CLOCK.seconds - start_gc))
            self.stats["tick_work"].append((start, tick_s, cpu_s, rows, warming, len(ended)))
        return events, results, ended, busy

    def _finish(self, events: Events, through: Optional[Lane] = None, keep: int = 0) -> bool:
        """Send the outputs of launched steps and stream ends, oldest first: all but the newest ``keep``, or
        (``through``) up to the last one of that lane. Returns whether any was sent."""
        sent = False
        while len(self._launched) > keep:
            if through is not None and not any(step.lane is through for step in self._launched):
                break
            step = self._launched.popleft()
            step_s = step.lane.finish(step, events)
            if step.final:  # streams ended: their sessions' done follows their last output
                self._send_done(events)
            if self.on_events is not None and events:
                self.on_events(events[:])
                events.clear()
            self._finished_s += step_s
            self._blocked_s += step.groups.blocked_s
            sent = True
            if step.final:  # not a step: neither the lane's step time nor its metrics
                continue
            self._last_step_s[step.lane] = step_s
            if self.on_step is not None:
                self.on_step(step.lane.name, step_s, step.lane.last_batch)
        return sent

    def _end_streams(self, events: Events) -> None:
        """End the streams of the flushed sessions whose queued steps have all run and been sent (padded as
        offline encode/decode would), lane by lane (a roundtrip's decoder once the steps its encoder's end
        completed have run too); each lane's ends are launched like a step, their output sent in turn. Sends
        ``done`` for the sessions that no lane holds any more (those that failed on the way too)."""
        for lane in self.lanes:
            closing = lane.end_streams(self._ending, events)
            if closing is not None:
                self._launched.append(closing)
        self._send_done(events)

    def _send_done(self, events: Events) -> None:
        """Send ``done`` (or the session's ``end_error``) to each ending session that no lane holds any more;
        they go to the tick's ended sessions."""
        ended = [s for s in self._ending if not any(lane.holds(s) for lane in self.lanes)]
        if not ended:
            return
        self._ending = [s for s in self._ending if any(lane.holds(s) for lane in self.lanes)]
        self._ended.extend(ended)
        for session in ended:
            assert session.flush_at is not None
            if session.end_error is not None:  # an llm session whose LLM failed: its error takes done's place
                events.append((session, session.end_error))
                continue
            events.append((session, dumps({"type": "done", "input_items": session.flush_at[0],
                                           "output_samples": session.engine.audio_pos,
                                           "output_tokens": session.engine.token_pos})))


class Worker:
    """Runs an :class:`EngineSet` in its own thread, one tick at a time, and carries work between it and the
    event loop: input, stream ends and commands in; events (via the sink given to :meth:`start`), ended
    streams and command results out.

    The thread runs torch with ``threads`` intra-op threads, so the event loop, which serves every socket,
    keeps a core; torch's threads competing with it for every core make each step slower than one thread
    does (bench/RESULTS.md, server section).
    """

    def __init__(self, engines: EngineSet, threads: int, stats: Dict[str, Any]):
        self.engines = engines
        self.threads = threads
        self.stats = stats
        self.ticks = 0  # this worker's ticks (stats["ticks"] counts every worker's)
        # torch's thread count and CUDA device are per thread: set them in the worker, leaving the caller's alone.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="snac-engine", initializer=_engine_thread_setup,
                                            initargs=(threads, engines.device))
        self._commands: List[Tuple[Command, Optional[asyncio.Future]]] = []
        self._input_ready: List[Session] = []  # sessions whose inbox has input since the last tick
        self._end_requests: List[Session] = []  # sessions flushed since the last tick
        self._wake: Optional[asyncio.Event] = None
        self._ticker: Optional[asyncio.Task] = None
        self._sink: Callable[[Events], None] = lambda events: None
        # Liveness, written by the loop around each tick: when the tick under way started (None between ticks)
        # and the last time the tick loop went round (or started waiting for work).
        self.tick_started: Optional[float] = None
        self.heartbeat: Optional[float] = None

    # ---- event loop side ------------------------------------------------------------------------------
    def health(self, stuck_after_s: float) -> Tuple[bool, str]:
        """(healthy, why): the tick loop runs, and no tick has been running for more than ``stuck_after_s``."""
        if self._ticker is None:
            return False, "engine worker not started"
        if self._ticker.done():
            return False, "engine worker stopped"
        started = self.tick_started
        if started is not None and time.monotonic() - started > stuck_after_s:
            return False, f"engine tick running for {time.monotonic() - started:.1f} s"
        return True, "ok"

    def start(self, sink: Callable[[Events], None]) -> None:
        """Start ticking (on the running loop); ``sink`` takes each tick's events, those of each step as soon as
        its outputs are sent."""
        self._sink = sink
        loop = asyncio.get_running_loop()
        # FIFO on the loop: a tick's early events reach the sink before the rest, which the tick returns.
        self.engines.on_events = lambda events: loop.call_soon_threadsafe(sink, events)
        self._wake = asyncio.Event()
        self._ticker = asyncio.create_task(self._tick_loop())

    async def stop(self) -> None:
        """Stop ticking and end the thread (after the tick under way)."""
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    def post(self, command: Command, future: Optional[asyncio.Future] = None) -> None:
        """Run ``command`` in the next tick; its result (or exception) goes to ``future``."""
        self._commands.append((command, future))
        assert self._wake is not None
        self._wake.set()

    async def call(self, command: Command) -> Any:
        """Run ``command`` in the engine thread and return its result."""
        future = asyncio.get_running_loop().create_future()
        self.post(command, future)
        return await future

    async def open(self, session: Session) -> None:
        """Open the session's engine streams; raises ``ProtocolError`` ``server_full`` if none is free."""
        await self.call(lambda events: self.engines.open(session))

    def abort(self, session: Session) -> None:
        """Drop the session's engine streams in the next tick."""
        self.post(lambda events: self.engines.abort(session))

    def deliver(self, session: Session, item: Any, now: float) -> None:
        """Queue input as the connection side hands it over (whole engine steps at a time, audio and codes
        alike); the first item of an empty inbox marks the session for the next tick, which submits everything
        that arrived since the last one at once (one engine call for all sessions' audio)."""
        session.inbox.append((item, session.loop.received, now))
        if len(session.inbox) == 1:
            self._input_ready.append(session)
            assert self._wake is not None
            self._wake.set()

    async def end_stream(self, session: Session) -> None:
        """After a flush: hand the session to the engine thread's stream ends; returns once its end (or an
        error) is queued for the client."""
        session.loop.ended = asyncio.get_running_loop().create_future()
        self._end_requests.append(session)
        assert self._wake is not None
        self._wake.set()
        await session.loop.ended

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            self.heartbeat = time.monotonic()
            await self._wake.wait()
            self._wake.clear()
            commands, self._commands = self._commands, []
            ready, self._input_ready = self._input_ready, []
            ending, self._end_requests = self._end_requests, []
            self.tick_started = self.heartbeat = time.monotonic()
            try:
                events, results, ended, busy = await loop.run_in_executor(
                    self._executor, self.engines.tick, [command for command, _ in commands], ready, ending)
            finally:
                self.tick_started = None
            self.ticks += 1
            self.stats["ticks"] += 1
            self._sink(events)
            for session in ended:
                if session.loop.ended is not None and not session.loop.ended.done():
                    session.loop.ended.set_result(None)
            for (_, future), result in zip(commands, results):
                if future is not None and not future.done():
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
            if busy:
                self._wake.set()


class Workers:
    """The workers of every device the server runs on (one on one device), and where each session runs.

    :meth:`place` puts a new session on the engine set with the most free slots (ties: the first listed) and
    records it in ``session.placement``; its streams, input, end and abort then go to that worker alone (the
    same calls as :class:`Worker`'s). Each engine set has ``slots_per_device`` slots (``--max-sessions``), so
    the server has ``slots`` in all. The counts are the loop's: a session holds its slot from :meth:`place` to
    :meth:`release`, and a slot released before the engine thread has dropped its streams is safe to reuse,
    since the drop is queued on that worker before any later open.
    """

    def __init__(self, workers: Sequence[Worker], slots_per_device: int):
        if not workers:
            raise ValueError("Workers needs at least one worker")
        self.workers = list(workers)
        self.slots_per_device = slots_per_device
        self._placed: List[Set[Session]] = [set() for _ in self.workers]

    def __len__(self) -> int:
        return len(self.workers)

    def __getitem__(self, index: int) -> Worker:
        return self.workers[index]

    def __iter__(self) -> Iterator[Worker]:
        return iter(self.workers)

    @property
    def slots(self) -> int:
        """Session slots of all devices together."""
        return self.slots_per_device * len(self.workers)

    def sessions_open(self) -> List[int]:
        """Sessions holding a slot, per engine set."""
        return [len(placed) for placed in self._placed]

    def slots_free(self) -> List[int]:
        """Free slots, per engine set."""
        return [max(0, self.slots_per_device - len(placed)) for placed in self._placed]

    # ---- placement (event loop) -------------------------------------------------------------------------
    async def place(self, session: Session) -> bool:
        """Give ``session`` a slot on the engine set with the most free ones; False if every one is full. A
        coroutine for the connection side, which may place through a front end's link (:mod:`.frontends`);
        here it is :meth:`take_slot`."""
        return self.take_slot(session)

    def take_slot(self, session: Session) -> bool:
        """:meth:`place`, at once."""
        free = self.slots_free()
        best = max(range(len(free)), key=free.__getitem__)  # the first of equals
        if not free[best]:
            return False
        session.placement = best
        self._placed[best].add(session)
        return True

    def release(self, session: Session) -> None:
        """Free the session's slot (idempotent). Its placement stays, so a late abort still finds its worker."""
        if session.placement is not None:
            self._placed[session.placement].discard(session)

    def _of(self, session: Session) -> Worker:
        assert session.placement is not None, "session not placed"
        return self.workers[session.placement]

    # ---- a session's work, on the worker it was placed on -----------------------------------------------
    async def open(self, session: Session) -> None:
        """Open the session's engine streams; raises ``ProtocolError`` ``server_full`` if none is free."""
        await self._of(session).open(session)

    def abort(self, session: Session) -> None:
        """Drop the session's engine streams in its worker's next tick."""
        self._of(session).abort(session)

    def deliver(self, session: Session, item: Any, now: float) -> None:
        """Queue input for the session's worker (:meth:`Worker.deliver`)."""
        self._of(session).deliver(session, item, now)

    async def end_stream(self, session: Session) -> None:
        """After a flush: end the session's streams (:meth:`Worker.end_stream`)."""
        await self._of(session).end_stream(session)

    # ---- all workers ----------------------------------------------------------------------------------
    def start(self, sink: Callable[[Events], None]) -> None:
        """Start every worker's ticks; ``sink`` takes the events of them all."""
        for worker in self.workers:
            worker.start(sink)

    async def stop(self) -> None:
        """Stop every worker (each after its tick under way)."""
        for worker in self.workers:
            await worker.stop()

    def health(self, stuck_after_s: float) -> Tuple[bool, str]:
        """(healthy, why): every worker is (:meth:`Worker.health`); else the first one that is not, named by
        its engine set and device when there are several."""
        for index, worker in enumerate(self.workers):
            ok, why = worker.health(stuck_after_s)
            if not ok:
                several = len(self.workers) > 1
                return False, f"engine set {index} ({worker.engines.device}): {why}" if several else why
        return True, "ok"
