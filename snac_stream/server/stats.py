"""The server's counters, shared by the connection side (sessions, errors, backlog) and the engine worker
(ticks, their durations, 'behind' warnings). A plain dict, so reports and benchmarks read it as JSON-able data."""

from __future__ import annotations

import collections
from typing import Any, Dict

TICKS_KEPT = 100_000  # tick durations kept for statistics (a few hours of steps)


def new_stats() -> Dict[str, Any]:
    """Fresh counters.

    ``sessions`` / ``completed``: sessions opened / ended by a flush without error; ``errors``: a Counter of
    error codes sent; ``max_backlog``: the most unprocessed input items a session held; ``ticks``: worker
    ticks; ``tick_s`` / ``step_s``: the latest ticks' durations and the engine steps' share of them, in
    seconds; ``tick_parts_s``: the same ticks as (duration, the engine thread's CPU time, its time blocked
    waiting for steps on a GPU, the process's time in garbage collection meanwhile) tuples, the rest of a tick
    (less CPU and blocked) being waits for the interpreter lock or a core; ``tick_work``: what the same ticks
    did, as (start, ``time.perf_counter()`` seconds; duration; the engine thread's CPU time; stream-steps
    launched; passes of streams warming up among them; sessions ended) tuples;
    ``behind_warnings``: 'behind' warnings sent; ``outcomes``: a Counter of (kind, outcome) of the
    sessions that held a slot, outcome ``completed`` (ended by flush), ``closed`` (by the client, without
    flush) or the error code that ended it; ``refusals``: a Counter of the error codes of connections refused
    before they held a slot (``server_full``, ``draining``, ``unauthorized``, bad hellos...); ``bytes_in`` /
    ``bytes_out``: message bytes received / queued for clients.
    """
    return {"sessions": 0, "completed": 0, "errors": collections.Counter(), "ticks": 0, "max_backlog": 0,
            "behind_warnings": 0, "tick_s": collections.deque(maxlen=TICKS_KEPT),
            "step_s": collections.deque(maxlen=TICKS_KEPT), "tick_parts_s": collections.deque(maxlen=TICKS_KEPT),
            "tick_work": collections.deque(maxlen=TICKS_KEPT),
            "outcomes": collections.Counter(),
            "refusals": collections.Counter(), "bytes_in": 0, "bytes_out": 0}
